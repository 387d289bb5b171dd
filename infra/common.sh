# Shared by the infra scripts: where things live and how to wait for them.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${BYOK_STATE_DIR:-$ROOT/.run}"
CACHE_DIR="${BYOK_CACHE_DIR:-$HOME/.cache/byok-credits}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$STATE_DIR" "$CACHE_DIR"

log() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# pid_alive PIDFILE: true when the file names a live process (a zombie, killed but not yet reaped,
# is not alive).
pid_alive() {
  local pid stat
  [ -f "$1" ] || return 1
  read -r pid <"$1" || [ -n "$pid" ] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Without forking where /proc exists (the stack's supervisor asks this twice a second per part).
  if read -r stat 2>/dev/null <"/proc/$pid/stat"; then
    stat=${stat##*) }; [ "${stat%% *}" != Z ]; return
  fi
  case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z*|"") return 1 ;; esac
}

# port_open HOST PORT
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# stop_pid PIDFILE NAME: TERM, wait up to 30 s, then KILL; removes the pid file.
stop_pid() {
  local pidfile=$1 name=$2 pid
  if ! pid_alive "$pidfile"; then rm -f "$pidfile"; log "$name is not running"; return 0; fi
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in 30 s; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
  log "$name stopped"
}
