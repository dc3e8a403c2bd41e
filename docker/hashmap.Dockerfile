# The demo app alone: a plain TCP hashmap server that knows nothing of smrd (one file, standard
# library only), non-root uid 10002. Build from the repository root:
#   podman build -f docker/hashmap.Dockerfile -t localhost/smrd-hashmap .
# RUNTIME_IMAGE: any base with python3 (docker/README.md: a registry image or a local debootstrap
# base). The smrd image contains the same app (`python -m smrd.apps.hashmap`); this one is for
# running it as a separate container, as any unmodified app would be.
ARG RUNTIME_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${RUNTIME_IMAGE}
RUN useradd --uid 10002 --user-group --no-create-home --shell /usr/sbin/nologin app
COPY smrd/apps/hashmap.py /app/hashmap.py
RUN python3 /app/hashmap.py --help >/dev/null
USER 10002:10002
EXPOSE 7000
ENTRYPOINT ["python3", "/app/hashmap.py"]
CMD ["--host", "127.0.0.1", "--port", "7000", "--framing", "line"]
