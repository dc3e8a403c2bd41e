# smrd image: the builder compiles the Cython extension into a wheel; the runtime is slim and
# runs as a non-root user. Build from the repository root:
#   podman build -f docker/smrd.Dockerfile -t localhost/smrd .
# Base images are build arguments so a locally bootstrapped base can stand in where no registry
# is reachable (see docker/README.md). Not yet built in CI (issue 7: images and pod lab).
ARG BUILDER_IMAGE=docker.io/library/python:3.11-bookworm
ARG RUNTIME_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY smrd ./smrd
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${RUNTIME_IMAGE}
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin smrd
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels smrd \
    && rm -rf /wheels \
    && smrd --version \
    && python -c "import smrd.core; assert smrd.core.IMPLEMENTATION == 'cython'"
USER 10001
ENTRYPOINT ["smrd"]
CMD ["--help"]
