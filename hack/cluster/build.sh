#!/usr/bin/env bash
# Builds etcd, the Kubernetes control plane, kwok and kwokctl, and Karpenter's kwok provider
# from their official Go modules, pinned in this directory, into a cache keyed by version.
# A second run builds nothing. Prints the bin directory on stdout's last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${TOWNSQUARE_CACHE:-$HOME/.cache/townsquare}
bin="$cache/bin"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-trimpath

log() { printf '[cluster-build] %s\n' "$*" >&2; }

# Two cold builds at once would each take the machine for tens of minutes: wait instead.
exec 8>"$bin/.lock"
flock -n 8 || { log "another build is running; waiting for it"; flock 8; }

build_into() {  # build_into DIR MODULE_DIR LDFLAGS PACKAGES...
  local dest=$1 moddir=$2 ldflags=$3; shift 3
  if [ -f "$dest/.complete" ]; then return; fi
  log "building $(basename "$dest") (cached afterwards in $dest)"
  local tmp; tmp=$(mktemp -d "$bin/.build.XXXXXX")
  (cd "$moddir" && go build -ldflags "-s -w $ldflags" -o "$tmp/" "$@")
  touch "$tmp/.complete"
  rm -rf "$dest" && mv "$tmp" "$dest"
}

major=${KUBE_VERSION%%.*}
minor=${KUBE_VERSION#*.}; minor=${minor%%.*}
kube_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=v$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build_into "$bin/etcd-v$ETCD_VERSION" "$here/etcd" "" .
build_into "$bin/kwok-v$KWOK_VERSION" "$here/kwok" \
  "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$KUBE_VERSION" \
  sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl
build_into "$bin/kubernetes-v$KUBE_VERSION" "$here/kubernetes" "$kube_ldflags" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler
# Karpenter declares a newer Go than the machine's: the go command fetches that approved
# toolchain through the module proxy, for this build only. The binary is <dir>/kwok.
GOTOOLCHAIN=go1.27.3 build_into "$bin/karpenter-v$KARPENTER_VERSION" "$here/karpenter" \
  "-X sigs.k8s.io/karpenter/pkg/operator.Version=v$KARPENTER_VERSION" sigs.k8s.io/karpenter/kwok
echo "$bin"
