#!/usr/bin/env bash
# The long form of the fault matrix: the fault, bad-input, randomized and
# initial-sync tests repeated with more fault rounds each, and the decoder
# property tests with many more cases. CI runs the short form (one round,
# default cases) as part of scripts/test.sh.
#
#   scripts/soak.sh [ROUNDS] [PASSES]     (defaults: 5 rounds, 3 passes)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
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
