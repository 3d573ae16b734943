#!/usr/bin/env bash
# Makes sure the browser tests (clients/js/e2e) have a Chromium: $CHROMIUM,
# else /usr/bin/chromium. When it is missing and this runs as root on
# Debian/Ubuntu, installs Debian's `chromium` package with apt; otherwise
# says what to install and fails. Playwright never downloads a browser of
# its own here.
set -euo pipefail

if [ -n "${CHROMIUM:-}" ]; then
  if [ -x "$CHROMIUM" ]; then exit 0; fi
  echo "scripts/install-browser.sh: \$CHROMIUM is $CHROMIUM, which is not an executable file" >&2
  exit 1
fi
if [ -x /usr/bin/chromium ]; then exit 0; fi

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "scripts/install-browser.sh: no Chromium at /usr/bin/chromium; installing Debian's chromium package"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  if [ -x /usr/bin/chromium ]; then exit 0; fi
  echo "scripts/install-browser.sh: apt installed chromium, but /usr/bin/chromium is still missing" >&2
  exit 1
fi

cat >&2 <<'MSG'
scripts/install-browser.sh: the browser tests need Chromium, and there is none at /usr/bin/chromium.
  Debian:          sudo apt-get install chromium
  Ubuntu, others:  install Chromium or Chrome, then set CHROMIUM=/path/to/the/browser
MSG
exit 1
