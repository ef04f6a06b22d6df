#!/usr/bin/env bash
# podman with the project's settings: containers.conf beside this script, and a storage of
# its own under the cache, so images and build layers survive between runs and never mix
# with anything else on the machine.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${TOWNSQUARE_CACHE:-$HOME/.cache/townsquare}
export CONTAINERS_CONF=$here/containers.conf
# Run-time state on tmpfs, one directory per storage (a second cache gets its own). podman
# records it in the storage, so it must not depend on the session: /run for root.
runtime=$([ "$(id -u)" = 0 ] && echo /run || echo "${XDG_RUNTIME_DIR:-/tmp}")
run=$runtime/townsquare-containers-$(printf '%s' "$cache" | sha256sum | cut -c1-8)
exec podman --root "$cache/containers/storage" --runroot "$run" "$@"
