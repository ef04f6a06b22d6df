#!/usr/bin/env bash
# Builds the townsquare image with podman into the project's storage under
# ~/.cache/townsquare/containers, from the Dockerfile's pinned upstream base when it is
# present or can be pulled, and from a debootstrapped local base (base.sh) otherwise.
# TOWNSQUARE_IMAGE_BASE=REF picks a base explicitly.
#
# The image is tagged by the content of everything the build reads (Dockerfile, build
# context, base image id): when that tag exists nothing is built at all. Prints the image
# reference on stdout's last line.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
podman=$here/podman.sh
cache=${TOWNSQUARE_CACHE:-$HOME/.cache/townsquare}
repository=localhost/townsquare/operator

log() { printf '[image] %s\n' "$*" >&2; }

mkdir -p "$cache/containers"
exec 9>"$cache/containers/.build.lock"
flock -n 9 || { log "another image build is running; waiting for it"; flock 9; }

# The Dockerfile's default base is the single statement of which upstream image we pin.
upstream=$(sed -n 's/^ARG BASE=//p' "$repo/Dockerfile")
release=${upstream##*-}  # python:3.11.14-slim-bookworm -> bookworm
base=${TOWNSQUARE_IMAGE_BASE:-}
if [ -z "$base" ]; then
  if "$podman" image exists "$upstream" || "$podman" pull -q "$upstream" >/dev/null 2>&1; then
    base=$upstream
  else
    log "$upstream cannot be pulled (no registry reachable): using a local Debian $release base"
    base=$("$here/base.sh" "$release")
  fi
fi
base_id=$("$podman" image inspect --format '{{.Id}}' "$base")

# Everything the build reads, as the build context sees it (.dockerignore: these files, and
# no __pycache__).
digest=$(
  cd "$repo"
  {
    printf 'base %s\n' "$base_id"
    find Dockerfile .dockerignore pyproject.toml uv.lock README.md operator \
      -type f ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -n 1)
image=$repository:src-$digest

if "$podman" image exists "$image"; then
  log "$image is up to date (nothing to build)"
else
  log "building $image from $base"
  args=(--pull=never --network host --layers --build-arg "BASE=$base")
  # Outgoing TLS may be re-signed by a local authority (as on the development VM): the
  # build trusts the host's bundle, mounted read-only and never copied into a layer.
  ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  if [ -f "$ca" ]; then
    args+=(--volume "$(readlink -f "$ca"):/run/host-ca.crt:ro" --build-arg SSL_CERT_FILE=/run/host-ca.crt)
  fi
  "$podman" build "${args[@]}" --tag "$image" --file "$repo/Dockerfile" "$repo" >&2
  # Only the newest few images stay (several checkouts may share this cache, and a test
  # may be running one): the layers they share with the new one are kept either way.
  "$podman" images --sort created --noheading --format '{{.Repository}}:{{.Tag}}' \
    "$repository" | grep ":src-" | tail -n +5 | xargs -r "$podman" rmi >/dev/null 2>&1 || true
fi
"$podman" tag "$image" "$repository:$version" "$repository:latest"
echo "$image"
