#!/usr/bin/env bash
# A local stand-in for the pinned upstream base, for machines that reach no registry:
# Debian's minimal system of the same release plus Debian's python3 (the same minor as the
# upstream tag), made by debootstrap and imported into the project's podman storage as
# localhost/townsquare/base:RELEASE-YYYYMMDD. The newest one younger than
# TOWNSQUARE_BASE_MAX_AGE_DAYS (30) is reused, so only the first run (and a monthly
# refresh for security updates) pays the ~1.5 minutes. Prints the image reference.
#
#   hack/image/base.sh RELEASE
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
release=${1:?usage: base.sh RELEASE (e.g. bookworm)}
podman=$here/podman.sh
repository=localhost/townsquare/base
max_age_days=${TOWNSQUARE_BASE_MAX_AGE_DAYS:-30}
mirror=${TOWNSQUARE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
sudo=$([ "$(id -u)" = 0 ] || echo sudo)

log() { printf '[image-base] %s\n' "$*" >&2; }

newest=$("$podman" images --noheading --format '{{.Tag}}' "$repository" \
  | grep -E "^$release-[0-9]{8}$" | sort | tail -n 1 || true)
if [ -n "$newest" ]; then
  built=$(date -u -d "${newest#"$release"-}" +%s)
  if [ $(( ($(date -u +%s) - built) / 86400 )) -lt "$max_age_days" ]; then
    echo "$repository:$newest"
    exit 0
  fi
  log "$repository:$newest is older than $max_age_days days: making a fresh one"
fi

tag="$repository:$release-$(date -u +%Y%m%d)"
log "debootstrap $release from $mirror into $tag (once; cached in the podman storage)"
rootfs=$(mktemp -d)
trap '$sudo rm -rf "$rootfs"' EXIT
# minbase: dpkg, apt and the essential packages only; python3-venv gives the build stage
# `python3 -m venv` as the upstream image does; ca-certificates for TLS to Prometheus.
$sudo debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$release" "$rootfs" "$mirror" >&2
# What an image needs no copy of: package lists and archives, logs, manuals, translations
# (each package's copyright file stays).
$sudo find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
$sudo rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/* \
  "$rootfs"/var/cache/debconf/*-old
$sudo tar --numeric-owner -C "$rootfs" -c . | "$podman" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $release + python3 ($mirror)" \
  - "$tag" >/dev/null
echo "$tag"
