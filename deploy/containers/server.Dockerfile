# metafleet server for linux/amd64.  Build from the repository root:
#   docker build -f deploy/containers/server.Dockerfile -t metafleet-server .
# Run (certificates from `metafleet certs`, run directories kept on the host):
#   docker run -d --name metafleet-server -p 9092:9092 \
#     -v /etc/metafleet/certs:/etc/metafleet/certs:ro -v /var/lib/metafleet/runs:/var/lib/metafleet/runs \
#     metafleet-server --dataset watch --algorithm reptile --clients 10 --rounds 100
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# PyTorch's CPU-only wheel: PyPI's default Linux wheel is a CUDA build of several GB that a server without
# a GPU does not need.
RUN python -m venv /opt/metafleet/venv \
 && /opt/metafleet/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"

COPY . /opt/metafleet/src
RUN /opt/metafleet/venv/bin/pip install "/opt/metafleet/src[server,dp]" \
 && useradd --system --home-dir /var/lib/metafleet --create-home metafleet \
 && mkdir -p /var/lib/metafleet/runs && chown metafleet:metafleet /var/lib/metafleet/runs

USER metafleet
WORKDIR /var/lib/metafleet
EXPOSE 9092
ENTRYPOINT ["/opt/metafleet/venv/bin/metafleet", "server", "--certs", "/etc/metafleet/certs", \
            "--host", "0.0.0.0", "--port", "9092", "--out", "/var/lib/metafleet/runs/current", "--continue"]
