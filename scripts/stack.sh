#!/usr/bin/env bash
# Local stack for the demo and the tests, on loopback, no Docker:
#   - PostgreSQL 15 (Debian's package) with wal_level=logical and wal2json,
#   - the tansu Kafka-protocol broker with SQLite storage.
# Idempotent: `up` installs what is missing, starts what is not running, and
# prints the endpoints as shell assignments.
#
#   scripts/stack.sh up|down|status|env|kill-kafka|kill-postgres
#
# Environment:
#   DUALWRITE_STATE_DIR  where data and logs live (default /tmp/dualwrite-stack)
#   DUALWRITE_STACK_PG_PORT    PostgreSQL port            (default 55432)
#   DUALWRITE_STACK_KAFKA_PORT broker port                (default 19092)
#   DUALWRITE_STACK_PG_VERSION PostgreSQL major version   (default 15)
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
max_wal_senders = 20
max_connections = 300
max_worker_processes = 16
# A disposable development stack: trade durability across an OS crash for speed.
fsync = off
full_page_writes = off
CONF
  fi
  if as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    return 0
  fi
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 9>&-
}

kafka_up() {
  local tansu
  tansu="$("$HERE/install-tansu.sh")"
  mkdir -p "$KAFKA_DIR"
  if kafka_alive; then return 0; fi
  log "starting tansu broker on 127.0.0.1:$KAFKA_PORT"
  (
    cd "$KAFKA_DIR"
    nohup "$tansu" broker \
      --storage-engine "sqlite://tansu.db" \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      >>"$KAFKA_LOG" 2>&1 9>&- &
    echo $! >"$KAFKA_DIR/tansu.pid"
  )
  local deadline=$((SECONDS + 60))
  until kafka_alive; do
    if [ $SECONDS -ge $deadline ]; then
      log "broker did not start; last lines of $KAFKA_LOG:"; tail -20 "$KAFKA_LOG" >&2; exit 1
    fi
    sleep 0.2
  done
}

kafka_alive() {
  [ -f "$KAFKA_DIR/tansu.pid" ] && kill -0 "$(cat "$KAFKA_DIR/tansu.pid")" 2>/dev/null &&
    (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null
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
    if [ -f "$KAFKA_DIR/tansu.pid" ]; then kill "$(cat "$KAFKA_DIR/tansu.pid")" 2>/dev/null || true; rm -f "$KAFKA_DIR/tansu.pid"; fi
    if [ -f "$PG_DATA/PG_VERSION" ]; then as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast stop >/dev/null 2>&1 || true; fi
    ;;
  kill-kafka)
    # Fault injection: the broker dies at once (`up` starts it again).
    if [ -f "$KAFKA_DIR/tansu.pid" ]; then kill -9 "$(cat "$KAFKA_DIR/tansu.pid")" 2>/dev/null || true; rm -f "$KAFKA_DIR/tansu.pid"; fi
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
  *)
    echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
