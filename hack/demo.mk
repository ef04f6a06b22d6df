# `make demo`: a compressed launch on a cluster of its own, written up under out/demo/
# (included by the Makefile). The demo cluster is deleted afterwards, also on failure or Ctrl-C.
DEMO_OUT ?= out/demo
# TOWNSQUARE_CLUSTER names the cluster (default demo), so demos side by side never share one.
DEMO_CLUSTER := TOWNSQUARE_CLUSTER=$(or $(TOWNSQUARE_CLUSTER),demo) hack/cluster/cluster.sh

demo: venv cluster-binaries prometheus
	@set -euo pipefail; \
	trap '$(DEMO_CLUSTER) down' EXIT; \
	kubeconfig=$$($(DEMO_CLUSTER) up | tail -n1); \
	$(RUN) townsquare demo --kubeconfig "$$kubeconfig" --out $(DEMO_OUT)

# The same launch where relays fit only on nodes that Karpenter's kwok provider adds (20 s
# each), with node headroom asking for them ahead of the pre-warm (out/demo-nodes/).
demo-nodes: venv cluster-binaries prometheus
	@set -euo pipefail; \
	trap '$(DEMO_CLUSTER) down' EXIT; \
	kubeconfig=$$($(DEMO_CLUSTER) up | tail -n1); \
	$(RUN) townsquare demo --nodes --start-in 75 --kubeconfig "$$kubeconfig" --out $(DEMO_OUT)-nodes
