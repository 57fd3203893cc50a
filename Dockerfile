# syntax=docker/dockerfile:1
#
# chat-gateway image.
#   docker build -t chat-gateway .
#   docker run -p 8080:8080 -e REDIS_URL=redis://redis:6379 chat-gateway
#
# Build stage: dependencies are compiled in their own layer against stub
# sources, so editing gateway code does not rebuild the dependency tree; the
# layer is rebuilt only when Cargo.toml, Cargo.lock or a member manifest
# changes.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src

# 1. Dependency layer. The workspace has two members (gateway and loadtest,
#    package chat-loadgen); both manifests must be present for cargo to load
#    the workspace and honour --locked, but only gateway's dependencies are
#    built. Afterwards the gateway stubs are removed (its manifest stays);
#    the loadtest stubs remain, its real sources are not needed here.
COPY deploy/docker/stub-workspace.sh /usr/local/bin/stub-workspace
COPY Cargo.toml Cargo.lock ./
COPY gateway/Cargo.toml gateway/Cargo.toml
COPY loadtest/Cargo.toml loadtest/Cargo.toml
RUN stub-workspace gateway loadtest \
    && cargo fetch --locked \
    && cargo build --release --locked -p gateway \
    && find gateway -mindepth 1 -maxdepth 1 ! -name Cargo.toml -exec rm -rf {} +

# 2. Real sources. COPY keeps the files' original mtimes, which can be older
#    than the stub build: touch them so cargo rebuilds the gateway crate. The
#    demo page's client library is embedded from the committed build of
#    clients/js.
COPY gateway gateway
COPY clients/js/dist/chat-client.js clients/js/dist/chat-client.js
RUN find gateway -type f -exec touch {} + \
    && cargo build --release --locked -p gateway \
    && install -D -m 0755 target/release/chat-gateway /out/chat-gateway

# nginx's self-signed certificate when the operator supplies none (compose
# service `tls-init`; `docker build --target tls-init`). Before `runtime`, so
# a plain `docker build` still ends with the gateway image.
FROM debian:${DEBIAN_RELEASE}-slim AS tls-init
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssl \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/nginx/self-signed-cert.sh /usr/local/bin/self-signed-cert
ENTRYPOINT ["sh", "/usr/local/bin/self-signed-cert"]

# Runtime: glibc-based slim image (the binary links against glibc; Redis TLS
# uses rustls, so it needs no OpenSSL). rustls trusts the system's certificate
# authorities (plus GATEWAY_REDIS_TLS_CA), so the image carries Debian's
# bundle: a managed Redis behind a public CA works with a plain rediss:// URL.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin chat

COPY --from=build /out/chat-gateway /usr/local/bin/chat-gateway
COPY deploy/docker/entrypoint.sh /usr/local/bin/docker-entrypoint
COPY deploy/docker/healthcheck.sh /usr/local/bin/healthcheck

ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    RUST_LOG=info

USER chat:chat
EXPOSE 8080

# The gateway drains on SIGTERM: stops accepting, closes clients with 1012
# (service restart: reconnect and resume elsewhere) and exits 0 within
# --shutdown-grace (5s, below Docker's 10s stop timeout).
STOPSIGNAL SIGTERM

# GET /healthz through bash's /dev/tcp (bash is part of the base image), so
# no curl/wget is installed just for the probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/healthcheck"]

ENTRYPOINT ["/usr/local/bin/docker-entrypoint"]
CMD []
