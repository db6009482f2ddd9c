# The kind e2e's peers in one image, from Debian's packages as in the integration tests:
# squid (the PEP), nginx (the upstream), curl (the actor), openssl (the upstream's certificate).
# Built and loaded into the kind nodes by deploy/kind/e2e.sh; never pushed anywhere.
FROM debian:bookworm-slim
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      squid-openssl nginx-light curl openssl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
