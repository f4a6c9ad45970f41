#!/usr/bin/env bash
# Saves ckpt-bench's synthetic state with other checkpointing tools
# (safetensors, Orbax on jax CPU, torch if installed) and reports the time
# the training loop is blocked and the time until durable; see peers.py.
#
#   ckpt-bench/peers/peers.sh [--with-torch] [--state-bytes 2G] [--tensors 16]
#                             [--iters 5] [--dir target/bench-peers] [--json]
#
# Creates or updates the virtual environment target/bench-peers-venv (shared
# with s3_reference.sh) with pinned versions; --with-torch also installs
# torch there (large). Installs only when a pin is not yet recorded in the
# venv's stamp file.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/bench-peers-venv
stamp=$venv/peers-pins.txt
pins=(
  'numpy==2.4.6'
  'safetensors==0.8.0'
  'jax[cpu]==0.10.2'
  'orbax-checkpoint==0.12.8'
  'boto3>=1.34' # for s3_reference.sh, which skips installing into an existing venv
)
args=()
for a in "$@"; do
  if [ "$a" = --with-torch ]; then
    pins+=('torch==2.15.0')
  else
    args+=("$a")
  fi
done
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
missing=()
for p in "${pins[@]}"; do
  grep -qxF -- "$p" "$stamp" 2>/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$venv/bin/pip" install --quiet "${pins[@]}"
  { cat "$stamp" 2>/dev/null || true; printf '%s\n' "${missing[@]}"; } | sort -u >"$stamp.new"
  mv "$stamp.new" "$stamp"
fi
exec "$venv/bin/python" ckpt-bench/peers/peers.py "${args[@]}"
