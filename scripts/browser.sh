#!/usr/bin/env bash
# What the console's browser tests need (tests/console.rs): Node.js, Debian's
# Chromium, and playwright-core (pinned in tests/console/package-lock.json,
# from the npm registry; it drives the installed Chromium, it downloads no
# browser of its own).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "browser: $*" >&2; }
need_root_or_sudo() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  need_root_or_sudo apt-get update -qq
  need_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if [ ! -d "$ROOT/tests/console/node_modules/playwright-core" ]; then
  log "installing playwright-core (tests/console/package-lock.json)"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix "$ROOT/tests/console" --no-audit --no-fund >&2
fi
