#!/usr/bin/env bash
# The quickstart, end to end: train with async checkpoints to a local
# directory, crash on purpose, resume from the newest verified checkpoint,
# and check that the result is bit-identical to a run that never crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-$(mktemp -d /tmp/ckpt-quickstart.XXXXXX)}
steps=${STEPS:-300}
cargo build --release --example quickstart --bin ckpt
qs=target/release/examples/quickstart

echo "== 1. train, crash at step 170 (a save may be in flight)"
"$qs" --dir "$dir/crashed" --steps "$steps" --crash-at-step 170 || echo "(the process died, as planned)"
echo
echo "== 2. what is on disk"
target/release/ckpt ls "$dir/crashed"
target/release/ckpt verify "$dir/crashed" --all
echo
echo "== 3. run again: resumes from the newest verified checkpoint"
resumed=$("$qs" --dir "$dir/crashed" --steps "$steps" | tee /dev/stderr | grep final-state-blake3)
echo
echo "== 4. the same run without a crash"
clean=$("$qs" --dir "$dir/clean" --steps "$steps" --quiet)
echo "$clean"
echo
if [ "$resumed" = "$clean" ]; then
  echo "bit-exact resume: the crashed-and-resumed run ends with the same state digest"
else
  echo "MISMATCH: $resumed vs $clean" >&2
  exit 1
fi
