# smrd image: both roles (`--role server` / `--role client`), the `smrd` CLI and the hashmap demo
# app (`python -m smrd.apps.hashmap`, what the Helm chart runs by default beside each replica).
#
#   builder: compiles smrd._core (Cython) into a wheel and installs it, with its dependencies, into
#            the virtual environment /opt/smrd.
#   runtime: a slim base, /opt/smrd copied in (no compiler, no pip), non-root uid 10001,
#            ENTRYPOINT ["smrd"]; the build fails unless `smrd --version` runs and the compiled
#            core (not its pure-Python twin) loads.
#
# Build from the repository root (docker/README.md has the full commands):
#   podman build -f docker/smrd.Dockerfile -t localhost/smrd .
#
# Build arguments:
#   BUILDER_IMAGE  needs python3 with venv/ensurepip, a C compiler and the Python headers
#   RUNTIME_IMAGE  needs the SAME python3 at the same path (the venv is copied across)
#   WHEELS         a directory in the build context. Empty (only its README): pip uses the index
#                  (a registry base with network). Holding wheels (dependencies, and Cython /
#                  setuptools / wheel for the build): pip runs with --no-index --find-links on
#                  them, so the build needs no network (`podman build --network none`).
ARG BUILDER_IMAGE=docker.io/library/python:3.11-bookworm
ARG RUNTIME_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BUILDER_IMAGE} AS builder
ARG WHEELS=docker/wheels
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /src
COPY ${WHEELS}/ /wheels/
COPY pyproject.toml setup.py README.md ./
COPY smrd ./smrd
# A checkout that was built in place carries its own _core.c/.so: compile afresh for this Python.
RUN rm -rf build smrd/_core.c smrd/_core.html smrd/*.so \
    && if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links=/wheels; else set --; fi \
    && python3 -m venv /opt/smrd \
    && /opt/smrd/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist "$@" . \
    && /opt/smrd/bin/pip install --no-cache-dir "$@" /dist/smrd-*.whl \
    && /opt/smrd/bin/pip uninstall --yes pip setuptools

FROM ${RUNTIME_IMAGE}
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/smrd \
        --shell /usr/sbin/nologin smrd \
    && mkdir -p /var/lib/smrd /etc/smrd \
    && chown 10001:10001 /var/lib/smrd
COPY --from=builder /opt/smrd /opt/smrd
ENV PATH=/opt/smrd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN smrd --version \
    && python -c "import smrd.core; assert smrd.core.IMPLEMENTATION == 'cython', smrd.core.IMPLEMENTATION" \
    && python -m smrd.apps.hashmap --help >/dev/null
USER 10001:10001
# The write-ahead log of a replica (`--data-dir` defaults below the working directory); hosts.conf
# is expected at /etc/smrd/hosts.conf by the Helm chart (mounted from a ConfigMap).
WORKDIR /var/lib/smrd
# peer, client (replica), gateway, replica metrics, gateway metrics: the chart's defaults.
EXPOSE 11000 11001 8080 9100 9200
ENTRYPOINT ["smrd"]
CMD ["--help"]
