# syntax=docker/dockerfile:1
#
# Herald's container image: the one `herald` binary (edge, router, presence
# and dev are its subcommands) on distroless, as user 65532.
#
#   docker build -t herald \
#     --build-arg VERSION="$(cargo pkgid -p herald | sed 's/.*[#@]//')" \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE="$(git remote get-url origin)" .
#
# Base images cannot be pulled on the project's own machines; there
# scripts/build-image.sh builds the same runtime image with buildah from a
# local release build, and scripts/test-image.sh tests it.

# Bookworm, like the runtime stage below: the binary links against the same
# glibc it runs with.
FROM rust:1-bookworm AS build
WORKDIR /src
# The sources (.dockerignore leaves out target/, .git, docs and everything
# else the build does not read). The crate registry and the target directory
# are BuildKit cache mounts, kept between builds: a change to one crate
# recompiles that crate and what depends on it, not every dependency.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin herald \
 && mkdir -p /out \
 && cp target/release/herald /out/herald

# glibc, libgcc, CA certificates, /etc/passwd with nonroot (65532), /tmp;
# no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="Herald: realtime presence and messaging cluster (edge, router, presence, dev)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/herald /herald
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 65532:65532
WORKDIR /home/nonroot
# 8080: edge WebSocket /ws, /healthz, /readyz, /metrics (and herald dev's);
# 50051: router gRPC (and herald dev's); 8081: router HTTP; 8082: presence HTTP.
EXPOSE 8080/tcp 8081/tcp 8082/tcp 50051/tcp
ENTRYPOINT ["/herald"]
