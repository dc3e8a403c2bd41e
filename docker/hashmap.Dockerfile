# The demo app alone: a plain TCP hashmap server that knows nothing of smrd (one file, standard
# library only). Build from the repository root:
#   podman build -f docker/hashmap.Dockerfile -t localhost/smrd-hashmap .
ARG RUNTIME_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${RUNTIME_IMAGE}
RUN useradd --uid 10002 --no-create-home --shell /usr/sbin/nologin app
COPY smrd/apps/hashmap.py /app/hashmap.py
USER 10002
EXPOSE 7000
ENTRYPOINT ["python", "/app/hashmap.py"]
CMD ["--host", "127.0.0.1", "--port", "7000", "--framing", "line"]
