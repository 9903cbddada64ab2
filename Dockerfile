# grok-serve for NVIDIA GPUs: the image KubeRay runs as head and GPU workers
# (helm/grok-serve), and a standalone server (`docker run --gpus all`).
#
#   docker build -t grok-serve:0.1.0 .
#   docker run --gpus all --shm-size 64g -p 8000:8000 -p 9000:9000 -v /data/grok-1-st:/models/grok-1:ro \
#     -e GROK_SERVE_API_KEYS=change-me grok-serve:0.1.0 grok-serve up --config deploy/h100x8.yaml
#
# Without arguments it serves the tiny random-weight preset on CPU (deploy/local-cpu.yaml).

# The runtime flavour (not devel): Triton compiles its kernels with its own bundled ptxas, and needs
# only a host C compiler for its small launcher stubs.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# The CUDA build of torch must match the base image's CUDA major version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Must equal the chart's rayVersion: KubeRay and the autoscaler speak to this Ray.
ARG RAY_VERSION=2.60.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# gcc and python3-dev: Triton builds its CUDA launcher at first use. g++: the CPU path's C++
# kernels (kernels/csrc) are compiled at first use for the CPU at hand. wget: KubeRay's default
# liveness and readiness probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc g++ libc6-dev wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "${VIRTUAL_ENV}"

# torch first, from the CUDA index: `pip install .` then finds torch>=2.6 satisfied and keeps it
# (PyPI's default wheel would be a different build).
RUN pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY kernels ./kernels
COPY deploy ./deploy
RUN pip install . "ray[serve]==${RAY_VERSION}" \
    && python -c "import services.serve_app, kernels" \
    && grok-serve --help > /dev/null

# Ubuntu's images ship a user "ubuntu" with uid 1000; the chart runs pods as 1000, so it becomes ours.
RUN if id -u ubuntu > /dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash grok \
    && mkdir -p /models && chown grok:grok /models
USER 1000:1000

# 8000: HTTP (OpenAI API, /health, /metrics); 9000: gRPC.
EXPOSE 8000 9000

# Loading Grok-1 takes minutes: the start period covers it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["grok-serve", "up", "--config", "deploy/local-cpu.yaml", "--host", "0.0.0.0"]
