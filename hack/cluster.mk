# The local cluster and Prometheus for end-to-end tests (included by the Makefile).
PROMETHEUS := /usr/bin/prometheus
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: cluster-binaries cluster-up cluster-down karpenter prometheus e2e-prerequisites e2e

# Cached by version under ~/.cache/townsquare: only the first run builds (~6 min on 2 cores,
# and about as long again for Karpenter's kwok provider).
cluster-binaries:
	hack/cluster/build.sh >/dev/null

cluster-up: venv cluster-binaries
	@kubeconfig=$$(hack/cluster/cluster.sh up) && echo "export KUBECONFIG=$$kubeconfig"

cluster-down:
	hack/cluster/cluster.sh down

# Debian's package; the tests start their own server, so the package's service stays off.
prometheus: $(PROMETHEUS)
$(PROMETHEUS):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
	if [ -d /run/systemd/system ]; then $(SUDO) systemctl disable --now prometheus; fi

e2e-prerequisites: venv cluster-binaries prometheus

e2e: e2e-prerequisites
	$(RUN) pytest -m e2e -q tests/e2e

# Karpenter's kwok provider against the local cluster, in the foreground (Ctrl-C stops it).
karpenter: cluster-up
	hack/cluster/karpenter/run.sh "$$(hack/cluster/cluster.sh status)"
