#!/usr/bin/env bash
# A real Apache Kafka 4.x (KRaft, broker+controller) on loopback, from the jars on Maven Central:
# one node (the default), or with BYOK_KAFKA_BROKERS=3 a three-node cluster whose topics are
# replicated three times with min.insync.replicas=2. Jars are cached in ~/.cache/byok-credits; data,
# log and pid live in .run/kafka (.run/kafka-cluster/node-N for the cluster).
#   up         fetch jars once, format storage once, start every node not running, wait until each
#              answers, create topics
#   down       stop the nodes this script started (and nothing else)
#   status     say whether each node runs
#   bootstrap  the bootstrap servers (all nodes)
#   kill N     SIGKILL node N (fault tests); `up` brings it back
#   stop N     stop node N alone, gracefully; `up` brings it back
#   roll       rolling restart of the cluster, one node at a time, each only once all replicas are in sync
# With KAFKA_BOOTSTRAP_SERVERS pointing elsewhere and BYOK_EXTERNAL_KAFKA=1, nothing is started.
set -euo pipefail
source "$(dirname "$0")/common.sh"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/infra/kafka/pom.xml")"
LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
BROKERS="${BYOK_KAFKA_BROKERS:-1}"
PORT="${BYOK_KAFKA_PORT:-9092}"
case "$BROKERS" in 1|3) ;; *) die "BYOK_KAFKA_BROKERS must be 1 or 3, not $BROKERS" ;; esac
if [ "$BROKERS" = 1 ]; then
  # One node, broker and controller: what `make run` and the tests use.
  K_DIR="$STATE_DIR/kafka"
  CONTROLLER_PORT="${BYOK_KAFKA_CONTROLLER_PORT:-9093}"
  HEAP="${BYOK_KAFKA_HEAP:-1G}"
  RF=1 MIN_ISR=1
else
  # Three nodes, each broker and controller (a three-voter KRaft quorum): node i listens on PORT+i-1
  # and its controller on CONTROLLER_PORT+i-1. Every topic is replicated three times and takes a
  # write once two replicas have it (acks=all in every producer here), so one node may die.
  K_DIR="$STATE_DIR/kafka-cluster"
  CONTROLLER_PORT="${BYOK_KAFKA_CONTROLLER_PORT:-$((PORT + 100))}"
  HEAP="${BYOK_KAFKA_HEAP:-512M}"
  RF=3 MIN_ISR=2
fi

# node_dir I: where node I keeps its config, data, log and pid
node_dir() { if [ "$BROKERS" = 1 ]; then echo "$K_DIR"; else echo "$K_DIR/node-$1"; fi; }
node_port() { echo $((PORT + $1 - 1)); }
node_controller_port() { echo $((CONTROLLER_PORT + $1 - 1)); }
node_pid() { echo "$(node_dir "$1")/kafka.pid"; }
node_log() { echo "$(node_dir "$1")/server.log"; }
nodes() { seq 1 "$BROKERS"; }

bootstrap() {
  local i out=()
  for i in $(nodes); do out+=("127.0.0.1:$(node_port "$i")"); done
  (IFS=,; echo "${out[*]}")
}

fetch_jars() {
  [ -f "$LIBS/.complete" ] && return
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka jars"
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
  rm -rf "$LIBS"
  (cd "$ROOT/infra/kafka" && mvn -q -B dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$LIBS") || die "mvn could not fetch the Kafka jars"
  touch "$LIBS/.complete"
}

java_run() {
  java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" -cp "$LIBS/*" "$@"
}

write_config() {
  local i=$1 dir quorum voters=() j
  dir=$(node_dir "$i")
  mkdir -p "$dir"
  if [ "$BROKERS" = 1 ]; then
    quorum="controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT"
  else
    for j in $(nodes); do voters+=("$j@127.0.0.1:$(node_controller_port "$j")"); done
    quorum="controller.quorum.voters=$(IFS=,; echo "${voters[*]}")"
  fi
  cat >"$dir/server.properties" <<CONF
process.roles=broker,controller
node.id=$i
$quorum
listeners=PLAINTEXT://127.0.0.1:$(node_port "$i"),CONTROLLER://127.0.0.1:$(node_controller_port "$i")
advertised.listeners=PLAINTEXT://127.0.0.1:$(node_port "$i")
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=6
default.replication.factor=$RF
min.insync.replicas=$MIN_ISR
unclean.leader.election.enable=false
offsets.topic.replication.factor=$RF
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=$RF
transaction.state.log.min.isr=$MIN_ISR
share.coordinator.state.topic.replication.factor=$RF
share.coordinator.state.topic.min.isr=$MIN_ISR
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# 1 MB payloads must reach the consumer (and the DLQ) to be refused there with a reason.
message.max.bytes=4194304
replica.fetch.max.bytes=4194304
log.retention.check.interval.ms=300000
CONF
  if [ "$BROKERS" != 1 ]; then
    # A node that stops heartbeating is fenced after 3 s (default 9 s) and its partitions get new
    # leaders then: the failover time under a SIGKILL. A replica that stops fetching leaves the
    # in-sync set after 10 s (default 30 s); a node that comes back leads its partitions again soon
    # (preferred replica election every 5 s).
    cat >>"$dir/server.properties" <<CONF
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
replica.lag.time.max.ms=10000
leader.imbalance.check.interval.seconds=5
CONF
  fi
}

cluster_id() {
  local file="$K_DIR/cluster.id"
  [ -s "$file" ] || java_run kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 >"$file"
  cat "$file"
}

format_storage() {
  local i=$1 dir mode=()
  dir=$(node_dir "$i")
  [ -f "$dir/data/meta.properties" ] && return
  log "formatting KRaft storage in $dir/data"
  [ "$BROKERS" = 1 ] && mode=(--standalone)  # else the voters are in the config (a static quorum)
  java_run kafka.tools.StorageTool format "${mode[@]}" -t "$(cluster_id)" -c "$dir/server.properties" \
    >"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; die "could not format Kafka storage"; }
}

start_node() {
  local i=$1 port
  port=$(node_port "$i")
  if pid_alive "$(node_pid "$i")"; then log "kafka node $i already running (pid $(cat "$(node_pid "$i")"))"; return; fi
  if port_open 127.0.0.1 "$port"; then die "port $port is taken by a process this script did not start"; fi
  write_config "$i"
  format_storage "$i"
  nohup java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" -cp "$LIBS/*" \
    kafka.Kafka "$(node_dir "$i")/server.properties" >>"$(node_log "$i")" 2>&1 </dev/null &
  echo $! >"$(node_pid "$i")"
}

wait_ready() {
  local t0=$SECONDS i
  for i in $(nodes); do
    until port_open 127.0.0.1 "$(node_port "$i")"; do
      pid_alive "$(node_pid "$i")" || { tail -n 30 "$(node_log "$i")" >&2; die "Kafka node $i exited while starting (log: $(node_log "$i"))"; }
      (( SECONDS - t0 > 90 )) && die "Kafka node $i did not open port $(node_port "$i") in 90 s (log: $(node_log "$i"))"
      sleep 0.2
    done
  done
  # An open port is not yet a working broker: ask for metadata and create the topics.
  KAFKA_BOOTSTRAP_SERVERS="$(bootstrap)" "$PYTHON" -m infra.topics --wait 90 \
    || die "Kafka answered on $(bootstrap) but topic creation failed"
}

# wait_all WHAT: wait for every background job; fail if one failed
wait_all() {
  local job failed=0
  for job in $(jobs -p); do wait "$job" || failed=1; done
  (( failed == 0 )) || die "$1 failed"
}

up() {
  local i t0
  if [ "${BYOK_EXTERNAL_KAFKA:-0}" = 1 ]; then
    log "using external Kafka at ${KAFKA_BOOTSTRAP_SERVERS:?}"; "$PYTHON" -m infra.topics --wait 60; return
  fi
  command -v java >/dev/null || die "a JDK 17+ is needed to run Kafka"
  fetch_jars
  t0=$(date +%s%N)
  for i in $(nodes); do
    write_config "$i"
    [ -f "$(node_dir "$i")/data/meta.properties" ] || { cluster_id >/dev/null; format_storage "$i" & }
  done
  wait_all "formatting"  # in parallel: each format is a JVM start
  for i in $(nodes); do start_node "$i"; done
  wait_ready
  log "kafka $KAFKA_VERSION up on $(bootstrap) ($BROKERS node(s)) in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
}

down() {
  local i
  [ "${BYOK_EXTERNAL_KAFKA:-0}" = 1 ] && return
  # All at once: a node stopped after the others would wait for a quorum that is gone.
  for i in $(nodes); do pid_alive "$(node_pid "$i")" && kill -TERM "$(cat "$(node_pid "$i")")" 2>/dev/null; done
  for i in $(nodes); do stop_pid "$(node_pid "$i")" "kafka node $i"; done
}

# kill I: SIGKILL node I (fault tests); `up` starts it again.
# check_node N: N names one node of this cluster (a typo, or a forgotten BYOK_KAFKA_BROKERS=3, must not
# stop the one broker a developer's stack runs on)
check_node() {
  local n=${1:-}
  (( BROKERS > 1 )) || die "one Kafka node runs here (BYOK_KAFKA_BROKERS=1); 'down' stops it. Node commands are for BYOK_KAFKA_BROKERS=3"
  [[ "$n" =~ ^[0-9]+$ ]] && (( n >= 1 && n <= BROKERS )) || die "name a node from 1 to $BROKERS, not '$n'"
}

kill_node() {
  local pidfile
  check_node "${1:-}"
  pidfile=$(node_pid "$1")
  pid_alive "$pidfile" || die "kafka node $1 is not running"
  kill -KILL "$(cat "$pidfile")"
  log "kafka node $1 killed (pid $(cat "$pidfile"))"
}

# stop I: stop node I alone, gracefully (a controlled shutdown hands its leaderships to the others).
stop_node() {
  check_node "${1:-}"
  pid_alive "$(node_pid "$1")" || die "kafka node $1 is not running"
  stop_pid "$(node_pid "$1")" "kafka node $1"
}

# roll: a rolling restart, one node at a time; the next goes down only once every partition has all
# its replicas in sync again, so with min.insync.replicas=2 writers with acks=all never stop.
roll() {
  local i t0
  (( BROKERS > 1 )) || die "a rolling restart needs a cluster (BYOK_KAFKA_BROKERS=3)"
  for i in $(nodes); do
    pid_alive "$(node_pid "$i")" || die "kafka node $i is not running: start it with 'bash infra/kafka.sh up' first, then roll"
  done
  for i in $(nodes); do
    KAFKA_BOOTSTRAP_SERVERS="$(bootstrap)" "$PYTHON" -m infra.topics --wait 120 --in-sync \
      || die "not every replica is in sync: not taking node $i down"
    t0=$(date +%s%N)
    stop_node "$i"
    start_node "$i"
    until port_open 127.0.0.1 "$(node_port "$i")"; do
      pid_alive "$(node_pid "$i")" || die "Kafka node $i exited while restarting (log: $(node_log "$i"))"
      sleep 0.2
    done
    log "kafka node $i restarted in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  done
  KAFKA_BOOTSTRAP_SERVERS="$(bootstrap)" "$PYTHON" -m infra.topics --wait 120 --in-sync \
    || die "replicas did not get back in sync after the rolling restart"
  log "rolling restart of $BROKERS nodes done; every replica in sync"
}

status() {
  local i rc=0
  for i in $(nodes); do
    if pid_alive "$(node_pid "$i")"; then echo "kafka node $i: running on $(node_port "$i") (pid $(cat "$(node_pid "$i")"))"
    else echo "kafka node $i: stopped"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  up) up ;; down) down ;; status) status ;; fetch) fetch_jars ;; data-dir) echo "$(node_dir 1)/data" ;;
  bootstrap) bootstrap ;; pid) cat "$(node_pid "${2:?node number}")" ;; kill) kill_node "${2:-}" ;;
  stop) stop_node "${2:-}" ;; roll) roll ;;
  *) echo "usage: $0 up|down|status|fetch|data-dir|bootstrap|pid N|kill N|stop N|roll" >&2; exit 2 ;;
esac
