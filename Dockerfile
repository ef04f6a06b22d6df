# The townsquare image: one image for every `townsquare` command (run, edge, relay, origin,
# plan, ...). `make image` builds it with podman and `make image-smoke` runs it the way the
# chart does; see README "Image".
#
#   docker build -t REGISTRY/townsquare/operator:0.1.0 .
#   podman build -t REGISTRY/townsquare/operator:0.1.0 .
#
# BASE is the only thing a build may change: the pinned upstream Python by default, or a
# Debian bookworm base with the same Python minor (hack/image/base.sh makes one where no
# registry is reachable). Both stages use it, so the venv's interpreter is the final one's.
ARG BASE=docker.io/library/python:3.11.14-slim-bookworm

# Build stage: the locked runtime dependencies and the package, installed into a venv by uv.
FROM ${BASE} AS build
# An extra CA bundle for TLS-intercepting proxies (mounted by the build, never copied).
ARG SSL_CERT_FILE
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN python3 -m venv /opt/uv \
 && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check \
      ${SSL_CERT_FILE:+--cert "$SSL_CERT_FILE"} uv==0.13.9
WORKDIR /src
# Dependencies first, so a change to the code or the README does not reinstall them.
COPY pyproject.toml uv.lock ./
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-install-project --no-editable
COPY README.md ./
COPY operator/ operator/
# kubernetes ships a second, asyncio copy of its generated client (about 70 MB) that
# nothing here imports (the smoke test imports every module of the package in the image);
# uv's lock file is world-writable, and the user may write nothing in the image.
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-editable \
 && rm -rf /app/.venv/lib/python3*/site-packages/kubernetes/aio /app/.venv/.lock

# Final stage: the same Python and the venv; no uv, no compilers, no root.
FROM ${BASE}
LABEL org.opencontainers.image.title="townsquare" \
      org.opencontainers.image.description="Kubernetes operator that pre-warms and autoscales live audio rooms, with its edge and relays" \
      org.opencontainers.image.licenses="Apache-2.0"
# MALLOC_ARENA_MAX: fewer glibc heap arenas for kopf's worker threads (the chart sets it too).
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2
COPY --from=build /app/.venv /app/.venv
# 65532: the conventional "nonroot" id; the chart runs the pod as this user too. Every file
# stays root's: the user can write nowhere but the /tmp the chart mounts.
USER 65532:65532
# 8080: kopf's liveness endpoint (/healthz); 9090: the operator's /metrics.
EXPOSE 8080 9090
ENTRYPOINT ["townsquare"]
CMD ["run", "--log-format=json", "--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=9090"]
