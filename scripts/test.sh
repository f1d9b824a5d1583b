#!/usr/bin/env bash
# Runs the whole test suite: starts the local stack it needs (PostgreSQL 15
# with wal2json, Apache Kafka in KRaft mode; see scripts/stack.sh), checks the
# deployment files against the binary, then runs the unit and end-to-end
# tests (the console's in headless Chromium: scripts/browser.sh). Tests that
# kill the broker or PostgreSQL start stacks of their own.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
stack_env="$(scripts/stack.sh up)" || exit 1
eval "$stack_env"
# Chromium and playwright-core for the console's browser tests.
scripts/browser.sh
export DUALWRITE_BOOTSTRAP_SERVERS DUALWRITE_PG_URL
# The deployment files against the binary (offline).
scripts/check-deploy.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
