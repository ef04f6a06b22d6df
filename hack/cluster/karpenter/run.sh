#!/usr/bin/env bash
# Karpenter's kwok provider against a local cluster, in the foreground until SIGTERM.
# Installs Karpenter's CRDs (NodePool, NodeClaim, KWOKNodeClass, ...) from the pinned module
# first. Karpenter listens on every interface and cannot be told otherwise, so it runs in a
# network namespace whose only interface is loopback, with the API server's port forwarded.
# Leader election is on: two test sessions on one cluster may each run one, and one acts.
#
#   run.sh KUBECONFIG        (environment: Karpenter's own options, e.g. BATCH_MAX_DURATION)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
# shellcheck source=../versions.env
source "$here/../versions.env"
kubeconfig=${1:?usage: $0 KUBECONFIG}
kubectl=("$repo/.venv/bin/kubectl" --kubeconfig "$kubeconfig")
log() { printf '[karpenter] %s\n' "$*" >&2; }

bin=$("$here/../build.sh" | tail -n1)
module=$(cd "$here" && GOTOOLCHAIN=go1.27.3 go mod download -json sigs.k8s.io/karpenter |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$module" ] || { log "cannot find the sigs.k8s.io/karpenter module source"; exit 1; }
"${kubectl[@]}" apply --server-side --force-conflicts -f "$module/kwok/charts/crds/" \
  -f "$module/kwok/apis/crds/" >&2
"${kubectl[@]}" wait --for condition=established --timeout=60s \
  crd/nodepools.karpenter.sh crd/nodeclaims.karpenter.sh \
  crd/kwoknodeclasses.karpenter.kwok.sh >&2

server=$("${kubectl[@]}" config view --minify -o jsonpath='{.clusters[0].cluster.server}')
port=${server##*:}
export KUBECONFIG=$kubeconfig
export DISABLE_LEADER_ELECTION=${DISABLE_LEADER_ELECTION:-false}
export LEADER_ELECTION_NAMESPACE=${LEADER_ELECTION_NAMESPACE:-kube-system}
log "Karpenter v$KARPENTER_VERSION (kwok provider) for $server"
exec "$repo/.venv/bin/python" "$here/loopback_only.py" "$port" -- \
  "$bin/karpenter-v$KARPENTER_VERSION/kwok"
