#!/usr/bin/env bash
# Offline checks of the deployment files (Kubernetes, docker-compose,
# Prometheus) against the real binary; installs the tools it needs:
# kubernetes-validate and PyYAML (PyPI, in a cached virtualenv),
# docker-compose (Debian), kubectl (for `kubectl kustomize`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${DUALWRITE_CACHE:-$HOME/.cache/dualwrite}"
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q kubernetes-validate pyyaml
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >&2
fi
if ! command -v kubectl >/dev/null 2>&1; then
  echo "check-deploy: kubectl is needed to render the Kubernetes manifests (kubectl kustomize); install it" >&2
  exit 1
fi
cargo build --quiet --bin dualwrite
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/dualwrite"
rc=0
out="$("$VENV/bin/python" scripts/check-deploy.py "$BIN")" || rc=$?
echo "$out" | grep -v '^PASS' >&2 || true
exit "$rc"
