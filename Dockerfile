# The kvpool image: cache node, lookup, agent and operator (one image, the command picks the role).
# The vLLM connector is delivered into vLLM pods by the webhook's init container from this image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cachenode cachenode
COPY connector connector
COPY operator operator
COPY cli cli
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[tiers,operator]"

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home kvpool
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
EXPOSE 7400 7401 7402
ENTRYPOINT ["kvpool"]
CMD ["node"]
