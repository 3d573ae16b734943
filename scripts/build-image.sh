#!/usr/bin/env bash
# Builds Herald's runtime image here, without Docker and without pulling a
# base image: Debian's buildah (vfs storage) puts a locally built release
# binary, the shared libraries it loads and a few files on `scratch`. The
# result is the image the Dockerfile's runtime stage makes from distroless
# cc-debian12:nonroot: /herald as entrypoint, user 65532:65532 ("nonroot"),
# a writable /tmp, CA certificates, the same OCI labels and ports.
#
#   scripts/build-image.sh [--binary PATH] [--tag NAME]
#
# --binary  the herald binary (default: target/release/herald, or under
#           $CARGO_TARGET_DIR; built with `cargo build --release` if missing)
# --tag     the image name (default: localhost/herald:dev)
#
# buildah is installed with apt-get when missing (as root on Debian/Ubuntu).
# HERALD_BUILDAH_ROOT=DIR keeps buildah's storage in DIR instead of
# /var/lib/containers (scripts/test-image.sh and the image test honour it too).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "build-image: $*"; }
fail() {
  echo "build-image: $*" >&2
  exit 1
}

binary=""
tag="localhost/herald:dev"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) [ $# -ge 2 ] || fail "--binary needs a path"; binary="$2"; shift 2 ;;
    --tag) [ $# -ge 2 ] || fail "--tag needs a name"; tag="$2"; shift 2 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) fail "unknown argument $1 (usage: scripts/build-image.sh [--binary PATH] [--tag NAME])" ;;
  esac
done

# buildah: Debian's package, installed here if we may.
if ! command -v buildah >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "buildah not found; installing Debian's buildah package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed; install buildah yourself"
    apt-get install -y -qq buildah >/dev/null || fail "apt-get install buildah failed; install it yourself"
  else
    fail "buildah is needed and not installed. Debian/Ubuntu: sudo apt-get install buildah; elsewhere: https://buildah.io"
  fi
fi
buildah=(buildah --storage-driver vfs)
if [ -n "${HERALD_BUILDAH_ROOT:-}" ]; then
  buildah+=(--root "$HERALD_BUILDAH_ROOT/storage" --runroot "$HERALD_BUILDAH_ROOT/run")
fi

# The binary: given, or the release build (made now if missing).
if [ -z "$binary" ]; then
  binary="${CARGO_TARGET_DIR:-target}/release/herald"
  if [ ! -x "$binary" ]; then
    say "no $binary yet; building it (cargo build --release --bin herald)"
    cargo build --release --bin herald || fail "the release build failed"
  fi
fi
[ -x "$binary" ] || fail "$binary is not an executable file"
version="$("$binary" --version)" || fail "$binary --version failed: is it a herald binary for this machine?"
version="${version#herald }"
say "binary $binary (herald $version)"

# The image's files are staged here and copied in: root's tree, then the
# home of the nonroot user, owned by it.
work="$(mktemp -d)"
stage="$work/root"
home="$work/home"
container=""
cleanup() {
  if [ -n "$container" ]; then "${buildah[@]}" rm "$container" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -m 0755 "$stage" "$home" "$home/nonroot"
install -m 0755 "$binary" "$stage/herald"
mkdir -p "$stage/etc/ssl/certs" "$stage/tmp" "$stage/home"
chmod 1777 "$stage/tmp"
# The users and groups of distroless's nonroot images.
cat >"$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$stage/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nonroot:x:65532:
EOF
# Names from /etc/hosts first (Kubernetes writes it), then DNS.
echo "hosts: files dns" >"$stage/etc/nsswitch.conf"
# TLS to NATS uses the system's roots (rustls-native-certs).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$stage/etc/ssl/certs/"
else
  say "warning: /etc/ssl/certs/ca-certificates.crt not found; the image has no CA certificates (apt-get install ca-certificates)"
fi

# The shared libraries the binary loads, and the dynamic loader, each at the
# path ldd names (the real file, not the symlink).
libs=()
if ldd_out="$(ldd "$binary" 2>&1)"; then
  while read -r lib; do
    [ -n "$lib" ] && libs+=("$lib")
  done < <(printf '%s\n' "$ldd_out" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
elif ! printf '%s' "$ldd_out" | grep -q "not a dynamic executable\|statically linked"; then
  fail "ldd $binary failed: $ldd_out"
fi
for lib in "${libs[@]}"; do
  [ -e "$lib" ] || fail "ldd names $lib, which does not exist"
  mkdir -p "$stage$(dirname "$lib")"
  cp -L "$lib" "$stage$lib"
done
say "shared libraries: ${libs[*]:-none (static binary)}"

"${buildah[@]}" rm herald-image-build >/dev/null 2>&1 || true
say "assembling the image on scratch (buildah, vfs storage)"
container="$("${buildah[@]}" from --name herald-image-build scratch)"
"${buildah[@]}" copy --quiet "$container" "$stage" / >/dev/null
"${buildah[@]}" copy --quiet --chown 65532:65532 "$container" "$home" /home >/dev/null

source_url="${HERALD_IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo unknown)}"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
"${buildah[@]}" config \
  --entrypoint '["/herald"]' \
  --user 65532:65532 \
  --workingdir /home/nonroot \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --port 8080/tcp --port 8081/tcp --port 8082/tcp --port 50051/tcp \
  --label org.opencontainers.image.title=herald \
  --label "org.opencontainers.image.description=Herald: realtime presence and messaging cluster (edge, router, presence, dev)" \
  --label "org.opencontainers.image.source=$source_url" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  "$container"

old_id="$("${buildah[@]}" images --quiet --no-trunc "$tag" 2>/dev/null | head -n1 || true)"
"${buildah[@]}" commit --quiet --rm "$container" "$tag" >/dev/null
container=""
new_id="$("${buildah[@]}" images --quiet --no-trunc "$tag" | head -n1)"
# The previous build of this tag is now nameless: drop it (vfs keeps whole copies).
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  "${buildah[@]}" rmi "$old_id" >/dev/null 2>&1 || true
fi

# It starts, as the image's user, with only what is in the image. (In a
# container of its own: `buildah run` leaves mount points behind, which
# are no part of the image.)
say "checking that /herald runs in the image"
container="$("${buildah[@]}" from "$tag")"
"${buildah[@]}" run --isolation chroot "$container" -- /herald --version >/dev/null ||
  fail "/herald --version failed inside the image $tag: a library missing from it?"
"${buildah[@]}" rm "$container" >/dev/null
container=""

size="$("${buildah[@]}" images --format '{{.Size}}' "$tag" | head -n1)"
say "built $tag (${new_id#sha256:}; $size uncompressed)"
