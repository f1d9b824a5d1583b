#!/usr/bin/env bash
# The demo sync, from a fresh machine:
#   1. installs and starts the local stack (PostgreSQL 15 + wal2json, Apache Kafka
#      fetched from Maven Central; needs Java 17+ and Maven),
#   2. builds dualwrite,
#   3. creates the two demo databases with a few hundred rows each,
#   4. runs every service (one process, in the background) and the operator
#      console (its address and token are printed at the end),
#   5. makes changes on each side and shows them arrive on the other.
# The sync keeps running afterwards; `scripts/demo.sh stop` stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="${DUALWRITE_STATE_DIR:-/tmp/dualwrite-stack}"
DEMO="$STATE/demo"
PIDFILE="$DEMO/dualwrite.pid"

stop_demo() {
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill "$(cat "$PIDFILE")"
    for _ in $(seq 1 100); do kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break; sleep 0.1; done
    echo "demo sync stopped"
  fi
  rm -f "$PIDFILE"
}

if [ "${1:-}" = "stop" ]; then stop_demo; exit 0; fi

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

STARTED=$SECONDS
step "Starting the local stack (the first run installs PostgreSQL packages and fetches Apache Kafka, ~1 min)"
# (eval of a failed command substitution would go on with nothing set)
stack_env="$(scripts/stack.sh up)" || { echo "demo: the local stack did not start (see above)" >&2; exit 1; }
eval "$stack_env"
PG="$DUALWRITE_PG_URL"
psql_fno() { psql -X -q -v ON_ERROR_STOP=1 "$PG/dualwrite_fno" "$@"; }
psql_dv() { psql -X -q -v ON_ERROR_STOP=1 "$PG/dualwrite_dataverse" "$@"; }

step "Building dualwrite (the first build takes a few minutes)"
cargo build --quiet --bin dualwrite
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/dualwrite"

step "Creating the demo databases (fno: finance-and-operations-like; dataverse: Dataverse-like)"
stop_demo
mkdir -p "$DEMO"
for db in dualwrite_fno dualwrite_dataverse; do
  psql -X -q "$PG/postgres" -c "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '$db' AND active_pid IS NOT NULL" >/dev/null
  for _ in $(seq 1 60); do
    psql -X -q "$PG/postgres" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$db'" >/dev/null 2>&1 && break
    sleep 0.5
  done
  psql -X -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
done
psql_fno -f deploy/demo/fno.sql
psql_dv -f deploy/demo/dataverse.sql
echo "customers_v3 rows: $(psql_fno -At -c 'SELECT count(*) FROM customers_v3'), accounts rows: $(psql_dv -At -c 'SELECT count(*) FROM accounts')"

# The demo configuration, pointed at this stack's PostgreSQL port
# (DUALWRITE_STACK_PG_PORT; the file says 55432, the default).
CONFIG="$DEMO/dualwrite.toml"
sed "s/port = 55432/port = ${PG##*:}/" deploy/demo/dualwrite.toml >"$CONFIG"
# A fresh topic prefix per demo run, so that old demo records are never replayed.
export DUALWRITE_TOPIC_PREFIX="demo-$(date +%s)"
export DUALWRITE_BOOTSTRAP_SERVERS
step "Running every service in one process (log: $DEMO/dualwrite.log, topics: $DUALWRITE_TOPIC_PREFIX.*)"
METRICS_ADDR="${DUALWRITE_METRICS_ADDR:-127.0.0.1:9464}"
# The operator console, on loopback; its token signs an operator in (a new
# one per demo run unless DUALWRITE_CONSOLE_TOKEN is set).
CONSOLE_ADDR="${DUALWRITE_CONSOLE_ADDR:-127.0.0.1:8080}"
export DUALWRITE_CONSOLE_TOKEN="${DUALWRITE_CONSOLE_TOKEN:-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}"
nohup "$BIN" --config "$CONFIG" --metrics-addr "$METRICS_ADDR" run --console "$CONSOLE_ADDR" >"$DEMO/dualwrite.log" 2>&1 &
echo $! >"$PIDFILE"

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    if [ $SECONDS -ge $deadline ]; then
      echo "timed out after ${secs}s waiting for: $what" >&2
      tail -30 "$DEMO/dualwrite.log" >&2
      exit 1
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "dualwrite exited; its log:" >&2; tail -30 "$DEMO/dualwrite.log" >&2; exit 1
    fi
    sleep 0.1
  done
}
slots_ready() {
  [ "$(psql -X -At "$PG/postgres" -c "SELECT count(*) FROM pg_replication_slots WHERE database IN ('dualwrite_fno','dualwrite_dataverse')")" = 2 ]
}
wait_for 120 "both capturers to create their replication slots" slots_ready
CTL=("$BIN" --config "$CONFIG" ctl)

step "Run the maps: contacts with its related maps (customers, customer groups, currencies), dependencies first"
"${CTL[@]}" run contacts --include-related
"${CTL[@]}" maps

now_ms() { date +%s%3N; }
show_arrival() { # show_arrival DESCRIPTION CHECK-COMMAND...
  local what=$1; shift
  local t0; t0=$(now_ms)
  wait_for 60 "$what" "$@"
  echo "   arrived in $(( $(now_ms) - t0 )) ms: $what"
}

step "Insert a customer on fno; it appears as an account on dataverse"
psql_fno -c "INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode, creditlimit, primaryphone)
             VALUES ('C9001', 'Fabrikam Demo', 'G01', 'EUR', 25000, '+45 11223344')"
has_account() { [ "$(psql_dv -At -c "SELECT name FROM accounts WHERE accountnumber = 'C9001'")" = "Fabrikam Demo" ]; }
show_arrival "account C9001 on dataverse" has_account
psql_dv -c "SELECT accountnumber, name, msdyn_customergroupid, transactioncurrencycode, creditlimit, telephone1 FROM accounts WHERE accountnumber = 'C9001'"

step "Update it on dataverse; the change flows back to fno (and does not echo)"
psql_dv -c "UPDATE accounts SET telephone1 = '+45 99887766', name = 'Fabrikam Renamed' WHERE accountnumber = 'C9001'"
renamed() { [ "$(psql_fno -At -c "SELECT organizationname || ' ' || primaryphone FROM customers_v3 WHERE customeraccount = 'C9001'")" = "Fabrikam Renamed +45 99887766" ]; }
show_arrival "customer C9001 renamed on fno" renamed
psql_fno -c "SELECT customeraccount, organizationname, primaryphone FROM customers_v3 WHERE customeraccount = 'C9001'"

step "Pause customers: changes queue in Kafka and nothing reaches dataverse"
"${CTL[@]}" pause customers
psql_fno -c "UPDATE customers_v3 SET creditlimit = 99000 WHERE customeraccount = 'C9001'"
queued() { "${CTL[@]}" maps --json | python3 -c "import json,sys; m=[r for r in json.load(sys.stdin) if r['map']=='customers'][0]; sys.exit(0 if m['backlog'] >= 1 else 1)"; }
wait_for 30 "the change to be queued" queued
"${CTL[@]}" maps
psql_dv -c "SELECT accountnumber, creditlimit FROM accounts WHERE accountnumber = 'C9001'"

step "Run customers again: it resumes, catches up on the queued change, and runs"
"${CTL[@]}" run customers
credited() { [ "$(psql_dv -At -c "SELECT creditlimit FROM accounts WHERE accountnumber = 'C9001'")" = "99000.00" ]; }
show_arrival "queued credit limit on dataverse" credited

step "Delete it on fno; it is deleted on dataverse"
psql_fno -c "DELETE FROM customers_v3 WHERE customeraccount = 'C9001'"
gone() { [ "$(psql_dv -At -c "SELECT count(*) FROM accounts WHERE accountnumber = 'C9001'")" = 0 ]; }
show_arrival "account C9001 deleted on dataverse" gone

cat <<MSG

Demo done in $((SECONDS - STARTED)) s. The demo sync is running (pid $(cat "$PIDFILE"), log $DEMO/dualwrite.log, topics $DUALWRITE_TOPIC_PREFIX.*;
export DUALWRITE_TOPIC_PREFIX=$DUALWRITE_TOPIC_PREFIX for the commands below).
Try it yourself:
  psql $PG/dualwrite_fno -c "UPDATE customers_v3 SET primaryemail = 'new@example.com' WHERE customeraccount = 'C0001'"
  psql $PG/dualwrite_dataverse -c "SELECT accountnumber, emailaddress1 FROM accounts WHERE accountnumber = 'C0001'"
Metrics (Prometheus text format) and health:
  curl http://$METRICS_ADDR/metrics      curl http://$METRICS_ADDR/readyz      curl http://$METRICS_ADDR/healthz
  (a Prometheus scrape config, alert rules and a Grafana dashboard are in deploy/prometheus and deploy/grafana)
Operate the maps in the console (sign in with any name and the token $DUALWRITE_CONSOLE_TOKEN):
  http://$CONSOLE_ADDR/
or with the CLI:
  $BIN -c $CONFIG ctl maps            (and: ctl pause|run|stop MAP, ctl watch)
Inspect the topics:
  $BIN -c $CONFIG ctl tail map:customers
  $BIN -c $CONFIG ctl tail errors
Stop it:
  scripts/demo.sh stop        (and scripts/stack.sh down to stop PostgreSQL and the broker)
MSG
