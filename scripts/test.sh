#!/usr/bin/env bash
# Runs Herald's whole test suite. The black-box tests start their own
# nats-server processes, so the only thing needed besides Rust is the
# nats-server binary; on Debian/Ubuntu it is installed here when missing.
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

cargo test --workspace "$@"
