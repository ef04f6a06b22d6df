# The Helm chart, the Dockerfile and the alert rules, checked with real tools (included by
# the Makefile). helm is built from its pinned Go module (hack/helm), hadolint comes from
# PyPI with the dev dependencies, promtool with Debian's prometheus package.
HELM_VERSION := $(shell sed -n 's/^HELM_VERSION=//p' hack/helm/version.env)
TOWNSQUARE_CACHE ?= $(HOME)/.cache/townsquare
HELM := $(TOWNSQUARE_CACHE)/bin/helm-v$(HELM_VERSION)/helm
CHART := charts/townsquare

.PHONY: helm chart-check chart-crds

# Cached by version: only the first run builds (about 3 minutes on 2 cores).
helm: $(HELM)
$(HELM): hack/helm/go.mod hack/helm/version.env
	hack/helm/build.sh >/dev/null

# Quick (a few seconds): lint the chart, the Dockerfile and the alert rules. The unit and
# e2e tests (tests/unit/test_chart.py, tests/e2e/test_helm_install.py) check the rest.
chart-check: venv helm prometheus
	$(HELM) lint --strict $(CHART)
	.venv/bin/hadolint Dockerfile
	@rules=$$(mktemp --suffix=.yaml) && trap 'rm -f "$$rules"' EXIT && \
	  $(HELM) template townsquare $(CHART) --set metrics.prometheusRule.enabled=true \
	    --show-only templates/prometheusrule.yaml | \
	  $(RUN) python -c 'import sys, yaml; print(yaml.safe_dump(yaml.safe_load(sys.stdin)["spec"]))' \
	    > "$$rules" && promtool check rules "$$rules"

# The chart ships a copy of the generated CRD (tests/unit/test_chart.py keeps them equal).
chart-crds: crd
	cp crds/audiorooms.townsquare.dev.yaml $(CHART)/crds/
