#!/usr/bin/env bash
# Runs the boto3 reference client against the S3 server of
# target/s3-test-server.env (start it with scripts/s3-server.sh start).
# Creates its own virtual environment under target/.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/bench-peers-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'boto3>=1.34'
fi
# shellcheck disable=SC1091
source target/s3-test-server.env
exec "$venv/bin/python" ckpt-bench/peers/s3_reference.py "$@"
