#!/usr/bin/env bash
# The whole stack on this machine: Kafka, PostgreSQL and every service, each as its own process.
#   up      start every part that is not running (so it also brings back one that died); returns
#           when every part answers its health check
#   down    stop everything `up` started, and nothing else
#   run     up, print the page's address, stay in the foreground until Ctrl-C, then down
#   status  what runs
set -euo pipefail
source "$(dirname "$0")/common.sh"

SVC_DIR="$STATE_DIR/services"
LOG_DIR="$STATE_DIR/logs"
mkdir -p "$SVC_DIR" "$LOG_DIR"

export SIM_PORT="${SIM_PORT:-8090}"
# The LLM providers are unreachable here: locally, every provider URL points at the simulator, at the
# paths the simulator itself names (services/provider_simulator/urls.py, the one source). Set these
# variables (OPENAI_BASE_URL, ...) and the platform keys (OPENAI_API_KEY, ...) to use the real providers.
provider_urls() {
  local lines name url
  lines=$("$PYTHON" -m services.provider_simulator --host 127.0.0.1 --port "$SIM_PORT" --print-urls) \
    || die "could not ask the simulator for its base URLs"
  while IFS='=' read -r name url; do
    [ -n "${!name:-}" ] || export "$name=$url"
  done <<<"$lines"
}
export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:${BYOK_KAFKA_PORT:-9092}}"
export CHAT_DEV_LOGIN="${CHAT_DEV_LOGIN:-true}"
export PYTHONUNBUFFERED=1

CHAT_PORT="${CHAT_PORT:-8000}" CREDITS_PORT="${CREDITS_PORT:-8001}" VALIDATION_PORT="${VALIDATION_PORT:-8002}"
export CREDITS_URL="${CREDITS_URL:-http://127.0.0.1:$CREDITS_PORT}"
unset HTTP_PORT  # each service gets its own below

# name       module                       port
SERVICES=(
  "simulator  services.provider_simulator  $SIM_PORT"
  "credits    services.credits             $CREDITS_PORT"
  "validation services.validation          $VALIDATION_PORT"
  "chat       services.chat                $CHAT_PORT"
)

module_exists() { [ -f "$ROOT/$(echo "$1" | tr . /)/__main__.py" ]; }

healthy() { "$PYTHON" - "$1" <<'PY' 2>/dev/null
import sys, httpx
sys.exit(0 if httpx.get(sys.argv[1], timeout=2).status_code == 200 else 1)
PY
}

start_service() {
  local name=$1 module=$2 port=$3 pidfile="$SVC_DIR/$1.pid"
  if ! module_exists "$module"; then log "$name: $module is not built yet; skipped"; return; fi
  if pid_alive "$pidfile"; then log "$name already running (pid $(cat "$pidfile"))"; return; fi
  port_open 127.0.0.1 "$port" && die "port $port (for $name) is taken by a process this script did not start"
  # nohup and env exec into python, so $! is the service's own pid.
  HTTP_PORT="$port" nohup env -C "$ROOT" "$PYTHON" -m "$module" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  log "$name starting (pid $(cat "$pidfile"), log $LOG_DIR/$name.log)"
}

wait_healthy() {
  local name=$1 module=$2 url="http://127.0.0.1:$3/healthz" t0=$SECONDS
  module_exists "$module" || return 0
  until healthy "$url"; do
    pid_alive "$SVC_DIR/$name.pid" || { tail -n 20 "$LOG_DIR/$name.log" >&2; die "$name exited while starting"; }
    (( SECONDS - t0 > 90 )) && die "$name did not answer $url in 90 s (log: $LOG_DIR/$name.log)"
    sleep 0.3
  done
  log "$name healthy"
}

up() {
  provider_urls
  bash "$ROOT/infra/kafka.sh" up
  bash "$ROOT/infra/postgres.sh" up
  DATABASE_URL="$(bash "$ROOT/infra/postgres.sh" url)"
  export DATABASE_URL
  "$PYTHON" -m migrations >/dev/null
  local s
  for s in "${SERVICES[@]}"; do start_service $s; done
  for s in "${SERVICES[@]}"; do wait_healthy $s; done
}

down() {
  local i s
  for (( i=${#SERVICES[@]}-1; i>=0; i-- )); do
    s=(${SERVICES[$i]}); stop_pid "$SVC_DIR/${s[0]}.pid" "${s[0]}"
  done
  bash "$ROOT/infra/kafka.sh" down
  bash "$ROOT/infra/postgres.sh" down
}

status() {
  local s
  bash "$ROOT/infra/kafka.sh" status || true
  bash "$ROOT/infra/postgres.sh" status || true
  for s in "${SERVICES[@]}"; do
    s=($s)
    if pid_alive "$SVC_DIR/${s[0]}.pid"; then echo "${s[0]}: running (pid $(cat "$SVC_DIR/${s[0]}.pid"))"
    else echo "${s[0]}: stopped"; fi
  done
}

run() {
  trap 'echo; down; exit 0' INT TERM
  up
  echo
  echo "  byok-credits is up:  http://127.0.0.1:$CHAT_PORT/   (Ctrl-C stops everything)"
  echo "  logs: $LOG_DIR"
  echo
  while true; do sleep 1; done
}

case "${1:-}" in
  up) up ;; down) down ;; status) status ;; run) run ;;
  *) echo "usage: $0 up|down|run|status" >&2; exit 2 ;;
esac
