# One image for every binary a cluster runs:
#
#   isthmus-proxy       the injected sidecar and the cluster's gateway (runs as UID 2102)
#   isthmus-init        the pod's init container: installs the iptables capture. It runs
#                       as root and needs the capabilities NET_ADMIN and NET_RAW (the
#                       manifests `isthmus install` and `isthmus inject` write grant
#                       exactly these two and drop every other one)
#   isthmus-controller  the ServiceMirror controller of the control plane
#   isthmus             the operator CLI (install, inject, link, check, identity)
#
# Why Debian slim and not distroless: isthmus-init execs `iptables-restore` and
# `iptables-save` (nft and legacy backends), and iproute2's `ip` (an IPv6 capture adds
# `::6` to `lo`), which distroless images do not ship, and
# one image for every container keeps a pod to a single pull. The proxy itself needs
# nothing from the base but libc and CA roots.
#
# Build:  docker build -t ghcr.io/isthmus/isthmus:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# --locked: the image is built from exactly the dependency versions Cargo.lock records.
# isthmus-proxy keeps its default `kube` feature: the one binary is the sidecar and the
# gateway (`--discovery kube`), and inject and install both run it by that name. A
# build without it (`-p proxy --no-default-features`) has half the text and refuses
# `--discovery kube`; the idle sidecar saves about 1 MB, mostly pages of the binary
# that the node's page cache shares between pods, which a second binary in the image
# would cost more than it saves.
RUN cargo build --release --locked \
        --bin isthmus-proxy \
        --bin isthmus-init \
        --bin isthmus-controller \
        --bin isthmus

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 2102 --no-create-home --shell /usr/sbin/nologin isthmus
COPY --from=build /src/target/release/isthmus-proxy /usr/local/bin/isthmus-proxy
COPY --from=build /src/target/release/isthmus-init /usr/local/bin/isthmus-init
COPY --from=build /src/target/release/isthmus-controller /usr/local/bin/isthmus-controller
COPY --from=build /src/target/release/isthmus /usr/local/bin/isthmus
# The proxy runs as 2102 so that isthmus-init's owner match exempts its own traffic.
# The init container overrides this with runAsUser 0 and the two capabilities above.
USER 2102
ENTRYPOINT ["/usr/local/bin/isthmus-proxy"]
