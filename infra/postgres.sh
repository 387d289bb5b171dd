#!/usr/bin/env bash
# A project-owned PostgreSQL cluster: its own data folder (.run/postgres) and port (55432), so it
# never collides with a system one. `up` is idempotent; `down` stops only this cluster.
# With DATABASE_URL set, nothing is started: the given server is used as it is.
set -euo pipefail
source "$(dirname "$0")/common.sh"

PG_PORT="${BYOK_PG_PORT:-55432}"
PG_DIR="$STATE_DIR/postgres"
PG_DATA="$PG_DIR/data"
PG_LOG="$PG_DIR/postgres.log"
DB_USER=byok DB_PASS=byok DB_NAME=byok

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pg_ctl" ] && { echo "$d"; return; }; done
  command -v pg_ctl >/dev/null && { dirname "$(command -v pg_ctl)"; return; }
  return 1
}

ensure_installed() {
  pg_bin >/dev/null && return
  log "installing Debian's postgresql"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
}

# PostgreSQL refuses to run as root: as root, run it as the 'postgres' user.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() { as_owner "$(pg_bin)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

up() {
  if [ -n "${DATABASE_URL:-}" ]; then log "DATABASE_URL is set; using that server"; return; fi
  ensure_installed
  local bin; bin=$(pg_bin)
  mkdir -p "$PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DIR"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    log "initialising a cluster in $PG_DATA"
    as_owner "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log"
    cat >>"$PG_DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 200
shared_buffers = 256MB
log_min_messages = warning
CONF
  fi
  if running; then log "postgres already running on port $PG_PORT"
  else
    as_owner "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null
    log "postgres started on port $PG_PORT"
  fi
  as_owner "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qtA -v ON_ERROR_STOP=1 <<SQL >/dev/null
SELECT 'CREATE ROLE $DB_USER LOGIN SUPERUSER PASSWORD ''$DB_PASS'''
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') \gexec
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME') \gexec
SQL
}

down() {
  if [ -n "${DATABASE_URL:-}" ]; then return; fi
  if [ -f "$PG_DATA/PG_VERSION" ] && pg_bin >/dev/null && running; then
    as_owner "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
    log "postgres stopped"
  else
    log "postgres is not running"
  fi
}

status() {
  if [ -n "${DATABASE_URL:-}" ]; then echo "postgres: external (DATABASE_URL)"; return; fi
  if pg_bin >/dev/null && [ -f "$PG_DATA/PG_VERSION" ] && running; then echo "postgres: running on $PG_PORT"
  else echo "postgres: stopped"; return 1; fi
}

url() { echo "${DATABASE_URL:-postgresql://$DB_USER:$DB_PASS@127.0.0.1:$PG_PORT/$DB_NAME}"; }

# pid: the postmaster's process id (the benchmark reads the CPU of it and its backends); fails for an
# external server or a stopped cluster
pid() {
  [ -z "${DATABASE_URL:-}" ] || die "DATABASE_URL is set: the server is not this script's"
  running || die "postgres is not running"
  head -n 1 "$PG_DATA/postmaster.pid"
}

case "${1:-}" in
  up) up ;; down) down ;; status) status ;; url) url ;; pid) pid ;;
  *) echo "usage: $0 up|down|status|url|pid" >&2; exit 2 ;;
esac
