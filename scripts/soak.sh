#!/usr/bin/env bash
# The long form of the fault matrix: the fault, bad-input, randomized and
# initial-sync tests repeated with more fault rounds each, and the decoder
# property tests with many more cases. CI runs the short form (one round,
# default cases) as part of scripts/test.sh.
#
#   scripts/soak.sh [ROUNDS] [PASSES]     (defaults: 5 rounds, 3 passes)
#
# The storm (tests/storm.rs: both sides edit the same records at once; each
# record must end with the value the conflict rule says) over and over for
# SECONDS (default 3600), each run with fresh seeds; FILTER picks some of
# its tests (default: all three). Every seed's summary line and every failed
# seed (with its DUALWRITE_TEST_SEED to replay it) is counted at the end;
# the runs' output is kept under $DUALWRITE_SOAK_DIR (default: a new folder
# in /tmp).
#
#   scripts/soak.sh storm [SECONDS] [FILTER]
#
# One huge source transaction (tests/capture.rs): ROWS rows (default
# 1,000,000; CI runs 20,000) inserted in one transaction, then updated in
# another, synced end to end with the release build (the pause buffer with
# its default cache of resolver states), and the capturer's and the pause
# buffer's peak RSS checked against their bounds.
#
#   scripts/soak.sh huge [ROWS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

storm_soak() {
  local seconds="${1:-3600}" filter="${2:-}"
  local dir="${DUALWRITE_SOAK_DIR:-$(mktemp -d /tmp/dualwrite-soak-storm.XXXXXX)}"
  mkdir -p "$dir"
  stack_env="$(scripts/stack.sh up)" || exit 1
  eval "$stack_env"
  export DUALWRITE_BOOTSTRAP_SERVERS DUALWRITE_PG_URL
  cargo test -p dualwrite --test storm --no-run
  local end=$((SECONDS + seconds)) runs=0 broken=0 args=()
  if [ -n "$filter" ]; then args=("$filter"); fi
  trap 'storm_summary "$dir" "$runs" "$broken"; exit 130' INT TERM
  while [ "$SECONDS" -lt "$end" ]; do
    runs=$((runs + 1))
    echo "soak: storm run $runs ($(( (end - SECONDS) / 60 )) min left), output in $dir/run-$runs.log"
    # One test at a time: the machine's cores are shared with the services.
    if ! cargo test -p dualwrite --test storm -- --nocapture --test-threads=1 ${args[@]+"${args[@]}"} \
      >"$dir/run-$runs.log" 2>&1; then
      # A failed run without a failed seed did not get to a verdict (setup, timeout).
      grep -q 'storm-result .*verdict=FAIL' "$dir/run-$runs.log" || broken=$((broken + 1))
    fi
    grep -h 'storm-result' "$dir/run-$runs.log" | sed 's/^/  /' | cut -c1-200 || true
  done
  storm_summary "$dir" "$runs" "$broken"
}

# Counts over every run's summary lines; exits 1 when anything failed.
storm_summary() {
  local dir="$1" runs="$2" broken="$3" seeds failed diverged
  seeds=$(cat "$dir"/run-*.log 2>/dev/null | grep -c 'storm-result' || true)
  failed=$(cat "$dir"/run-*.log 2>/dev/null | grep -c 'storm-result .*verdict=FAIL' || true)
  diverged=$(cat "$dir"/run-*.log 2>/dev/null | grep -c 'storm-result .*verdict=FAIL.* converged=false' || true)
  echo
  echo "soak: storm: $runs runs, $seeds seeds, $failed failed seeds" \
    "($diverged with the sides still different, $((failed - diverged)) equal but with the wrong values)," \
    "$broken runs that failed before a verdict"
  if [ "$failed" -gt 0 ]; then
    echo "soak: failed seeds (replay with DUALWRITE_TEST_SEED=<seed> and the test's name):"
    grep -H 'storm-result .*verdict=FAIL' "$dir"/run-*.log |
      sed -E 's/^([^:]*):.*test=([^ ]*) seed=([0-9]*).*wrong keys=([0-9]*).*/  \2 seed \3: \4 keys wrong (\1)/'
  fi
  echo "soak: output in $dir"
  [ "$failed" -eq 0 ] && [ "$broken" -eq 0 ]
}

if [ "${1:-}" = huge ]; then
  stack_env="$(scripts/stack.sh up)" || exit 1
  eval "$stack_env"
  export DUALWRITE_BOOTSTRAP_SERVERS DUALWRITE_PG_URL
  DUALWRITE_TEST_RESOLVER_CACHE=10000 DUALWRITE_HUGE_TXN_ROWS="${2:-1000000}" cargo test --release -p dualwrite --test capture \
    huge_transaction -- --nocapture
  exit
fi

if [ "${1:-}" = storm ]; then
  shift
  storm_soak "$@"
  exit
fi

ROUNDS="${1:-5}"
PASSES="${2:-3}"
scripts/stack.sh up >/dev/null
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
for pass in $(seq 1 "$PASSES"); do
  echo "soak: pass $pass of $PASSES, DUALWRITE_FAULT_ROUNDS=$ROUNDS"
  DUALWRITE_FAULT_ROUNDS="$ROUNDS" cargo nextest run -p dualwrite --no-fail-fast \
    --test faults --test bad_input --test random --test initial_sync --test lifecycle
done
echo "soak: decoder and parser property tests, 20000 cases each"
PROPTEST_CASES=20000 cargo test -p dualwrite-model --release -- never_panic
