# The kvpool image: one image for the operator, cache nodes, the lookup service and the agent
# (the command picks the role), and the source of the vLLM connector that the webhook's init
# container copies into vLLM pods (`kvpool payload`). Tag it with the chart's appVersion:
#   docker build -t ghcr.io/kvpool/kvpool:0.1.0 .
# Nodes, agents and the operator never import torch, so neither torch nor the compiled KV-copy
# extension (csrc/) is in here; the connector copies KV with vLLM's own torch in vLLM's pods.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# The connector payload's compiled dependencies, for every CPython a vLLM image may run
# (cli/payload_cmd.py: EXTRA_DEPENDENCIES, PYTHONS), for this image's architecture.
ARG PAYLOAD_DEPENDENCIES="xxhash==4.1.0"
RUN set -eux; \
    arch="$(uname -m)"; \
    for version in 3.11 3.12 3.13 3.14; do \
      pip download --no-cache-dir --no-deps --only-binary=:all: --python-version "$version" \
        --platform "manylinux2014_${arch}" --platform "manylinux_2_17_${arch}" \
        --dest /payload-wheels ${PAYLOAD_DEPENDENCIES}; \
    done
COPY pyproject.toml README.md ./
COPY cachenode cachenode
COPY connector connector
COPY operator operator
COPY cli cli
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[tiers,operator]"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kvpool" \
      org.opencontainers.image.description="Kubernetes-native distributed KV cache for LLM serving" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 kvpool && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin kvpool
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels "kvpool[tiers,operator]==${VERSION}" && rm -rf /tmp/wheels
COPY --from=build /payload-wheels /opt/kvpool/payload-wheels
# cache node 7400-7402, lookup 7410-7411, agent 7420-7421, operator health 8080, metrics 8081, webhook 9443
EXPOSE 7400 7401 7402 7410 7411 7420 7421 8080 8081 9443
# Kubernetes uses the probes the operator and the chart render; this is for docker and compose.
# KVPOOL_HEALTHCHECK_URL: the role's health endpoint (default: a cache node's).
ENV KVPOOL_HEALTHCHECK_URL=http://127.0.0.1:7401/healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['KVPOOL_HEALTHCHECK_URL'], timeout=4)"]
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["kvpool"]
CMD ["node"]
