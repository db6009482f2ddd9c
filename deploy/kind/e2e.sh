#!/usr/bin/env bash
# The kind end-to-end harness (`cargo xtask kind-e2e`, docs/kubernetes.md).
#
# Creates a kind cluster, loads the agent's image (built by `cargo xtask image`) and a peers
# image (squid, nginx, curl), deploys deploy/overlays/kind (the agent DaemonSet, a squid PEP,
# an HTTPS upstream), starts an actor pod labelled egress.dev/capture=true, and checks that the
# actor's HTTPS request reached squid as a CONNECT to the upstream's authority with the actor's
# x-ate-* identity headers, and that nothing reached the upstream from the actor directly. The
# cluster is deleted on every exit (KEEP_CLUSTER=1 keeps it for a look). All traffic stays
# inside the cluster: the upstream is a Service of the cluster.
#
# Environment: ENGINE (docker|podman, default docker), CLUSTER (default egress-e2e),
# AGENT_IMAGE (default egress-agent:dev), TIMEOUT seconds per wait (default 240).
set -euo pipefail

ENGINE=${ENGINE:-docker}
CLUSTER=${CLUSTER:-egress-e2e}
AGENT_IMAGE=${AGENT_IMAGE:-egress-agent:dev}
PEERS_IMAGE=egress-e2e-peers:dev
TIMEOUT=${TIMEOUT:-240}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OVERLAY=$ROOT/deploy/overlays/kind
UPSTREAM=upstream.egress-e2e.svc.cluster.local
ACTOR_ID=e2e-actor-1
TEMPLATE=coder
TEMPLATE_NAMESPACE=team-e2e

log() { printf '\n== %s\n' "$*" >&2; }
fail() {
    printf 'kind-e2e: FAILED: %s\n' "$*" >&2
    exit 1
}

# Preflight: stop before touching anything when this machine cannot run kind.
if ! command -v "$ENGINE" >/dev/null 2>&1 || ! "$ENGINE" info >/dev/null 2>&1; then
    fail "cannot run here: no Docker engine ($ENGINE info failed); kind needs one; this harness runs on a workstation or CI runner with Docker"
fi
for tool in kind kubectl; do
    command -v "$tool" >/dev/null 2>&1 ||
        fail "cannot run here: $tool is not installed (the harness needs $ENGINE with a running engine, kind and kubectl)"
done
"$ENGINE" image inspect "$AGENT_IMAGE" >/dev/null 2>&1 ||
    fail "no image $AGENT_IMAGE: build it with \`cargo xtask image --tag $AGENT_IMAGE\`"
if [ "$ENGINE" = podman ]; then
    export KIND_EXPERIMENTAL_PROVIDER=podman
fi
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    fail "a kind cluster named $CLUSTER exists already: delete it (\`kind delete cluster --name $CLUSTER\`) or set CLUSTER"
fi

WORK=$(mktemp -d)
# A kubeconfig of its own: the user's contexts are left alone.
export KUBECONFIG=$WORK/kubeconfig

diagnostics() {
    log "diagnostics"
    kubectl get pods -A -o wide || true
    kubectl -n egress-system logs daemonset/egress-agent --all-containers --tail=100 || true
    kubectl -n egress-e2e logs pod/actor --tail=20 || true
    kubectl -n egress-e2e exec deploy/squid -- cat /var/log/squid/access.log /var/log/squid/cache.log || true
}

cleanup() {
    local status=$?
    trap - EXIT
    if [ "$status" -ne 0 ]; then
        diagnostics
    fi
    if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
        log "keeping cluster $CLUSTER (KUBECONFIG=$KUBECONFIG); delete it with: kind delete cluster --name $CLUSTER"
    else
        log "deleting cluster $CLUSTER"
        kind delete cluster --name "$CLUSTER" || true
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "building the peers image $PEERS_IMAGE"
"$ENGINE" build --tag "$PEERS_IMAGE" --file "$ROOT/deploy/kind/peers.Dockerfile" "$ROOT/deploy/kind"

log "creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config "$OVERLAY/kind-cluster.yaml" \
    --kubeconfig "$KUBECONFIG" --wait "${TIMEOUT}s"

log "loading $AGENT_IMAGE and $PEERS_IMAGE into the nodes"
for image in "$AGENT_IMAGE" "$PEERS_IMAGE"; do
    "$ENGINE" save --output "$WORK/image.tar" "$image"
    kind load image-archive "$WORK/image.tar" --name "$CLUSTER"
    rm -f "$WORK/image.tar"
done

log "the upstream's certificate (self-signed, for $UPSTREAM)"
"$ENGINE" run --rm "$PEERS_IMAGE" sh -c "openssl req -x509 -newkey ec \
    -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=$UPSTREAM \
    -addext subjectAltName=DNS:$UPSTREAM -keyout /tmp/tls.key -out /tmp/tls.crt \
    >/dev/null 2>&1 && cat /tmp/tls.crt /tmp/tls.key" >"$WORK/pem"
sed -n '/BEGIN CERTIFICATE/,/END CERTIFICATE/p' "$WORK/pem" >"$WORK/tls.crt"
sed -n '/BEGIN PRIVATE KEY/,/END PRIVATE KEY/p' "$WORK/pem" >"$WORK/tls.key"
if [ ! -s "$WORK/tls.crt" ] || [ ! -s "$WORK/tls.key" ]; then
    fail "making the upstream's certificate"
fi

log "deploying $OVERLAY"
kubectl apply -f "$OVERLAY/namespace.yaml"
kubectl -n egress-e2e create secret tls upstream-tls --cert "$WORK/tls.crt" --key "$WORK/tls.key"
kubectl apply -k "$OVERLAY"
kubectl -n egress-system rollout status daemonset/egress-agent --timeout "${TIMEOUT}s"
kubectl -n egress-e2e rollout status deployment/squid --timeout "${TIMEOUT}s"
kubectl -n egress-e2e rollout status deployment/upstream --timeout "${TIMEOUT}s"

log "starting the actor"
kubectl apply -f "$OVERLAY/actor.yaml"
kubectl -n egress-e2e wait --for condition=Ready pod/actor --timeout "${TIMEOUT}s"

log "waiting for the actor's CONNECT in squid's access log"
deadline=$((SECONDS + TIMEOUT))
line=
while [ "$SECONDS" -lt "$deadline" ]; do
    # Fields (tests/src/squid.rs's logformat): time, client, method, authority, status, server,
    # actor id, template, template namespace, original destination, connect authority, ...
    line=$(kubectl -n egress-e2e exec deploy/squid -- cat /var/log/squid/access.log 2>/dev/null |
        awk -F '\t' -v a="$UPSTREAM:443" -v id="$ACTOR_ID" -v t="$TEMPLATE" -v ns="$TEMPLATE_NAMESPACE" \
            '$3 == "CONNECT" && $4 == a && $7 == id && $8 == t && $9 == ns { print; exit }') || true
    [ -n "$line" ] && break
    sleep 3
done
[ -n "$line" ] || fail "no CONNECT $UPSTREAM:443 with x-ate-actor-id=$ACTOR_ID, x-ate-actor-template=$TEMPLATE, x-ate-actor-template-namespace=$TEMPLATE_NAMESPACE in squid's access log within ${TIMEOUT}s"
printf 'squid: %s\n' "$line"

# Whole logs into files first: `grep -q` closing a pipe early would fail it under pipefail.
kubectl -n egress-e2e logs pod/actor >"$WORK/actor.log"
grep -q 'upstream ok' "$WORK/actor.log" ||
    fail "the actor's curl never got the upstream's answer through the tunnel"

# Nothing direct: every request the upstream saw came from squid, none from the actor's address.
actor_ip=$(kubectl -n egress-e2e get pod actor -o jsonpath='{.status.podIP}')
kubectl -n egress-e2e logs deployment/upstream >"$WORK/upstream.log"
if awk '{ print $1 }' "$WORK/upstream.log" | grep -qxF "$actor_ip"; then
    fail "the upstream saw a request from the actor's own address $actor_ip: it went direct"
fi

log "the agent's view"
node=$(kubectl -n egress-e2e get pod actor -o jsonpath='{.spec.nodeName}')
agent=$(kubectl -n egress-system get pods -l app.kubernetes.io/name=egress-agent \
    --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
kubectl -n egress-system logs "$agent" | grep -F "$ACTOR_ID" | tail -n 3 || true

log "kind-e2e: PASSED (actor $ACTOR_ID on $node captured, tunnelled to squid with its identity)"
