#!/usr/bin/env bash
# Starts and stops a single-node Garage cluster (a production, distributed
# S3 store) on 127.0.0.1 for the object tier's tests, beside s3s-fs.
#
#   scripts/garage-server.sh start    # install Garage if needed, start it, key + bucket
#   source target/garage-test-server.env
#   cargo test -p ckpt-io --features s3 --test s3
#   scripts/garage-server.sh stop     # stops it and removes its data
#
# The node gets a fresh metadata and data directory, a generated RPC secret
# and admin token, free ports, fixed test credentials (imported) and the
# bucket `ckpt-test`. The env file sets the same variables as
# scripts/s3-server.sh, so every S3 test runs against either server.
#
# Environment:
#   CKPT_TOOLS          install root (default $HOME/.local/ckpt-tools); an
#                       installed Garage of the pinned version is reused.
#   CKPT_GARAGE         use this garage binary instead (must be the pinned version).
#   CKPT_GARAGE_ENV_FILE  where to write the env file (default <repo>/target/garage-test-server.env).
#   CKPT_S3_WAIT_S      how long to wait for the server (default 60).
set -euo pipefail

GARAGE_VERSION="2.5.0"
BUCKET="ckpt-test"
# Garage key ids are GK + 24 hex digits, secrets 64 hex digits.
ACCESS_KEY="GK0c4b7e57c4b7e57c4b7e57c4"
SECRET_KEY="c4b7e57c4b7e57c4b7e57c4b7e57c4b7e57c4b7e57c4b7e57c4b7e57c4b7e57c"
REGION="garage"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${CKPT_TOOLS:-$HOME/.local/ckpt-tools}"
ENV_FILE="${CKPT_GARAGE_ENV_FILE:-$ROOT/target/garage-test-server.env}"
LOG_FILE="$(dirname "$ENV_FILE")/garage-test-server.log"
WAIT_S="${CKPT_S3_WAIT_S:-60}"

SCRIPT_NAME="garage-server.sh"
SERVER_NAME="garage"
DATA_PREFIX="ckpt-garage"
# shellcheck source=scripts/lib/test-server.sh
source "$ROOT/scripts/lib/test-server.sh"

trap 'on_error $LINENO' ERR

# Prints the path of a garage binary of the pinned version, or nothing.
find_garage() {
    local candidates=()
    [[ -n "${CKPT_GARAGE:-}" ]] && candidates+=("$CKPT_GARAGE")
    candidates+=("$TOOLS/bin/garage")
    local on_path
    on_path="$(command -v garage 2>/dev/null || true)"
    [[ -n "$on_path" ]] && candidates+=("$on_path")
    local bin
    for bin in "${candidates[@]}"; do
        if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q ":$GARAGE_VERSION"; then
            echo "$bin"
            return 0
        fi
    done
    return 0
}

# The server and its tools in one binary. The features a single test node
# needs (SQLite metadata, bundled C libraries) and a profile that builds
# fast: about 8 minutes on 2 cores instead of 12 with the defaults.
install_garage() {
    command -v cargo >/dev/null || die "cargo is needed to install garage $GARAGE_VERSION"
    echo "garage $GARAGE_VERSION not found; installing into $TOOLS (about 8 minutes on 2 cores)..." >&2
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0 \
        cargo install "garage@$GARAGE_VERSION" --locked --no-default-features \
        --features sqlite,bundled-libs --root "$TOOLS" >&2 ||
        die "cargo install garage@$GARAGE_VERSION failed"
}

free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 40000))
        port_in_use "$p" || {
            echo "$p"
            return 0
        }
    done
    die "no free port found"
}

start_server() {
    stop_server
    mkdir -p "$(dirname "$ENV_FILE")"
    local bin
    bin="$(find_garage)"
    if [[ -z "$bin" ]]; then
        install_garage
        bin="$(find_garage)"
        [[ -n "$bin" ]] || die "garage $GARAGE_VERSION is still not runnable after installing into $TOOLS"
    fi

    DATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/ckpt-garage.XXXXXX")"
    local s3_port rpc_port admin_port
    s3_port="$(free_port)"
    rpc_port="$(free_port)"
    admin_port="$(free_port)"
    local cfg="$DATA_DIR/garage.toml"
    cat >"$cfg" <<EOF
metadata_dir = "$DATA_DIR/meta"
data_dir = "$DATA_DIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
admin_token = "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
EOF
    : >"$LOG_FILE"
    nohup "$bin" -c "$cfg" server >>"$LOG_FILE" 2>&1 </dev/null &
    SERVER_PID=$!
    local g=("$bin" -c "$cfg")
    local node="" deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "garage exited at start; log: $LOG_FILE"
        node="$("${g[@]}" node id -q 2>/dev/null | cut -d@ -f1 || true)"
        [[ -n "$node" ]] && break
        sleep 0.3
    done
    [[ -n "$node" ]] || die "garage did not answer within ${WAIT_S}s; log: $LOG_FILE"
    {
        "${g[@]}" layout assign -z dc1 -c 1G "$node"
        "${g[@]}" layout apply --version 1
        "${g[@]}" key import --yes -n ckpt-test "$ACCESS_KEY" "$SECRET_KEY"
        "${g[@]}" bucket create "$BUCKET"
        "${g[@]}" bucket allow --read --write --owner "$BUCKET" --key ckpt-test
    } >>"$LOG_FILE" 2>&1 || die "setting up the node, key and bucket failed"

    local endpoint="http://127.0.0.1:$s3_port" code=""
    while ((SECONDS < deadline)); do
        code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' --aws-sigv4 "aws:amz:$REGION:s3" \
            --user "$ACCESS_KEY:$SECRET_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
            "$endpoint/$BUCKET?list-type=2" || true)"
        [[ "$code" == "200" ]] && break
        sleep 0.3
    done
    [[ "$code" == "200" ]] || die "garage does not list bucket $BUCKET at $endpoint (HTTP $code)"

    cat >"$ENV_FILE" <<EOF
export CKPT_TEST_S3_ENDPOINT=$endpoint
export CKPT_TEST_S3_BUCKET=$BUCKET
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=$REGION
export AWS_ENDPOINT_URL=$endpoint
export AWS_ALLOW_HTTP=true
export CKPT_TEST_S3_SERVER=garage-$GARAGE_VERSION
export CKPT_GARAGE=$bin
export CKPT_TEST_S3_PID=$SERVER_PID
export CKPT_TEST_S3_DATA_DIR=$DATA_DIR
EOF
    echo "garage $GARAGE_VERSION (pid $SERVER_PID) serves bucket $BUCKET at $endpoint; data in $DATA_DIR" >&2
    echo "env written to $ENV_FILE: source it before cargo test" >&2
}

case "${1:-}" in
start) start_server ;;
stop) stop_server ;;
install) [[ -n "$(find_garage)" ]] || install_garage ;;
env) cat "$ENV_FILE" ;;
*)
    echo "usage: $0 start|stop|install|env" >&2
    exit 2
    ;;
esac
