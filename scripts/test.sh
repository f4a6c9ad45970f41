#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh machine:
#   - installs (first run only) and starts a local S3-compatible server on
#     127.0.0.1 for the object-store tests, and stops it afterwards;
#   - checks formatting, lints, docs (warnings are errors), and that the
#     library builds with no features and with each feature alone;
#   - runs every test of the workspace with all features.
set -euo pipefail
cd "$(dirname "$0")/.."

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

if [ -x scripts/s3-server.sh ]; then
  echo "== S3 test server"
  scripts/s3-server.sh start
  trap 'scripts/s3-server.sh stop || true' EXIT
  # shellcheck disable=SC1091
  source target/s3-test-server.env
  export CKPT_REQUIRE_S3=1
fi

echo "== tests"
cargo test --workspace --all-features --no-fail-fast
