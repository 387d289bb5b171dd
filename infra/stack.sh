#!/usr/bin/env bash
# The whole stack on this machine: Kafka, PostgreSQL and every service, each as its own process.
#   up      start every part that is not running (so it also brings back one that died) and the
#           supervisor, which restarts a part that dies (logs/supervisor.log); returns when every part
#           answers its health check. CREDITS_INSTANCES=N / CHAT_INSTANCES=N run N of those.
#   down    stop everything `up` started, and nothing else: the supervisor and the services of this
#           state folder are found by their pid files and, should those be gone (an earlier run killed
#           midway), by the mark every one of them carries (BYOK_STACK_DIR in its environment)
#   run     up, print the page's address, stay in the foreground until Ctrl-C (SIGINT to the whole
#           process group, as a terminal sends it), SIGTERM or SIGHUP, then down
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
# Every node of the cluster when BYOK_KAFKA_BROKERS=3 (infra/kafka.sh says which).
export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-$(bash "$ROOT/infra/kafka.sh" bootstrap)}"
export CHAT_DEV_LOGIN="${CHAT_DEV_LOGIN:-true}"
# A local stack: the services accept the repository's development secrets (elsewhere they refuse to start).
export BYOK_ENV="${BYOK_ENV:-development}"
export PYTHONUNBUFFERED=1

CHAT_PORT="${CHAT_PORT:-8000}" CREDITS_PORT="${CREDITS_PORT:-8001}" VALIDATION_PORT="${VALIDATION_PORT:-8002}"
CREDITS_INSTANCES="${CREDITS_INSTANCES:-1}" CHAT_INSTANCES="${CHAT_INSTANCES:-1}"
export CREDITS_URL="${CREDITS_URL:-http://127.0.0.1:$CREDITS_PORT}"
unset HTTP_PORT CREDITS_INSTANCE VALIDATION_INSTANCE  # each service gets its own below

# One line per process: name, module, port, instance name ("-": none). Instance i > 1 of a service
# is named <service>-<i> and listens on the service's port + i - 1; every credit and validation
# instance is a static group member under its instance name (CREDITS_INSTANCE, VALIDATION_INSTANCE),
# so when the supervisor restarts one it takes its partitions straight back.
instance_name() { if [ "$2" = 1 ]; then echo "$1"; else echo "$1-$2"; fi; }
SERVICES=("simulator services.provider_simulator $SIM_PORT -")
for (( i=1; i<=CREDITS_INSTANCES; i++ )); do
  SERVICES+=("$(instance_name credits $i) services.credits $((CREDITS_PORT + i - 1)) credits-$i")
done
SERVICES+=("validation services.validation $VALIDATION_PORT validation-1")
for (( i=1; i<=CHAT_INSTANCES; i++ )); do
  SERVICES+=("$(instance_name chat $i) services.chat $((CHAT_PORT + i - 1)) -")
done

check_ports() {
  local s ports=() dup
  for s in "${SERVICES[@]}"; do s=($s); ports+=("${s[2]}"); done
  dup=$(printf '%s\n' "${ports[@]}" | sort | uniq -d | head -n1)
  [ -z "$dup" ] || die "two parts would listen on port $dup: with CREDITS_INSTANCES=$CREDITS_INSTANCES and \
CHAT_INSTANCES=$CHAT_INSTANCES, instances take consecutive ports from CHAT_PORT=$CHAT_PORT, CREDITS_PORT=$CREDITS_PORT \
(VALIDATION_PORT=$VALIDATION_PORT, SIM_PORT=$SIM_PORT); set the ports apart, e.g. CREDITS_PORT=8101 VALIDATION_PORT=8201"
}

# Every process `up` and the supervisor start carries this mark, so `down` finds them whatever
# happened to their pid files. They run in sessions of their own (setsid): a terminal's Ctrl-C reaches
# only `run`, which stops them in order, never a supervisor that would restart what the signal killed.
STACK_MARK="BYOK_STACK_DIR=$(cd "$STATE_DIR" && pwd -P)"

# marked_pids [ROLE]: live processes carrying this state folder's mark (and BYOK_STACK_ROLE=ROLE).
marked_pids() {
  local f pid stat
  for f in $(grep -lzxF "$STACK_MARK" /proc/[0-9]*/environ 2>/dev/null); do
    pid=${f#/proc/}; pid=${pid%/environ}
    [ "$pid" = $$ ] || [ "$pid" = "$BASHPID" ] && continue
    [ -z "${1:-}" ] || grep -qzxF "BYOK_STACK_ROLE=$1" "$f" 2>/dev/null || continue
    read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
    stat=${stat##*) }; [ "${stat%% *}" = Z ] || echo "$pid"  # a zombie is not alive
  done
}

module_exists() { [ -f "$ROOT/$(echo "$1" | tr . /)/__main__.py" ]; }

healthy() { "$PYTHON" - "$1" <<'PY' 2>/dev/null
import sys, httpx
sys.exit(0 if httpx.get(sys.argv[1], timeout=2).status_code == 200 else 1)
PY
}

start_service() {
  local name=$1 module=$2 port=$3 instance=$4 pidfile="$SVC_DIR/$1.pid" named=()
  if ! module_exists "$module"; then log "$name: $module is not built yet; skipped"; return; fi
  if pid_alive "$pidfile"; then log "$name already running (pid $(cat "$pidfile"))"; return; fi
  port_open 127.0.0.1 "$port" && die "port $port (for $name) is taken by a process this script did not start"
  case "$module" in
    services.credits) named=("CREDITS_INSTANCE=$instance") ;;
    services.validation) named=("VALIDATION_INSTANCE=$instance") ;;
  esac
  # nohup and env exec into python, so $! is the service's own pid. CHAT_PORT would win over HTTP_PORT
  # in the chat service's settings: every instance gets its own port here.
  HTTP_PORT="$port" nohup setsid env -C "$ROOT" -u CHAT_PORT "$STACK_MARK" BYOK_STACK_ROLE=service "${named[@]}" \
    "$PYTHON" -m "$module" \
    >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  log "$name starting (pid $(cat "$pidfile"), log $LOG_DIR/$name.log)"
}

# The supervisor: a background loop (started by `up`, stopped first by `down`) that restarts a part
# whose process has died, within a second, and says so in $LOG_DIR/supervisor.log. A part that dies
# again within 10 s of its restart waits longer each time (1 s doubling to 30 s), so a part that cannot
# start does not spin.
SUPERVISOR_PID="$SVC_DIR/supervisor.pid"
SUPERVISOR_LOG="$LOG_DIR/supervisor.log"

supervise() {
  local s name pidfile now
  declare -A restarted_at=() backoff=() not_before=()
  trap 'exit 0' TERM INT
  slog() { printf '%s [supervisor] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "$*"; }
  slog "watching ${#SERVICES[@]} parts"
  local tick  # a pipe nobody writes to: `read -t` on it sleeps without forking a `sleep`
  exec {tick}<> <(:)
  while true; do
    for s in "${SERVICES[@]}"; do
      s=($s); name=${s[0]}; pidfile="$SVC_DIR/$name.pid"
      module_exists "${s[1]}" || continue
      pid_alive "$pidfile" && continue
      printf -v now '%(%s)T' -1
      if [ -z "${not_before[$name]:-}" ]; then  # just found dead: decide when to restart it
        if (( now - ${restarted_at[$name]:-0} < 10 )); then
          backoff[$name]=$(( ${backoff[$name]:-0} == 0 ? 1 : (backoff[$name] * 2 > 30 ? 30 : backoff[$name] * 2) ))
        else
          backoff[$name]=0
        fi
        not_before[$name]=$(( now + backoff[$name] ))
        slog "$name died (pid $(cat "$pidfile" 2>/dev/null || echo '?')); restarting it$( (( backoff[$name] )) && echo " in ${backoff[$name]} s")"
      fi
      (( now >= not_before[$name] )) || continue
      rm -f "$pidfile"
      if ( start_service "${s[@]}" ); then
        slog "$name restarted (pid $(cat "$pidfile"))"
      else
        slog "$name could not be restarted; trying again"
      fi
      restarted_at[$name]=$now; unset "not_before[$name]"
    done
    read -r -t 0.5 -u "$tick" _ || true
  done
}

start_supervisor() {
  local stray
  if ! pid_alive "$SUPERVISOR_PID" && stray=$(marked_pids supervisor | head -n1) && [ -n "$stray" ]; then
    echo "$stray" >"$SUPERVISOR_PID"  # an earlier run's, whose pid file was lost: keep that one
  fi
  if pid_alive "$SUPERVISOR_PID"; then log "supervisor already running (pid $(cat "$SUPERVISOR_PID"))"; return; fi
  nohup setsid env "$STACK_MARK" BYOK_STACK_ROLE=supervisor bash "$ROOT/infra/stack.sh" supervise \
    >>"$SUPERVISOR_LOG" 2>&1 </dev/null &
  echo $! >"$SUPERVISOR_PID"
  log "supervisor watching the parts (pid $(cat "$SUPERVISOR_PID"), log $SUPERVISOR_LOG)"
}

wait_healthy() {
  local name=$1 module=$2 url="http://127.0.0.1:$3/healthz" t0=$SECONDS
  module_exists "$module" || return 0
  until healthy "$url"; do
    pid_alive "$SVC_DIR/$name.pid" || { tail -n 20 "$LOG_DIR/$name.log" >&2; die "$name exited while starting"; }
    if (( SECONDS - t0 > 90 )); then
      tail -n 20 "$LOG_DIR/$name.log" >&2; die "$name did not answer $url in 90 s (log: $LOG_DIR/$name.log)"
    fi
    sleep 0.3
  done
  log "$name healthy"
}

up() {
  check_ports
  provider_urls
  # Kafka and PostgreSQL may already run (started by `make test`, or by hand): `down` stops them only
  # if this `up` started them (DESIGN "Commands": down stops everything up started and nothing else).
  mkdir -p "$SVC_DIR"
  bash "$ROOT/infra/kafka.sh" status >/dev/null 2>&1 || touch "$SVC_DIR/up-started-kafka"
  bash "$ROOT/infra/postgres.sh" status >/dev/null 2>&1 || touch "$SVC_DIR/up-started-postgres"
  bash "$ROOT/infra/kafka.sh" up
  bash "$ROOT/infra/postgres.sh" up
  DATABASE_URL="$(bash "$ROOT/infra/postgres.sh" url)"
  export DATABASE_URL
  "$PYTHON" -m migrations >/dev/null
  local s
  for s in "${SERVICES[@]}"; do start_service $s; done
  for s in "${SERVICES[@]}"; do wait_healthy $s; done
  start_supervisor
}

# stop_marked ROLE NAME: TERM every marked process (of ROLE, if given), wait up to 30 s, then KILL.
stop_marked() {
  local pids pid
  pids=$(marked_pids "$1")
  [ -n "$pids" ] || return 0
  log "stopping $2 left by an earlier run: pid(s)" $pids
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 300); do [ -n "$(marked_pids "$1")" ] || return 0; sleep 0.1; done
  pids=$(marked_pids "$1")
  [ -z "$pids" ] || { log "$2 did not stop in 30 s; killing pid(s)" $pids; kill -KILL $pids 2>/dev/null || true; }
}

down() {
  local i s
  # First the supervisor (it would restart what is being stopped): the one of the pid file, then any
  # other of this state folder.
  stop_pid "$SUPERVISOR_PID" supervisor
  stop_marked supervisor "a supervisor"
  for (( i=${#SERVICES[@]}-1; i>=0; i-- )); do
    s=(${SERVICES[$i]}); stop_pid "$SVC_DIR/${s[0]}.pid" "${s[0]}"
  done
  stop_marked "" "services"  # restarted by a supervisor whose pid file was lost, or their children
  if [ -f "$SVC_DIR/up-started-kafka" ]; then bash "$ROOT/infra/kafka.sh" down; rm -f "$SVC_DIR/up-started-kafka"
  else log "kafka left running: up did not start it"; fi
  # Without the DATABASE_URL `up` exported (a `down` run from `run` inherits it): with it set,
  # postgres.sh takes the server for an external one and silently leaves it running.
  if [ -f "$SVC_DIR/up-started-postgres" ]; then env -u DATABASE_URL bash "$ROOT/infra/postgres.sh" down; rm -f "$SVC_DIR/up-started-postgres"
  else log "postgres left running: up did not start it"; fi
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
  if pid_alive "$SUPERVISOR_PID"; then echo "supervisor: running (pid $(cat "$SUPERVISOR_PID"))"
  else echo "supervisor: stopped"; fi
}

run() {
  follower=
  # On Ctrl-C: ignore further signals (a second Ctrl-C must not cut the stop short) and stop everything
  # in a fresh process: run inside this interrupted shell's trap, `down` once reported a live
  # supervisor "not running" (and removed its pid file).
  stopping() {
    trap '' INT TERM HUP
    echo
    [ -z "$follower" ] || kill "$follower" 2>/dev/null || true
    bash "$ROOT/infra/stack.sh" down
    exit 0
  }
  trap stopping INT TERM HUP
  up
  echo
  echo "  byok-credits is up:  http://127.0.0.1:$CHAT_PORT/   (Ctrl-C stops everything)"
  echo "  logs: $LOG_DIR   (a part that dies is restarted; the supervisor's lines follow)"
  echo
  tail -n0 -F "$SUPERVISOR_LOG" 2>/dev/null &
  follower=$!
  while true; do sleep 1; done
}

case "${1:-}" in
  up) up ;; down) down ;; status) status ;; run) run ;; supervise) supervise ;;
  *) echo "usage: $0 up|down|run|status" >&2; exit 2 ;;
esac
