#!/usr/bin/env bash
# Local stack for the demo and the tests, on loopback, no Docker:
#   - PostgreSQL 15 (Debian's package) with wal_level=logical and wal2json,
#   - Apache Kafka (one KRaft node, broker and controller), fetched from Maven
#     Central once (deploy/kafka/pom.xml) and cached.
# Idempotent: `up` installs what is missing, starts what is not running, and
# prints the endpoints as shell assignments.
#
#   scripts/stack.sh up|down|status|env|check|kill-kafka|kill-postgres
#
# Environment:
#   DUALWRITE_STATE_DIR  where data and logs live (default /tmp/dualwrite-stack)
#   DUALWRITE_STACK_PG_PORT    PostgreSQL port            (default 55432)
#   DUALWRITE_STACK_KAFKA_PORT broker port                (default 19092)
#   DUALWRITE_STACK_KAFKA_CONTROLLER_PORT  KRaft controller port (default broker port + 1000)
#   DUALWRITE_STACK_PG_VERSION PostgreSQL major version   (default 15)
#   DUALWRITE_CACHE            download cache             (default ~/.cache/dualwrite)
#   DUALWRITE_STACK_KAFKA_HEAP broker heap                (default 512m)
#   DUALWRITE_STACK_KAFKA_PROPERTIES  broker settings added to deploy/kafka/server.properties,
#                              separated by spaces or newlines (e.g. "offsets.retention.minutes=1")
#   JAVA_HOME                  the Java (17+) to run the broker with (default: java on PATH)
# (Not DUALWRITE_KAFKA_*: the services read those as Kafka client properties.)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${DUALWRITE_STATE_DIR:-/tmp/dualwrite-stack}"
PG_PORT="${DUALWRITE_STACK_PG_PORT:-55432}"
KAFKA_PORT="${DUALWRITE_STACK_KAFKA_PORT:-19092}"
PG_VERSION="${DUALWRITE_STACK_PG_VERSION:-15}"
PG_BIN=/usr/lib/postgresql/$PG_VERSION/bin
PG_DATA="$STATE/pg"
PG_LOG="$STATE/pg.log"
KAFKA_DIR="$STATE/kafka"
KAFKA_LOG="$STATE/kafka.log"
KAFKA_CONTROLLER_PORT="${DUALWRITE_STACK_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1000))}"
CACHE="${DUALWRITE_CACHE:-$HOME/.cache/dualwrite}"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/../deploy/kafka/pom.xml")"
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"

log() { echo "stack: $*" >&2; }

need_root_or_sudo() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
  # PostgreSQL with wal2json for the sides; a C toolchain, OpenSSL and zlib
  # headers for librdkafka, which the rdkafka crate builds from source.
  # promtool (Debian's prometheus package) checks the metrics and alert rules.
  local want=(postgresql-$PG_VERSION postgresql-$PG_VERSION-wal2json build-essential pkg-config libssl-dev zlib1g-dev prometheus)
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    need_root_or_sudo apt-get update -qq
    need_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

# PostgreSQL refuses to run as root: run it as the `postgres` user then.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_up() {
  mkdir -p "$STATE"
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$STATE" 2>/dev/null || true; chmod 755 "$STATE"; fi
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    log "initialising PostgreSQL in $PG_DATA"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$PG_DATA/postgresql.conf" <<CONF
# dualwrite local stack
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$STATE'
wal_level = logical
max_replication_slots = 200
max_wal_senders = 100
max_connections = 300
max_worker_processes = 16
# A disposable development stack: trade durability across an OS crash for speed.
fsync = off
full_page_writes = off
CONF
  fi
  # Newer minor releases (15.20 on) name the output plugins replication
  # users may load; wal2json must be on that list. Older ones do not know the
  # setting and would refuse to start with it.
  if "$PG_BIN/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null &&
    ! grep -q '^output_plugin_libraries' "$PG_DATA/postgresql.conf"; then
    echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'" >>"$PG_DATA/postgresql.conf"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" reload >/dev/null 2>&1 || true
  fi
  if as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    return 0
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null; then
    log "port $PG_PORT is taken by another process (not this stack's PostgreSQL; another stack,"
    log "with another DUALWRITE_STATE_DIR?): stop it, or choose another port (DUALWRITE_STACK_PG_PORT)"
    exit 1
  fi
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 9>&-
}

# The java command: $JAVA_HOME/bin/java when JAVA_HOME is set, else java on PATH.
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

# Apache Kafka 4 runs on Java 17 or newer.
java_check() {
  local v major
  if ! v="$("$JAVA" -version 2>&1 | head -1)" || [ -z "$v" ]; then
    log "Apache Kafka needs Java 17 or newer, and \`$JAVA' was not found."
    log "Install it (Debian/Ubuntu: sudo apt-get install openjdk-17-jre-headless) or set JAVA_HOME to a JDK 17+."
    exit 1
  fi
  major="$(sed -n 's/.*version "\([0-9]*\)[."].*/\1/p' <<<"$v")"
  [ "$major" = 1 ] && major=8
  if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    log "Apache Kafka needs Java 17 or newer; \`$JAVA' is: $v"
    log "Install one (Debian/Ubuntu: sudo apt-get install openjdk-17-jre-headless) or set JAVA_HOME to a JDK 17+."
    exit 1
  fi
}

mvn_check() {
  if ! command -v mvn >/dev/null; then
    log "fetching Apache Kafka $KAFKA_VERSION needs Maven (mvn) on PATH (first run only)."
    log "Install it (Debian/Ubuntu: sudo apt-get install maven), or copy the jars into $KAFKA_LIBS."
    exit 1
  fi
}

# Apache Kafka's jars (the broker and what it needs), fetched once from Maven
# Central (through a Maven repository of its own, removed afterwards: the
# cache holds only the jars). Serialised: parallel `up`s share the cache.
kafka_fetch() {
  if [ -f "$KAFKA_LIBS/.complete" ]; then return 0; fi
  mvn_check
  mkdir -p "$CACHE"
  (
    flock 8
    if [ -f "$KAFKA_LIBS/.complete" ]; then exit 0; fi
    log "fetching Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_LIBS (first run only)"
    local tmp; tmp="$(mktemp -d "$CACHE/kafka-fetch.XXXXXX")"
    if ! mvn -q -B -Dmaven.repo.local="$tmp/m2" -f "$HERE/../deploy/kafka/pom.xml" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
      cat "$tmp/mvn.log" >&2; rm -rf "$tmp"
      log "fetching Apache Kafka failed (Maven's messages above): is Maven Central reachable"
      log "(a proxy or mirror goes in ~/.m2/settings.xml)?"
      exit 1
    fi
    rm -rf "$KAFKA_LIBS"; mkdir -p "$(dirname "$KAFKA_LIBS")"
    mv "$tmp/libs" "$KAFKA_LIBS"; rm -rf "$tmp"
    touch "$KAFKA_LIBS/.complete"
  ) 8>"$CACHE/kafka-$KAFKA_VERSION.lock"
}

# The java command line for a Kafka main class.
kafka_java_args() {
  JAVA_ARGS=("$JAVA" -Xmx"${DUALWRITE_STACK_KAFKA_HEAP:-512m}" -Xms128m -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -Djava.awt.headless=true -Dkafka.logs.dir="$KAFKA_DIR/logs"
    -Dlog4j2.configurationFile="$HERE/../deploy/kafka/log4j2.yaml"
    -cp "$KAFKA_LIBS/*")
}

# deploy/kafka/server.properties for this stack, with the extra settings
# (later lines win).
kafka_properties() {
  sed -e "s#@PORT@#$KAFKA_PORT#; s#@CONTROLLER_PORT@#$KAFKA_CONTROLLER_PORT#; s#@DATA@#$KAFKA_DIR/data#" \
    "$HERE/../deploy/kafka/server.properties"
  local p props
  read -r -a props <<<"$(printf '%s' "${DUALWRITE_STACK_KAFKA_PROPERTIES:-}" | tr '\n' ' ')"
  for p in "${props[@]}"; do
    case "$p" in
      *=*) echo "$p" ;;
      *) log "DUALWRITE_STACK_KAFKA_PROPERTIES: \`$p' is not name=value"; exit 2 ;;
    esac
  done
}

kafka_up() {
  java_check
  kafka_fetch
  mkdir -p "$KAFKA_DIR/logs"
  if kafka_alive; then return 0; fi
  local port
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      log "port $port is taken by another process (not this stack's broker): stop it, or choose"
      log "other ports (DUALWRITE_STACK_KAFKA_PORT, DUALWRITE_STACK_KAFKA_CONTROLLER_PORT)"
      exit 1
    fi
  done
  kafka_properties >"$KAFKA_DIR/server.properties"
  if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
    log "formatting a KRaft store in $KAFKA_DIR/data"
    local cluster
    kafka_java_args
    cluster="$("${JAVA_ARGS[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null)"
    "${JAVA_ARGS[@]}" kafka.tools.StorageTool format --standalone -t "$cluster" \
      -c "$KAFKA_DIR/server.properties" >>"$KAFKA_LOG" 2>&1
  fi
  log "starting Apache Kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT"
  kafka_java_args
  KAFKA_LOG_FROM=$(( $(wc -c <"$KAFKA_DIR/logs/server.log" 2>/dev/null || echo 0) + 1 ))
  (
    nohup "${JAVA_ARGS[@]}" kafka.Kafka "$KAFKA_DIR/server.properties" >>"$KAFKA_LOG" 2>&1 9>&- &
    echo $! >"$KAFKA_DIR/kafka.pid"
  )
  local deadline=$((SECONDS + 90))
  until kafka_ready; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$(cat "$KAFKA_DIR/kafka.pid")" 2>/dev/null; then
      log "broker did not start; last lines of $KAFKA_DIR/logs/server.log:"
      tail -20 "$KAFKA_DIR/logs/server.log" >&2 2>/dev/null || tail -20 "$KAFKA_LOG" >&2; exit 1
    fi
    sleep 0.2
  done
}

kafka_alive() {
  [ -f "$KAFKA_DIR/kafka.pid" ] && kill -0 "$(cat "$KAFKA_DIR/kafka.pid")" 2>/dev/null &&
    (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null
}

# Listening is not enough: the broker must have joined its own quorum (this
# start's log says so; the log keeps earlier starts' lines).
kafka_ready() {
  kafka_alive && tail -c "+${KAFKA_LOG_FROM:-1}" "$KAFKA_DIR/logs/server.log" 2>/dev/null | grep -q "Kafka Server started"
}

kafka_stop() { # kafka_stop SIGNAL
  [ -f "$KAFKA_DIR/kafka.pid" ] || return 0
  local pid; pid="$(cat "$KAFKA_DIR/kafka.pid")"
  kill "-$1" "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$KAFKA_DIR/kafka.pid"
}

print_env() {
  echo "DUALWRITE_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT"
  echo "DUALWRITE_PG_URL=postgres://postgres@127.0.0.1:$PG_PORT"
}

case "${1:-up}" in
  up)
    # Serialise concurrent `up`s (parallel test processes).
    mkdir -p "$(dirname "$STATE")"
    exec 9>"$STATE.lock"
    flock 9
    install_packages
    pg_up
    kafka_up
    print_env
    ;;
  down)
    kafka_stop TERM
    # A fast stop waits for walsenders to send the WAL to their clients; a
    # client that does not read keeps it waiting. This stack is disposable:
    # if the fast stop does not end within 60 s, stop it at once, so that
    # nothing is left running on the folder (a caller may remove it next).
    if [ -f "$PG_DATA/PG_VERSION" ]; then
      as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -t 60 stop >/dev/null 2>&1 ||
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
    fi
    ;;
  kill-kafka)
    # Fault injection: the broker dies at once (`up` starts it again).
    kafka_stop KILL
    ;;
  kill-postgres)
    # Fault injection: immediate shutdown, crash recovery on the next start.
    if [ -f "$PG_DATA/PG_VERSION" ]; then as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true; fi
    ;;
  status)
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1 && echo "postgres: running" || echo "postgres: stopped"
    kafka_alive && echo "kafka: running" || echo "kafka: stopped"
    ;;
  env)
    print_env
    ;;
  check)
    # The tools `up` needs that it does not install itself.
    java_check
    [ -f "$KAFKA_LIBS/.complete" ] || mvn_check
    echo "stack: java and Apache Kafka $KAFKA_VERSION ($KAFKA_LIBS) ready" >&2
    ;;
  *)
    echo "usage: $0 up|down|status|env|check|kill-kafka|kill-postgres" >&2; exit 2 ;;
esac
