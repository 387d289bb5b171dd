#!/usr/bin/env bash
# A real single-node Apache Kafka 4.x (KRaft, broker+controller) on loopback, from the jars on Maven
# Central. Jars are cached in ~/.cache/byok-credits; data, log and pid live in .run/kafka.
#   up      fetch jars once, format storage once, start, wait until it answers, create topics
#   down    stop the broker this script started (and nothing else)
#   status  say whether it runs
# With KAFKA_BOOTSTRAP_SERVERS pointing elsewhere and BYOK_EXTERNAL_KAFKA=1, nothing is started.
set -euo pipefail
source "$(dirname "$0")/common.sh"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/infra/kafka/pom.xml")"
LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
K_DIR="$STATE_DIR/kafka"
K_DATA="$K_DIR/data"
K_CONF="$K_DIR/server.properties"
K_LOG="$K_DIR/server.log"
K_PID="$K_DIR/kafka.pid"
PORT="${BYOK_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${BYOK_KAFKA_CONTROLLER_PORT:-9093}"
HEAP="${BYOK_KAFKA_HEAP:-1G}"

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
  mkdir -p "$K_DIR"
  cat >"$K_CONF" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$K_DATA
num.partitions=6
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# 1 MB payloads must reach the consumer (and the DLQ) to be refused there with a reason.
message.max.bytes=4194304
replica.fetch.max.bytes=4194304
log.retention.check.interval.ms=300000
CONF
}

format_storage() {
  [ -f "$K_DATA/meta.properties" ] && return
  log "formatting KRaft storage in $K_DATA"
  local cluster_id
  cluster_id=$(java_run kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)
  java_run kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$K_CONF" >"$K_DIR/format.log" 2>&1 \
    || { cat "$K_DIR/format.log" >&2; die "could not format Kafka storage"; }
}

wait_ready() {
  local t0=$SECONDS
  until port_open 127.0.0.1 "$PORT"; do
    pid_alive "$K_PID" || { tail -n 30 "$K_LOG" >&2; die "Kafka exited while starting (log: $K_LOG)"; }
    (( SECONDS - t0 > 90 )) && die "Kafka did not open port $PORT in 90 s (log: $K_LOG)"
    sleep 0.2
  done
  # An open port is not yet a working broker: ask for metadata and create the topics.
  KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:$PORT" "$PYTHON" -m infra.topics --wait 90 \
    || die "Kafka answered on $PORT but topic creation failed"
}

up() {
  if [ "${BYOK_EXTERNAL_KAFKA:-0}" = 1 ]; then
    log "using external Kafka at ${KAFKA_BOOTSTRAP_SERVERS:?}"; "$PYTHON" -m infra.topics --wait 60; return
  fi
  if pid_alive "$K_PID"; then log "kafka already running (pid $(cat "$K_PID"))"; wait_ready; return; fi
  if port_open 127.0.0.1 "$PORT"; then die "port $PORT is taken by a process this script did not start"; fi
  command -v java >/dev/null || die "a JDK 17+ is needed to run Kafka"
  fetch_jars
  write_config
  format_storage
  local t0; t0=$(date +%s%N)
  nohup java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" -cp "$LIBS/*" \
    kafka.Kafka "$K_CONF" >>"$K_LOG" 2>&1 </dev/null &
  echo $! >"$K_PID"
  wait_ready
  log "kafka $KAFKA_VERSION up on 127.0.0.1:$PORT in $(( ($(date +%s%N) - t0) / 1000000 )) ms (pid $(cat "$K_PID"))"
}

down() {
  [ "${BYOK_EXTERNAL_KAFKA:-0}" = 1 ] && return
  stop_pid "$K_PID" kafka
}

status() {
  if pid_alive "$K_PID"; then echo "kafka: running on $PORT (pid $(cat "$K_PID"))"; else echo "kafka: stopped"; return 1; fi
}

case "${1:-}" in
  up) up ;; down) down ;; status) status ;; fetch) fetch_jars ;; data-dir) echo "$K_DATA" ;;
  *) echo "usage: $0 up|down|status|fetch|data-dir" >&2; exit 2 ;;
esac
