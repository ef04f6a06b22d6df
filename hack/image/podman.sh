#!/usr/bin/env bash
# podman with the project's settings: containers.conf beside this script, and a storage of
# its own under the cache, so images and build layers survive between runs and never mix
# with anything else on the machine.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${TOWNSQUARE_CACHE:-$HOME/.cache/townsquare}
export CONTAINERS_CONF=$here/containers.conf
run=${XDG_RUNTIME_DIR:-/run}/townsquare-containers
exec podman --root "$cache/containers/storage" --runroot "$run" "$@"
