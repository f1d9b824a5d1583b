#!/usr/bin/env bash
# Benchmarks dualwrite (see BENCHMARKS.md): starts a fresh PostgreSQL and
# Apache Kafka broker of its own (scripts/stack.sh with its own state folder and ports,
# so a developer's stack and CI's are not disturbed and every benchmark
# starts from an empty broker), builds the release binaries, runs the
# scenarios with their anchors, prints the tables, and stops that stack.
#
#   scripts/bench.sh                       # every scenario, 3 runs, 1,000,000-row initial sync and catch-up
#   scripts/bench.sh --quick               # a small smoke run (1 run, 20,000 rows, 10 s latency)
#   scripts/bench.sh --scenario live-one,latency --runs 5
#   scripts/bench.sh --rows 200000 --big-runs 1
#   scripts/bench.sh --scenario capture-hop --live-rows 100000 --latency-secs 20
#                                          # dualwrite's capturer beside Debezium (Kafka Connect);
#                                          # fetches their jars with Maven on first use
#   scripts/bench.sh --scenario end-to-end --live-rows 50000 --latency-secs 20
#                                          # one direction end to end beside Debezium's source +
#                                          # JDBC sink on one Kafka Connect worker
#   scripts/bench.sh --scenario scaling    # 1, 2, 4 partitions; 1 or 2 router/applier instances
#   scripts/bench.sh --scenario catch-up --rows 200000
#                                          # pause, queue, resume; beside Debezium's source + JDBC
#                                          # sink with the sink paused and resumed (Connect's REST API)
#
# Every other argument goes to the benchmark binary (`--help` lists them:
# --runs, --big-runs, --rows, --live-rows, --latency-secs, --rate,
# --scenario all|end-to-end|live-one|live-both|latency|capture-hop|scaling|catch-up|initial-sync,
# --json FILE, --keep-logs, --peer-cache DIR, --debezium-extra PROPERTIES,
# --debezium-sink-extra PROPERTIES).
#
# Environment:
#   DUALWRITE_BENCH_STATE_DIR   the benchmark stack's folder (default /tmp/dualwrite-bench-stack; wiped first)
#   DUALWRITE_BENCH_PG_PORT     its PostgreSQL port (default 55434)
#   DUALWRITE_BENCH_KAFKA_PORT  its broker port (default 19094)
#   DUALWRITE_BENCH_KAFKA_CONTROLLER_PORT  its KRaft controller port (default the broker port + 1000)
#   DUALWRITE_BENCH_KAFKA_PROPERTIES broker settings to try (as DUALWRITE_STACK_KAFKA_PROPERTIES)
#   DUALWRITE_BENCH_KEEP_STACK  1: leave the stack running afterwards
#   DUALWRITE_BENCH_OUT         where the tables are also written (default target/bench/last.txt)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

args=()
help=0
for a in "$@"; do
  case "$a" in
    --quick) args+=(--runs 1 --rows 20000 --live-rows 20000 --latency-secs 10) ;;
    -h|--help) help=1 ;;
    *) args+=("$a") ;;
  esac
done

cargo build --release --locked -p dualwrite -p dualwrite-bench >&2
if [ "$help" = 1 ]; then
  # This script's own usage, then the benchmark binary's options; no stack.
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
  echo
  exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/dualwrite-bench" --help
fi
DUALWRITE_BENCH_COMMIT="$(git describe --always --dirty 2>/dev/null || echo unknown), built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
export DUALWRITE_BENCH_COMMIT
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${DUALWRITE_BENCH_OUT:-$TARGET/bench/last.txt}"
mkdir -p "$(dirname "$OUT")"

export DUALWRITE_STATE_DIR="${DUALWRITE_BENCH_STATE_DIR:-/tmp/dualwrite-bench-stack}"
export DUALWRITE_STACK_PG_PORT="${DUALWRITE_BENCH_PG_PORT:-55434}"
export DUALWRITE_STACK_KAFKA_PORT="${DUALWRITE_BENCH_KAFKA_PORT:-19094}"
export DUALWRITE_STACK_KAFKA_CONTROLLER_PORT="${DUALWRITE_BENCH_KAFKA_CONTROLLER_PORT:-$((DUALWRITE_STACK_KAFKA_PORT + 1000))}"
export DUALWRITE_STACK_KAFKA_PROPERTIES="${DUALWRITE_BENCH_KAFKA_PROPERTIES:-}"
scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf "$DUALWRITE_STATE_DIR"
# Interrupted (INT, TERM), the script stops the benchmark first, which
# stops every service and peer it started, then the stack: nothing is left
# running to join the next run's stack on the same ports.
bench_pid=""
stop_stack() {
  if [ -n "$bench_pid" ]; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  if [ "${DUALWRITE_BENCH_KEEP_STACK:-0}" != 1 ]; then
    scripts/stack.sh down || true
    rm -rf "$DUALWRITE_STATE_DIR"
  fi
}
trap stop_stack EXIT
trap 'exit 130' INT TERM
stack_env="$(scripts/stack.sh up)" || exit 1
eval "$stack_env"
export DUALWRITE_BOOTSTRAP_SERVERS DUALWRITE_PG_URL
# The broker's process, for the CPU figures of the scenarios that give them.
DUALWRITE_BENCH_BROKER_PID="$(cat "$DUALWRITE_STATE_DIR/kafka/kafka.pid" 2>/dev/null || true)"
export DUALWRITE_BENCH_BROKER_PID

"$TARGET/release/dualwrite-bench" --bin "$TARGET/release/dualwrite" "${args[@]}" > >(tee "$OUT") &
bench_pid=$!
status=0
wait "$bench_pid" || status=$?
bench_pid=""
[ "$status" -eq 0 ] || exit "$status"
echo "bench: tables written to $OUT" >&2
