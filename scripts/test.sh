#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh machine:
#   - installs (first run only) and starts two local S3-compatible servers
#     on 127.0.0.1 for the object-store tests, s3s-fs and Garage (a
#     production store), and stops them afterwards;
#   - checks formatting, lints, docs (warnings are errors), and that the
#     library builds with no features and with each feature alone;
#   - runs every test of the workspace with all features (the S3 tests
#     against s3s-fs), then the S3 tests, the CLI's and the examples'
#     S3 runs again against Garage.
set -euo pipefail
cd "$(dirname "$0")/.."

# One build per run: incremental caches only cost disk here (they were a
# third of target/ on a machine that ran out of space).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
df -h . | tail -n 1 | awk '{print "== disk: " $4 " free of " $2}'

echo "== rustfmt"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "== docs (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features

echo "== every feature alone, and none, compiles"
for features in "" s3 peer cuda cli; do
  echo "-- ckpt: features [${features}]"
  cargo check -p ckpt --lib --bins --no-default-features --features "${features}"
done
cargo check -p ckpt-core --lib --no-default-features
for features in "" s3 peer conformance; do
  echo "-- ckpt-io: features [${features}]"
  cargo check -p ckpt-io --lib --no-default-features --features "${features}"
done

echo "== S3 test servers: s3s-fs now, Garage built in the background"
scripts/s3-server.sh start
cleanup() {
  scripts/s3-server.sh stop || true
  scripts/garage-server.sh stop || true
}
trap cleanup EXIT
# Compile every test first, then build Garage (if not installed yet) at
# low priority while the suite runs: much of the suite waits on timers,
# processes and sockets, so the build mostly uses idle CPU.
cargo test --workspace --all-features --no-run
mkdir -p target
nice -n 19 scripts/garage-server.sh install >target/garage-install.log 2>&1 &
garage_install=$!

echo "== tests (S3 tests against s3s-fs)"
(
  # shellcheck disable=SC1091
  source target/s3-test-server.env
  export CKPT_REQUIRE_S3=1
  cargo test --workspace --all-features --no-fail-fast
)

echo "== S3 tests against Garage"
if ! wait "$garage_install"; then
  tail -n 30 target/garage-install.log >&2
  echo "installing Garage failed" >&2
  exit 1
fi
scripts/garage-server.sh start
(
  # shellcheck disable=SC1091
  source target/garage-test-server.env
  export CKPT_REQUIRE_S3=1
  # The test binaries the s3s-fs phase built, run as cargo runs them (from
  # their package's directory): a narrower `cargo test -p ...` would resolve
  # other features for shared dependencies and build burn a second time.
  status=0
  ran=0
  while read -r exe dir; do
    echo "-- $(basename "$exe") against Garage"
    (cd "$dir" && "$exe") || status=1
    ran=$((ran + 1))
  done < <(cargo test --workspace --all-features --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, os, sys
want = {("ckpt-io", "s3"), ("ckpt", "cli"), ("ckpt", "quickstart_resume"), ("ckpt", "multi_rank_commit")}
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in t.get("kind", []):
        # path+file:///dir#name@version, or path+file:///dir/name#version
        url, frag = m["package_id"].split("#", 1)
        pkg = frag.split("@")[0] if "@" in frag else url.rsplit("/", 1)[-1]
        if (pkg, t["name"]) in want:
            print(m["executable"], os.path.dirname(m["manifest_path"]))
')
  if [ "$ran" -ne 4 ]; then
    echo "expected 4 test binaries for the Garage phase, found $ran" >&2
    exit 1
  fi
  exit "$status"
)
du -sh target 2>/dev/null | awk '{print "== target/: " $1}'
