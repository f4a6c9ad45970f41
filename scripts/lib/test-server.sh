# Helpers shared by the test-server scripts (scripts/s3-server.sh,
# scripts/garage-server.sh); sourced, not run. The sourcing script sets
# SCRIPT_NAME, SERVER_NAME, DATA_PREFIX (the temporary data directory's
# name prefix), ENV_FILE and LOG_FILE, and SERVER_PID / DATA_DIR once it
# has started something.

SERVER_PID=""
DATA_DIR=""

# Kills a server this run started and removes its data directory.
cleanup_failed_start() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n "$DATA_DIR" && -d "$DATA_DIR" ]]; then
        rm -rf "$DATA_DIR"
    fi
}

show_log() {
    if [[ -s "$LOG_FILE" ]]; then
        echo "--- last lines of $LOG_FILE ---" >&2
        tail -n 20 "$LOG_FILE" >&2 || true
    fi
}

die() {
    echo "$SCRIPT_NAME: error: $*" >&2
    show_log
    cleanup_failed_start
    exit 1
}

on_error() {
    local status=$? line=$1
    echo "$SCRIPT_NAME: failed (exit $status) at line $line" >&2
    show_log
    cleanup_failed_start
    exit "$status"
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Stops the server the env file names and removes its data directory.
stop_server() {
    [[ -f "$ENV_FILE" ]] || return 0
    local pid data_dir
    pid="$(sed -n 's/^export CKPT_TEST_S3_PID=//p' "$ENV_FILE")"
    data_dir="$(sed -n 's/^export CKPT_TEST_S3_DATA_DIR=//p' "$ENV_FILE")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        local i
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        echo "stopped $SERVER_NAME (pid $pid)" >&2
    fi
    if [[ -n "$data_dir" && -d "$data_dir" && "$data_dir" == */"$DATA_PREFIX".* ]]; then
        rm -rf "$data_dir"
    fi
    rm -f "$ENV_FILE"
}
