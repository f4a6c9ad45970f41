#!/usr/bin/env bash
# Starts and stops the local S3-compatible server (s3s-fs) that the object
# tier's tests run against.
#
#   scripts/s3-server.sh start    # install s3s-fs if needed, start it, create the bucket
#   source target/s3-test-server.env
#   cargo test -p ckpt-io --features s3 --test s3
#   scripts/s3-server.sh stop
#
# s3s-fs enforces SigV4 and keeps objects as plain files, so data survives a
# restart. It listens on 127.0.0.1 only, on a free port, with fixed test
# credentials, on a fresh temporary data directory.
#
# Environment:
#   CKPT_TOOLS        install root for s3s-fs (default $HOME/.local/ckpt-tools);
#                     an existing install of the pinned version is reused.
#   CKPT_S3S_FS       use this s3s-fs binary instead (must be the pinned version).
#   CKPT_S3_ENV_FILE  where to write the env file (default <repo>/target/s3-test-server.env).
#   CKPT_S3_WAIT_S    how long to wait for the server to answer (default 30).
set -euo pipefail

S3S_FS_VERSION="0.14.1"
BUCKET="ckpt-test"
ACCESS_KEY="ckpt-test-access"
SECRET_KEY="ckpt-test-secret-key"
REGION="us-east-1"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${CKPT_TOOLS:-$HOME/.local/ckpt-tools}"
ENV_FILE="${CKPT_S3_ENV_FILE:-$ROOT/target/s3-test-server.env}"
LOG_FILE="$(dirname "$ENV_FILE")/s3-test-server.log"
WAIT_S="${CKPT_S3_WAIT_S:-30}"

SCRIPT_NAME="s3-server.sh"
SERVER_NAME="s3s-fs"
DATA_PREFIX="ckpt-s3s-fs"
# shellcheck source=scripts/lib/test-server.sh
source "$ROOT/scripts/lib/test-server.sh"

trap 'on_error $LINENO' ERR

# Prints the path of an s3s-fs binary of the pinned version, or nothing.
find_s3s_fs() {
    local candidates=()
    [[ -n "${CKPT_S3S_FS:-}" ]] && candidates+=("$CKPT_S3S_FS")
    candidates+=("$TOOLS/bin/s3s-fs")
    local on_path
    on_path="$(command -v s3s-fs 2>/dev/null || true)"
    [[ -n "$on_path" ]] && candidates+=("$on_path")
    local bin
    for bin in "${candidates[@]}"; do
        if [[ -x "$bin" ]] && [[ "$("$bin" --version 2>/dev/null || true)" == "s3s-fs $S3S_FS_VERSION" ]]; then
            echo "$bin"
            return 0
        fi
    done
    return 0
}

install_s3s_fs() {
    command -v cargo >/dev/null || die "cargo is needed to install s3s-fs $S3S_FS_VERSION"
    echo "s3s-fs $S3S_FS_VERSION not found; installing into $TOOLS (takes several minutes)..." >&2
    cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --root "$TOOLS" >&2 ||
        die "cargo install s3s-fs@$S3S_FS_VERSION failed"
}

# Whether the server answers HTTP at all (any status: unsigned requests get 403).
answers() {
    local code
    code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$1/" 2>/dev/null || true)"
    [[ -n "$code" && "$code" != "000" ]]
}

start_server() {
    stop_server
    mkdir -p "$(dirname "$ENV_FILE")"

    local bin
    bin="$(find_s3s_fs)"
    if [[ -z "$bin" ]]; then
        install_s3s_fs
        bin="$(find_s3s_fs)"
        [[ -n "$bin" ]] || die "s3s-fs $S3S_FS_VERSION is still not runnable after installing into $TOOLS"
    fi

    DATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/ckpt-s3s-fs.XXXXXX")"
    local port="" attempt
    for attempt in 1 2 3 4 5; do
        local candidate=$((20000 + RANDOM % 40000))
        port_in_use "$candidate" && continue
        : >"$LOG_FILE"
        nohup "$bin" --host 127.0.0.1 --port "$candidate" \
            --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" \
            "$DATA_DIR" >>"$LOG_FILE" 2>&1 </dev/null &
        SERVER_PID=$!
        local deadline=$((SECONDS + WAIT_S))
        while ((SECONDS < deadline)); do
            if ! kill -0 "$SERVER_PID" 2>/dev/null; then
                break # exited: port taken or bad arguments; try another port
            fi
            if answers "$candidate"; then
                port="$candidate"
                break
            fi
            sleep 0.2
        done
        [[ -n "$port" ]] && break
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            die "s3s-fs (pid $SERVER_PID) did not answer on 127.0.0.1:$candidate within ${WAIT_S}s; log: $LOG_FILE"
        fi
        echo "s3s-fs exited on port $candidate (attempt $attempt of 5)" >&2
    done
    [[ -n "$port" ]] || die "could not start s3s-fs on a free port; log: $LOG_FILE"

    local endpoint="http://127.0.0.1:$port"
    curl -sf -m 10 -X PUT --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$endpoint/$BUCKET" >/dev/null ||
        die "s3s-fs answers on $endpoint but creating bucket $BUCKET failed"

    cat >"$ENV_FILE" <<EOF
export CKPT_TEST_S3_ENDPOINT=$endpoint
export CKPT_TEST_S3_BUCKET=$BUCKET
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=$REGION
# What a user's own setup would set: object_store (and so ckpt's s3://
# locations, the CLI and the examples) reads these.
export AWS_ENDPOINT_URL=$endpoint
export AWS_ALLOW_HTTP=true
export CKPT_S3S_FS=$bin
export CKPT_TEST_S3_PID=$SERVER_PID
export CKPT_TEST_S3_SERVER=s3s-fs-$S3S_FS_VERSION
export CKPT_TEST_S3_DATA_DIR=$DATA_DIR
EOF
    echo "s3s-fs $S3S_FS_VERSION (pid $SERVER_PID) serves bucket $BUCKET at $endpoint; data in $DATA_DIR" >&2
    echo "env written to $ENV_FILE: source it before cargo test" >&2
}

case "${1:-}" in
start) start_server ;;
stop) stop_server ;;
env) cat "$ENV_FILE" ;;
*)
    echo "usage: $0 start|stop|env" >&2
    exit 2
    ;;
esac
