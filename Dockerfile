# One image for the three binaries. The init container needs the iptables tools at
# run time, so the base is a slim Debian rather than distroless.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        --bin isthmus-proxy --bin isthmus-init --bin isthmus

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 2102 --no-create-home --shell /usr/sbin/nologin isthmus
COPY --from=build /src/target/release/isthmus-proxy /usr/local/bin/
COPY --from=build /src/target/release/isthmus-init /usr/local/bin/
COPY --from=build /src/target/release/isthmus /usr/local/bin/
# The proxy runs as 2102 so that isthmus-init's owner match exempts its own traffic.
# The init container overrides this with root and needs NET_ADMIN and NET_RAW.
USER 2102
ENTRYPOINT ["/usr/local/bin/isthmus-proxy"]
