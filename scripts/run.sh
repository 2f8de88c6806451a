#!/usr/bin/env bash
# Run the whole backend natively for development (`make run`): the API (gunicorn), one Celery worker and
# Flower, as children of this script, against Redis at REDIS_URL (started here if it is a local one that is
# not running and redis-server is installed).
#
# Expects .venv to exist with the project installed (`.venv/bin/pip install -e '.[worker]'`, done by make).
# Ctrl-C (or SIGTERM) stops everything this script started; if any child dies, the others are stopped and
# the script exits non-zero.
#
# Settings come from the environment, then from ./.env (only for variables not already set), then defaults.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin

log() { printf '[run.sh] %s\n' "$*" >&2; }
die() { printf '[run.sh] ERROR: %s\n' "$*" >&2; exit 1; }

# --- settings ---------------------------------------------------------------------------------------------
if [[ -f .env ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
        key=${BASH_REMATCH[2]}
        val=${BASH_REMATCH[3]}
        val=${val%$'\r'}
        if [[ $val =~ ^\"(.*)\"$ || $val =~ ^\'(.*)\'$ ]]; then val=${BASH_REMATCH[1]}; fi
        [[ -z ${!key+set} ]] && export "$key=$val"
    done < .env
    log "read settings from .env (variables already set in the environment win)"
fi

export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
export MODEL_DIR=${MODEL_DIR:-./models}
export LOG_LEVEL=${LOG_LEVEL:-INFO}
export PORT=${PORT:-9090}
export FLOWER_PORT=${FLOWER_PORT:-5555}
export PREDICT_WAIT_SECONDS=${PREDICT_WAIT_SECONDS:-2}
export PYTHONUNBUFFERED=1
log_level_lower=$(printf '%s' "$LOG_LEVEL" | tr '[:upper:]' '[:lower:]')

for exe in python gunicorn celery; do
    [[ -x $BIN/$exe ]] || die "$BIN/$exe not found: create the venv and install the project first (make run does: .venv/bin/pip install -e '.[worker]')"
done
"$BIN/python" -c 'import flower' 2>/dev/null \
    || die "flower is not installed in .venv (it is a base dependency of the project: reinstall with .venv/bin/pip install -e '.[worker]')"
mkdir -p "$MODEL_DIR"

# --- Redis ------------------------------------------------------------------------------------------------
redis_ping() {
    "$BIN/python" -c '
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_timeout=1, socket_connect_timeout=1).ping()
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
' "$REDIS_URL"
}

# Prints "<scheme> <host> <port> <password>" of REDIS_URL (password may be empty).
redis_url_parts() {
    "$BIN/python" -c '
import sys
from urllib.parse import urlsplit, unquote
u = urlsplit(sys.argv[1])
print(u.scheme, u.hostname or "", u.port or 6379, unquote(u.password or ""))
' "$REDIS_URL"
}

# --- children ---------------------------------------------------------------------------------------------
declare -A PIDS=()   # name -> pid of each child this script started
STOPPING=0
stop_all() {
    # Stop the application processes first and Redis (if this script started it) last: they may use it
    # while stopping. SIGTERM goes to each main process (it stops its own workers); whatever is still alive
    # after STOP_TIMEOUT gets SIGKILL, with its whole process group.
    local name
    local -a apps=()
    for name in "${!PIDS[@]}"; do [[ $name == redis ]] || apps+=("$name"); done
    for name in "${apps[@]}"; do
        kill -0 "${PIDS[$name]}" 2>/dev/null || continue
        log "stopping $name (pid ${PIDS[$name]})"
        kill -TERM "${PIDS[$name]}" 2>/dev/null || true
    done
    wait_for_pids "${apps[@]}"
    if [[ -n ${PIDS[redis]:-} ]] && kill -0 "${PIDS[redis]}" 2>/dev/null; then
        log "stopping the redis-server this script started (pid ${PIDS[redis]})"
        kill -TERM "${PIDS[redis]}" 2>/dev/null || true
        wait_for_pids redis
    fi
}

# Waits (up to STOP_TIMEOUT seconds, default 20) for the named children, then kills what is left.
wait_for_pids() {
    local name pid alive
    local deadline=$((SECONDS + ${STOP_TIMEOUT:-20}))
    while :; do
        alive=()
        for name in "$@"; do
            pid=${PIDS[$name]:-}
            [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive+=("$name")
        done
        ((${#alive[@]} == 0)) && return 0
        if ((SECONDS >= deadline)); then
            for name in "${alive[@]}"; do
                log "$name did not stop in time: killing it"
                kill -KILL -- "-${PIDS[$name]}" 2>/dev/null || kill -KILL "${PIDS[$name]}" 2>/dev/null || true
            done
            return 0
        fi
        sleep 0.2
    done
}

on_signal() {
    ((STOPPING)) && return 0
    STOPPING=1
    log "got SIG$1: stopping everything"
    stop_all
    wait 2>/dev/null || true
    log "stopped"
    case $1 in INT) exit 130 ;; TERM) exit 143 ;; *) exit 129 ;; esac
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

start() {   # start NAME CMD...: run CMD in the background, in its own process group
    local name=$1; shift
    set -m
    "$@" &
    PIDS[$name]=$!
    set +m
    log "started $name (pid ${PIDS[$name]}): $*"
}

REDIS_PID=

if ping_err=$(redis_ping 2>&1); then
    log "Redis answers at $REDIS_URL"
else
    read -r r_scheme r_host r_port r_pass < <(redis_url_parts) || true
    case $r_host in
        127.*|localhost|::1) loopback=1 ;;
        *) loopback=0 ;;
    esac
    if [[ $r_scheme == redis && $loopback == 1 ]] && command -v redis-server >/dev/null 2>&1; then
        log "nothing answers at REDIS_URL=$REDIS_URL ($ping_err)"
        log "starting a throw-away redis-server on port $r_port (no persistence; stopped with this script)"
        bind=$r_host
        [[ $bind == localhost ]] && bind=127.0.0.1
        redis_args=(--port "$r_port" --bind "$bind" --daemonize no --save "" --appendonly no)
        [[ -n ${r_pass:-} ]] && redis_args+=(--requirepass "$r_pass")
        start redis redis-server "${redis_args[@]}"
        REDIS_PID=${PIDS[redis]}
        for _ in $(seq 50); do
            if redis_ping 2>/dev/null; then break; fi
            kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited at once (port $r_port in use by something else?)"
            sleep 0.1
        done
        if ! redis_ping 2>/dev/null; then
            kill -TERM "$REDIS_PID" 2>/dev/null || true
            die "redis-server started but does not answer at $REDIS_URL"
        fi
        log "Redis started (pid $REDIS_PID) at $REDIS_URL"
    else
        die "no Redis answers at REDIS_URL=$REDIS_URL ($ping_err).
  Start one, e.g. 'redis-server' (apt-get install redis-server) or
  'docker run -d -p 6379:6379 redis:7', or set REDIS_URL to a Redis that runs.
  (This script starts redis-server itself only when REDIS_URL points at this machine and redis-server is installed.)"
    fi
fi

start api "$BIN/gunicorn" "api.app:create_app()" \
    --bind "0.0.0.0:$PORT" \
    --worker-class gthread --workers 2 --threads 8 \
    --timeout 60 --graceful-timeout 10 --keep-alive 5 \
    --access-logfile - --error-logfile - --log-level "$log_level_lower"

start worker "$BIN/celery" -A worker.worker_app worker \
    -Q interactive,bulk -O fair --prefetch-multiplier 1 --loglevel "$LOG_LEVEL"
# (processes: WORKER_CONCURRENCY, read by common/celery_app.py; default one per core, at most 4)

# The periodic reconciliation with Label Studio and the checks that restart stalled work.
start beat "$BIN/celery" -A worker.celery_app beat --loglevel "$LOG_LEVEL"

# Flower reads FLOWER_BASIC_AUTH (user:pass[,user2:pass2]) from the environment itself; set but empty it
# would lock everybody out.
[[ -n ${FLOWER_BASIC_AUTH:-} ]] || unset FLOWER_BASIC_AUTH
start flower "$BIN/celery" -A worker.celery_app flower --port="$FLOWER_PORT" --logging="$log_level_lower"

host_ip=$(hostname -I 2>/dev/null | awk '{print $1}') || true
host_ip=${host_ip:-localhost}
cat >&2 <<EOF

==============================================================================================
  ML backend URL to paste into Label Studio (Settings > Model > Connect model):
      http://$host_ip:$PORT        (or http://localhost:$PORT if Label Studio runs on this host,
                                     not in a container)
  Label Studio must run with ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false.
  Flower (queues, workers, tasks):  http://$host_ip:$FLOWER_PORT
  Redis: $REDIS_URL      Ctrl-C stops everything.
==============================================================================================

EOF

# --- supervise --------------------------------------------------------------------------------------------
while :; do
    rc=0
    dead_pid=
    wait -n -p dead_pid "${PIDS[@]}" || rc=$?
    ((STOPPING)) && break
    [[ -z $dead_pid ]] && continue   # woken by a signal whose trap returned
    dead=unknown
    for name in "${!PIDS[@]}"; do [[ ${PIDS[$name]} == "$dead_pid" ]] && dead=$name; done
    unset "PIDS[$dead]"
    STOPPING=1
    log "$dead (pid $dead_pid) exited with status $rc: stopping the others"
    stop_all
    wait 2>/dev/null || true
    ((rc == 0)) && rc=1
    exit "$rc"
done
