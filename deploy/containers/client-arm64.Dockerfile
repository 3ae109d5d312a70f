# metafleet client for a 64-bit ARM device (Raspberry Pi 4/5 with a 64-bit OS).  Build on the device, or
# cross-build from the repository root:
#   docker buildx build --platform linux/arm64 -f deploy/containers/client-arm64.Dockerfile -t metafleet-client .
# Run (the device's data folder, key and the fleet's CA certificate from the host):
#   docker run -d --restart unless-stopped --name metafleet-client \
#     -v /var/lib/metafleet/data:/data -v /etc/metafleet:/etc/metafleet:ro \
#     metafleet-client --superlink fleet.example.org:9092 --client-id 7
FROM --platform=linux/arm64 python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# scripts/install picks constraints-aarch64.txt by architecture: PyPI's CPU-only aarch64 torch (2.10.0; PyPI's
# later aarch64 wheels are CUDA builds that would pull about 2.9 GB of NVIDIA libraries). Client extra only.
COPY . /opt/metafleet/src
RUN cd /opt/metafleet/src && METAFLEET_VENV=/opt/metafleet/venv scripts/install client \
 && useradd --system --home-dir /var/lib/metafleet --create-home metafleet

USER metafleet
WORKDIR /var/lib/metafleet
ENTRYPOINT ["/opt/metafleet/venv/bin/metafleet", "client", "--data", "/data", \
            "--root-cert", "/etc/metafleet/ca.pem", "--key", "/etc/metafleet/device.key"]
