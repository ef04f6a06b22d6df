# The image, built and run with podman from Debian's packages (included by the Makefile).
# Images and build layers live in their own storage under $(TOWNSQUARE_CACHE)/containers,
# tagged by the content of what the build reads: a warm run builds nothing.
IMAGE_PACKAGES := podman buildah debootstrap runc fuse-overlayfs uidmap slirp4netns \
  containernetworking-plugins iptables
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: podman image image-smoke

podman:
	@missing=$$(for package in $(IMAGE_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$package 2>/dev/null | grep -q "ok installed" \
	    || echo $$package; done); \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    $$missing; \
	fi

# From the Dockerfile's pinned base where a registry answers, else from a local Debian base.
image: podman
	@hack/image/build.sh

# The image run as the chart runs it, the operator from it against the local cluster
# (tests/e2e/test_image.py; `make test` runs it too).
image-smoke: image e2e-prerequisites helm
	$(RUN) pytest -q tests/e2e/test_image.py

test: image
