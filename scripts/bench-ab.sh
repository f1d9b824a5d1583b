#!/usr/bin/env bash
# Compares dualwrite binaries (or settings) back to back on one bench
# stack: every pass runs each variant once, in turn, so that the machine's
# drift hits them alike, and even passes in the reverse order (a variant's
# place in a pass can matter: the catch-up of whichever ran second measured
# up to 20 % lower); report the medians of the passes (BENCHMARKS.md).
#
#   scripts/bench-ab.sh VARIANT... [-- dualwrite-bench options]
#
# A variant is NAME=BINARY or NAME=BINARY@CONFIG_EXTRA (TOML appended to
# the deployment's configuration, `\n` for newlines). Environment:
# PASSES (3), WARMUP (1: one uncounted run first). Each run writes
# target/bench/ab-NAME-PASS.json. Example:
#
#   scripts/bench-ab.sh old=/tmp/old-dualwrite new=target/release/dualwrite \
#     -- --scenario live-one,latency,catch-up --runs 1 --rows 50000 --latency-secs 20
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

variants=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do variants+=("$1"); shift; done
[ $# -gt 0 ] && shift
if [ ${#variants[@]} -eq 0 ]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi

cargo build --release --locked -p dualwrite-bench >&2
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
mkdir -p "$TARGET/bench"
export DUALWRITE_STATE_DIR="${DUALWRITE_BENCH_STATE_DIR:-/tmp/dualwrite-bench-stack}"
export DUALWRITE_STACK_PG_PORT="${DUALWRITE_BENCH_PG_PORT:-55434}"
export DUALWRITE_STACK_KAFKA_PORT="${DUALWRITE_BENCH_KAFKA_PORT:-19094}"
export DUALWRITE_STACK_KAFKA_CONTROLLER_PORT="$((DUALWRITE_STACK_KAFKA_PORT + 1000))"
scripts/stack.sh down >/dev/null 2>&1 || true
rm -rf "$DUALWRITE_STATE_DIR"
# Interrupted (INT, TERM), the script stops the running benchmark first,
# which stops every service and peer it started, then the stack: nothing
# is left running to join the next run's stack on the same ports.
bench_pid=""
stop_all() {
  if [ -n "$bench_pid" ]; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  scripts/stack.sh down >/dev/null 2>&1 || true
  rm -rf "$DUALWRITE_STATE_DIR"
}
trap stop_all EXIT
trap 'exit 130' INT TERM
stack_env="$(scripts/stack.sh up)" || exit 1
eval "$stack_env"
export DUALWRITE_BOOTSTRAP_SERVERS DUALWRITE_PG_URL
DUALWRITE_BENCH_BROKER_PID="$(cat "$DUALWRITE_STATE_DIR/kafka/kafka.pid" 2>/dev/null || true)"
export DUALWRITE_BENCH_BROKER_PID

# Runs variant $1 once, writing its figures to $2.
run_variant() {
  local rest="${1#*=}"
  local bin="${rest%%@*}" extra=""
  [ "$rest" != "$bin" ] && extra="$(printf '%b' "${rest#*@}")"
  "$TARGET/release/dualwrite-bench" --bin "$bin" --config-extra "$extra" \
    --json "$2" "${bench_args[@]}" > >(grep -v '^$') &
  bench_pid=$!
  wait "$bench_pid" || true
  bench_pid=""
}
bench_args=("$@")

# The first run on a new stack is slower (the broker's JVM warms up): 33-41 %
# lower in catch-up replay and live one way (BENCHMARKS.md), so a warm-up
# run of the first variant, whose figures are not kept, comes before the
# passes (WARMUP=0: none).
if [ "${WARMUP:-1}" != 0 ]; then
  echo "=== warm-up: ${variants[0]%%=*} (not counted)"
  run_variant "${variants[0]}" "$TARGET/bench/ab-warmup.json"
fi
reversed=()
for ((i = ${#variants[@]} - 1; i >= 0; i--)); do reversed+=("${variants[$i]}"); done
for pass in $(seq 1 "${PASSES:-3}"); do
  order=("${variants[@]}")
  [ $((pass % 2)) -eq 0 ] && order=("${reversed[@]}")
  for v in "${order[@]}"; do
    echo "=== pass $pass: ${v%%=*}"
    run_variant "$v" "$TARGET/bench/ab-${v%%=*}-$pass.json"
  done
done
