#!/usr/bin/env bash
# Builds helm from its official Go module, pinned in this directory, into a cache keyed by
# version (like hack/cluster/build.sh). A second run builds nothing. Prints the binary's
# path on stdout's last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=version.env
source "$here/version.env"
cache=${TOWNSQUARE_CACHE:-$HOME/.cache/townsquare}
bin="$cache/bin"
dest="$bin/helm-v$HELM_VERSION"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-trimpath

log() { printf '[helm-build] %s\n' "$*" >&2; }

grep -q "helm.sh/helm/v4 v$HELM_VERSION\$" "$here/go.mod" ||
  { log "go.mod does not pin helm.sh/helm/v4 v$HELM_VERSION (version.env)"; exit 1; }

# Two builds at once would each take the machine for minutes: wait instead.
exec 8>"$bin/.lock-helm"
flock -n 8 || { log "another helm build is running; waiting for it"; flock 8; }

if [ ! -f "$dest/.complete" ]; then
  log "building helm v$HELM_VERSION (cached afterwards in $dest)"
  tmp=$(mktemp -d "$bin/.build-helm.XXXXXX")
  pkg=helm.sh/helm/v4/internal/version
  (cd "$here" && go build -o "$tmp/helm" \
    -ldflags "-s -w -X $pkg.version=v$HELM_VERSION -X $pkg.gitTreeState=clean" \
    helm.sh/helm/v4/cmd/helm)
  touch "$tmp/.complete"
  rm -rf "$dest" && mv "$tmp" "$dest"
fi
echo "$dest/helm"
