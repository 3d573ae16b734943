#!/usr/bin/env bash
# Tests the container image: builds the release binary if it is missing,
# builds the runtime image from it with buildah (scripts/build-image.sh),
# and runs the black-box test that starts `herald dev` inside the image and
# connects, joins and publishes with a real client
# (tests/blackbox/tests/image.rs).
#
#   scripts/test-image.sh [--binary PATH] [--tag NAME]
#
# --binary  the herald binary to put in the image (default: the release
#           build, target/release/herald or under $CARGO_TARGET_DIR)
# --tag     the image name (default: localhost/herald:test)
#
# Needs root on Debian/Ubuntu (buildah is installed when missing), or
# buildah already working for the current user. HERALD_BUILDAH_ROOT=DIR
# keeps buildah's storage in DIR (see scripts/build-image.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "test-image: FAILED: $*" >&2
  exit 1
}

binary=""
tag="localhost/herald:test"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) [ $# -ge 2 ] || fail "--binary needs a path"; binary="$2"; shift 2 ;;
    --tag) [ $# -ge 2 ] || fail "--tag needs a name"; tag="$2"; shift 2 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) fail "unknown argument $1 (usage: scripts/test-image.sh [--binary PATH] [--tag NAME])" ;;
  esac
done

if [ -z "$binary" ]; then
  binary="${CARGO_TARGET_DIR:-target}/release/herald"
  if [ ! -x "$binary" ]; then
    echo "test-image: no $binary yet; building it (cargo build --release --bin herald)"
    cargo build --release --bin herald || fail "the release build of herald failed"
  fi
fi

scripts/build-image.sh --binary "$binary" --tag "$tag" || fail "building the image failed (see above)"

echo "test-image: running herald dev in $tag with a client (cargo test -p herald-blackbox --test image)"
HERALD_IMAGE="$tag" cargo test -p herald-blackbox --test image -- --ignored ||
  fail "herald dev in the image did not serve the client (see the test output above)"

echo "test-image: passed: $tag runs herald dev as user 65532 and serves WebSocket and gRPC clients"
