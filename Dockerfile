# One image with every mesh binary: mesh-control, meshctl, ztunnel, mesh-cni, waypoint.
#   make images IMAGE=registry.example.com/mesh/ambient-mesh TAG=0.1.0
FROM rust:1-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
# mesh-cni is also the CNI plugin the installer copies onto each host, where it must run
# whatever the host's libc: it is built static (musl). The rest links glibc as usual.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    musl="$(uname -m)-unknown-linux-musl" \
    && cargo build --release --locked -p mesh-control -p ztunnel -p waypoint --bins \
    && cargo build --release --locked -p mesh-cni --target "$musl" \
    && mkdir /out \
    && cp target/release/mesh-control target/release/meshctl target/release/ztunnel \
          target/release/waypoint "target/$musl/release/mesh-cni" /out/ \
    && strip /out/*

# The node agent runs nft and ip inside pod namespaces; nothing else is added.
FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends nftables iproute2 \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/* /usr/share/doc/* /usr/share/man/*
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mesh-control"]
