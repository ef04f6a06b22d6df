#!/usr/bin/env bash
# The local cluster: etcd, kube-apiserver, controller-manager, scheduler and kwok as local
# processes (kwokctl's binary runtime) over the binaries that build.sh made. Nothing is
# downloaded: every binary kwokctl needs is given to it, kubectl included.
#
#   cluster.sh up       start or reuse the cluster; prints the kubeconfig path last
#   cluster.sh down     delete the cluster
#   cluster.sh status   print the kubeconfig path if the cluster answers, else exit 1
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${TOWNSQUARE_CACHE:-$HOME/.cache/townsquare}
name=${TOWNSQUARE_CLUSTER:-townsquare}
nodes=${TOWNSQUARE_NODES:-3}
export KWOK_WORKDIR="$cache/kwok"
kubeconfig="$KWOK_WORKDIR/clusters/$name/kubeconfig.yaml"
kwokctl="$cache/bin/kwok-v$KWOK_VERSION/kwokctl"
export PATH="$repo/.venv/bin:$PATH"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

answers() {
  [ -f "$kubeconfig" ] &&
    kubectl --kubeconfig "$kubeconfig" get --raw /readyz --request-timeout=5s >/dev/null 2>&1
}

# Not grep -q: it would exit early, kwokctl would die of SIGPIPE, and pipefail says "no".
exists() { [ -x "$kwokctl" ] && "$kwokctl" get clusters 2>/dev/null | grep -x "$name" >/dev/null; }

# kwok's own stages for nodes and finished pods, from the pinned module; pod-ready is ours.
stage_configs() {
  local dir
  dir=$(cd "$here/kwok" && go mod download -json sigs.k8s.io/kwok |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$dir" ] || die "cannot find the sigs.k8s.io/kwok module source (go mod download failed)"
  local s="$dir/kustomize/stage"
  printf -- '--config=%s\n' "$s/node/fast/node-initialize.yaml" \
    "$s/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
    "$s/pod/fast/pod-complete.yaml" "$s/pod/fast/pod-delete.yaml" \
    "$here/stages/pod-ready.yaml"
}

create() {
  local bin kube
  bin=$("$here/build.sh" | tail -n1)
  kube="$bin/kubernetes-v$KUBE_VERSION"
  mapfile -t stages < <(stage_configs)
  log "creating cluster $name in $KWOK_WORKDIR"
  "$kwokctl" create cluster --name "$name" --kubeconfig "" \
    --config "$here/kwokctl.yaml" "${stages[@]}" \
    --etcd-binary "$bin/etcd-v$ETCD_VERSION/etcd" \
    --kube-apiserver-binary "$kube/kube-apiserver" \
    --kube-controller-manager-binary "$kube/kube-controller-manager" \
    --kube-scheduler-binary "$kube/kube-scheduler" \
    --kwok-controller-binary "$bin/kwok-v$KWOK_VERSION/kwok" \
    --wait 2m 9>&- >&2
}

up() {
  command -v kubectl >/dev/null || die "kubectl not found in $repo/.venv/bin: run 'make venv'"
  if answers; then
    log "cluster $name is already running"
  elif exists; then
    # Restarting would reuse ports fixed at creation, which another cluster may hold now.
    log "cluster $name exists but does not answer: recreating it"
    delete
    create
  else
    create
  fi
  "$kwokctl" scale node --name "$name" --replicas "$nodes" >&2
  kubectl --kubeconfig "$kubeconfig" wait node --all --for=condition=Ready --timeout=60s >&2
  log "ready: export KUBECONFIG=$kubeconfig"
  echo "$kubeconfig"
}

# kwokctl refuses an empty --kubeconfig here; the cluster's own file goes with it anyway.
delete() { "$kwokctl" delete cluster --name "$name" --kubeconfig "$kubeconfig" >&2; }

down() {
  if exists; then
    delete
  else
    log "no cluster $name"
  fi
}

mkdir -p "$KWOK_WORKDIR"
# One caller at a time: two test sessions must not create the same cluster at once.
# The cluster's processes must not inherit the lock (hence 9>&- where they start).
exec 9>"$KWOK_WORKDIR/.lock-$name"
flock 9
case ${1:-} in
  up) up ;;
  down) down ;;
  status) answers && echo "$kubeconfig" ;;
  *) die "usage: $0 up|down|status" ;;
esac
