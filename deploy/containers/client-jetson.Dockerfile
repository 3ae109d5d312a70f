# metafleet client for an NVIDIA Jetson (JetPack 6, L4T r36, Python 3.10).  Build on the Jetson:
#   docker build -f deploy/containers/client-jetson.Dockerfile -t metafleet-client-jetson .
# Run with the NVIDIA runtime:
#   docker run -d --runtime nvidia --restart unless-stopped --name metafleet-client \
#     -v /var/lib/metafleet/data:/data -v /etc/metafleet:/etc/metafleet:ro \
#     metafleet-client-jetson --superlink fleet.example.org:9092 --client-id 7
# PyTorch is NVIDIA's build for JetPack 6; metafleet is installed without letting pip replace it.
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# NVIDIA's torch wheel for JetPack 6 (CUDA 12.6) from the Jetson AI Lab index, into a venv that can still
# see nothing else of the system's Python.
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/metafleet/venv \
 && /opt/metafleet/venv/bin/pip install --index-url https://pypi.jetson-ai-lab.dev/jp6/cu126 "torch>=2.4"

COPY . /opt/metafleet/src
# --no-deps for metafleet itself so that pip cannot replace NVIDIA's torch with PyPI's.
RUN /opt/metafleet/venv/bin/pip install "flwr==1.42.*" "numpy>=1.24" \
 && /opt/metafleet/venv/bin/pip install --no-deps /opt/metafleet/src \
 && useradd --system --home-dir /var/lib/metafleet --create-home metafleet

USER metafleet
WORKDIR /var/lib/metafleet
ENTRYPOINT ["/opt/metafleet/venv/bin/metafleet", "client", "--data", "/data", \
            "--root-cert", "/etc/metafleet/ca.pem", "--key", "/etc/metafleet/device.key"]
