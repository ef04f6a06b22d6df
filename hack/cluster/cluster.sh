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

runner_dir="$KWOK_WORKDIR/clusters/$name/podrunner"
runner_pid="$KWOK_WORKDIR/podrunner-$name.pid"

log() { printf '[cluster] %s\n' "$*" >&2; }

# Pods get IPs inside 127.0.0.0/8, so that a real process can bind each pod's IP: one /16
# per cluster name (clusters side by side never share an IP; TOWNSQUARE_POD_NET overrides
# the second octet). kwok takes a pod's IP from its node's spec.podCIDR: node i gets
# 127.N.i.0/24; nodes without one (made by another provisioner) draw from 127.N.128.0/17.
pod_net() {
  echo "${TOWNSQUARE_POD_NET:-$((64 + 16#$(printf '%s' "$name" | sha256sum | cut -c1-8) % 190))}"
}
pod_cidr() { echo "127.$(pod_net).128.1/17"; }
node_cidr() { echo "127.$(pod_net).0.0/24"; }

# A KwokConfiguration given to kwokctl is not defaulted: every option kwok's own defaults
# set (sigs.k8s.io/kwok pkg/apis/config/v1alpha1, `+default=`) is spelled out.
kwok_config() {
  local file="$KWOK_WORKDIR/kwok-$name.yaml"
  printf '%s\n' "apiVersion: config.kwok.x-k8s.io/v1alpha1" "kind: KwokConfiguration" \
    "options:" "  cidr: $(pod_cidr)" "  enableDebuggingHandlers: true" \
    "  enableContentionProfiling: false" "  enableProfilingHandler: true" \
    "  podPlayStageParallelism: 4" "  nodePlayStageParallelism: 4" \
    "  nodeLeaseParallelism: 4" "  podsOnNodeSyncParallelism: 1" \
    "  enablePodsOnNodeSyncListPager: true" "  enablePodsOnNodeSyncStreamWatch: false" >"$file"
  echo "$file"
}
die() { log "$*"; exit 1; }

answers() {
  [ -f "$kubeconfig" ] &&
    kubectl --kubeconfig "$kubeconfig" get --raw /readyz --request-timeout=5s >/dev/null 2>&1
}

# Not grep -q: it would exit early, kwokctl would die of SIGPIPE, and pipefail says "no".
exists() { [ -x "$kwokctl" ] && "$kwokctl" get clusters 2>/dev/null | grep -x "$name" >/dev/null; }

# kwok's own stages for nodes and finished pods, from the pinned module; pod-ready is ours.
kwok_module() {
  local dir
  dir=$(cd "$here/kwok" && go mod download -json sigs.k8s.io/kwok |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$dir" ] || die "cannot find the sigs.k8s.io/kwok module source (go mod download failed)"
  echo "$dir"
}

stage_configs() {
  local s
  s="$(kwok_module)/kustomize/stage"
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
  log "pod IPs from $(node_cidr) (node 0; node i: 127.$(pod_net).i.0/24)"
  # kwokctl picks free ports at creation and binds them as it starts: two clusters created
  # at once (the e2e session's and a fault test's own) picked the same ports, and one
  # never answered. So creations take turns, whatever the cluster's name.
  exec 8>"$KWOK_WORKDIR/.lock-create"
  flock 8
  "$kwokctl" create cluster --name "$name" --kubeconfig "" \
    --config "$here/kwokctl.yaml" --config "$(kwok_config)" "${stages[@]}" \
    --etcd-binary "$bin/etcd-v$ETCD_VERSION/etcd" \
    --kube-apiserver-binary "$kube/kube-apiserver" \
    --kube-controller-manager-binary "$kube/kube-controller-manager" \
    --kube-scheduler-binary "$kube/kube-scheduler" \
    --kwok-controller-binary "$bin/kwok-v$KWOK_VERSION/kwok" \
    --wait 2m 8>&- 9>&- >&2
  exec 8>&-
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
  "$kwokctl" scale node --name "$name" --replicas "$nodes" \
    --param ".podCIDRs=[\"$(node_cidr)\"]" >&2
  kubectl --kubeconfig "$kubeconfig" wait node --all --for=condition=Ready --timeout=60s >&2
  start_runner
  log "ready: export KUBECONFIG=$kubeconfig"
  echo "$kubeconfig"
}

runner_alive() { [ -f "$runner_pid" ] && kill -0 "$(cat "$runner_pid")" 2>/dev/null; }

# The pod runner (podrunner.py): one real relay process per relay pod, on the pod's IP.
start_runner() {
  if runner_alive; then
    return
  fi
  mkdir -p "$runner_dir"
  setsid "$repo/.venv/bin/python" "$here/podrunner.py" --kubeconfig "$kubeconfig" \
    --state-dir "$runner_dir" --python "$repo/.venv/bin/python" \
    </dev/null >>"$runner_dir/podrunner.log" 2>&1 9>&- &
  echo $! >"$runner_pid"
  log "pod runner started (pid $(cat "$runner_pid"), log $runner_dir/podrunner.log)"
}

stop_runner() {
  if runner_alive; then
    local pid
    pid=$(cat "$runner_pid")
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    log "pod runner stopped"
  fi
  rm -f "$runner_pid"
}

# kwokctl refuses an empty --kubeconfig here; the cluster's own file goes with it anyway.
delete() { "$kwokctl" delete cluster --name "$name" --kubeconfig "$kubeconfig" >&2; }

down() {
  stop_runner
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
