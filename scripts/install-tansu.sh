#!/usr/bin/env bash
# Installs the tansu Kafka-protocol broker (0.6.0, libsql/SQLite storage) once
# and caches the binary; later runs reuse it without rebuilding.
set -euo pipefail
TANSU_VERSION=0.6.0
CACHE="${DUALWRITE_CACHE:-$HOME/.cache/dualwrite}"
ROOT="$CACHE/tansu-$TANSU_VERSION"
BIN="$ROOT/bin/tansu"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$ROOT"
echo "building tansu $TANSU_VERSION (first run only, ~10 minutes on 2 cores)" >&2
if ! cargo install tansu --version "$TANSU_VERSION" --features libsql --locked --root "$ROOT" >&2; then
  echo "locked build failed; retrying without --locked" >&2
  cargo install tansu --version "$TANSU_VERSION" --features libsql --root "$ROOT" >&2
fi
echo "$BIN"
