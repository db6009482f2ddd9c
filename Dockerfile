# The egress agent's image: `cargo xtask image [--tag T] [--engine docker|podman]` builds it.
#
# Builder: the same eBPF toolchain recipe as `cargo xtask setup` (xtask/src/setup.rs):
# Debian's rustc-web + rust-web-src (a compiler with its matching library source, for
# `-Z build-std=core` on bpfel-unknown-none) linked into rustup as the `debian-web` toolchain,
# and bpf-linker built against Debian's llvm-22. Host crates build with rustup's stable, as on a
# developer machine. EGRESS_EBPF_REQUIRED=1 makes a missing eBPF toolchain an error instead of
# an agent without its programs.
FROM debian:bookworm AS builder

ARG RUST_VERSION=1.95.0
ARG BPF_LINKER_VERSION=0.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH

# rustc-web, rust-web-src, cargo-web and llvm-22 come from bookworm-security, which the image
# lists already.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends \
      ca-certificates curl gcc libc6-dev pkg-config \
      rustc-web rust-web-src cargo-web \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustup toolchain link debian-web /usr \
 && LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
      cargo install bpf-linker --version "${BPF_LINKER_VERSION}" --locked \
        --no-default-features --features llvm-22 \
 && rm -rf /usr/local/cargo/registry

WORKDIR /src
COPY . .
# The cache mounts keep crates and build output between image builds (BuildKit, podman).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    EGRESS_EBPF_REQUIRED=1 EGRESS_EBPF_TOOLCHAIN=debian-web \
      cargo build --release --locked --package egress-agent \
 && install -D -m 0755 target/release/egress-agent /out/egress-agent

# Runtime: the binary and what it runs: nft (veth mode's nftables rules), ip (troubleshooting
# from `kubectl exec`), CA certificates (a TLS PEP link with the system roots), mount (the
# DaemonSet's init container mounts bpffs where the host has not).
#
# It runs as root and cannot run as non-root: the agent loads eBPF programs, attaches them to
# cgroups, enters other pods' network namespaces and writes nftables rules there, which need
# CAP_BPF, CAP_SYS_ADMIN and CAP_NET_ADMIN in the host's namespaces (the DaemonSet is
# privileged for the same reasons; docs/kubernetes.md).
FROM debian:bookworm-slim

RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      nftables iproute2 ca-certificates mount \
 && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/egress-agent /usr/local/bin/egress-agent

ENTRYPOINT ["/usr/local/bin/egress-agent"]
CMD ["run"]
