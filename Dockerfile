# The townsquare operator image. Untested here: the development machine has no container
# engine and no registry, so this file is only linted (hadolint); see README "Image".
#
#   docker build -t registry.example/townsquare/operator:0.1.0 .
#
# Build stage: the locked runtime dependencies and the package, installed into a venv by uv.
FROM python:3.11.14-slim-bookworm AS build
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir --disable-pip-version-check uv==0.13.9
WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --no-editable
COPY operator/ operator/
RUN uv sync --frozen --no-dev --no-editable

# Final stage: the same Python, the venv, no build tools, no root.
FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="townsquare" \
      org.opencontainers.image.description="Kubernetes operator that pre-warms and autoscales live audio rooms" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /app/.venv /app/.venv
# 65532: the conventional "nonroot" id; the chart runs the pod as this user too.
USER 65532:65532
# 8080: kopf's liveness endpoint (/healthz); 9090: the operator's /metrics.
EXPOSE 8080 9090
ENTRYPOINT ["townsquare"]
CMD ["run", "--log-format=json", "--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=9090"]
