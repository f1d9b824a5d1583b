#!/usr/bin/env bash
# The capturer alone over one huge source transaction: its time and peak
# resident memory (BENCHMARKS.md, "The capturer over one huge transaction").
#
#   scripts/capture-memory.sh [ROWS] [insert|update] [BINARY]
#
# ROWS (default 1,000,000) rows of the demo's customers_v3 in one INSERT,
# or one UPDATE of ROWS rows inserted before the capturer starts. Starts
# `BINARY capture --side fno` (default: the release build) on a fresh
# database of the local stack, runs the statement, waits until the slot's
# confirmed position passes its end (every record acknowledged by Kafka)
# and prints the time and the capturer's VmHWM. Drops its database, slot
# and origins after; its two topics (`capmem-<pid>.capture.fno`,
# `capmem-<pid>.errors`) stay on the broker. Needs the stack's environment
# (DUALWRITE_STATE_DIR and ports as for scripts/stack.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS="${1:-1000000}"
MODE="${2:-insert}"
BIN="${3:-target/release/dualwrite}"
[ "$BIN" != target/release/dualwrite ] || cargo build --release --bin dualwrite
stack_env="$(scripts/stack.sh up)" || exit 1
eval "$stack_env"
DB="dw_capmem_$$"
psql_() { psql -X -q -A -t "$DUALWRITE_PG_URL/$1" -c "$2"; }
psql_ postgres "CREATE DATABASE $DB"
DIR="$(mktemp -d /tmp/dualwrite-capture-memory.XXXXXX)"
CP=
cleanup() {
  [ -z "$CP" ] || { kill "$CP" 2>/dev/null || true; wait "$CP" 2>/dev/null || true; }
  for _ in $(seq 1 40); do
    psql_ postgres "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" \
      >/dev/null 2>&1 && break
    sleep 0.5
  done
  psql_ postgres "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  for o in $(psql_ postgres "SELECT roname FROM pg_replication_origin WHERE roname LIKE 'dualwrite_capmem_$$%'"); do
    psql_ postgres "SELECT pg_replication_origin_drop('$o')" >/dev/null || true
  done
  rm -rf "$DIR"
}
trap cleanup EXIT
psql -X -q "$DUALWRITE_PG_URL/$DB" -f deploy/demo/fno.sql >/dev/null
PORT="${DUALWRITE_PG_URL##*:}"
sed -e "s/dbname = \"dualwrite_fno\"/dbname = \"$DB\"/" -e "s/port = 55432/port = $PORT/" \
  -e "s/topic_prefix = \"dualwrite\"/topic_prefix = \"capmem-$$\"/" \
  -e "s/bootstrap_servers = \"127.0.0.1:19092\"/bootstrap_servers = \"$DUALWRITE_BOOTSTRAP_SERVERS\"/" \
  deploy/demo/dualwrite.toml >"$DIR/dualwrite.toml"
NEW="SELECT 'H' || lpad(i::text, 7, '0'), repeat('n', 190) || i FROM generate_series(1, $ROWS) i"
[ "$MODE" != update ] || psql_ "$DB" "INSERT INTO customers_v3 (customeraccount, organizationname) $NEW"
DUALWRITE_CONFIG="$DIR/dualwrite.toml" "$BIN" capture --side fno >"$DIR/capture.log" 2>&1 &
CP=$!
until [ "$(psql_ postgres "SELECT count(*) FROM pg_replication_slots WHERE database = '$DB' AND confirmed_flush_lsn IS NOT NULL")" = 1 ]; do
  kill -0 "$CP" || { cat "$DIR/capture.log"; exit 1; }
  sleep 0.2
done
IDLE=$(awk '/VmHWM/ {print $2}' "/proc/$CP/status")
T0=$(date +%s.%N)
if [ "$MODE" = update ]; then
  psql_ "$DB" "UPDATE customers_v3 SET organizationname = repeat('u', 190) || customeraccount WHERE customeraccount LIKE 'H%'"
else
  psql_ "$DB" "INSERT INTO customers_v3 (customeraccount, organizationname) $NEW"
fi
END=$(psql_ "$DB" "SELECT pg_current_wal_lsn()")
until [ "$(psql_ postgres "SELECT confirmed_flush_lsn >= '$END' FROM pg_replication_slots WHERE database = '$DB'")" = t ]; do
  kill -0 "$CP" || { echo "the capturer died"; tail -20 "$DIR/capture.log"; exit 1; }
  sleep 0.5
done
T1=$(date +%s.%N)
PEAK=$(awk '/VmHWM/ {print $2}' "/proc/$CP/status")
echo "capture-memory mode=$MODE rows=$ROWS captured_secs=$(echo "$T1 - $T0" | bc) idle_peak_kib=$IDLE peak_kib=$PEAK"
