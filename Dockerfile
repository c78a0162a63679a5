# syntax=docker/dockerfile:1
# ultramem-dist image: shard servers (`serve-shard`), Ray head/workers (KubeRay), the `up`
# placement Job, `helm test`, and the ValueStore operator (`kopf run -m ultramem_operator.main`).
#
#   CPU (default):
#     docker build -t ghcr.io/ultramem/ultramem-dist:0.1.0 .
#   CPU value shards only (`serve-shard`, no torch/Ray/kopf; the chart's image.shardCpuTag):
#     docker build --target shard-cpu -t ghcr.io/ultramem/ultramem-dist:0.1.0-shard-cpu .
#   CUDA:
#     docker build -t ghcr.io/ultramem/ultramem-dist:0.1.0-cuda \
#       --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim
FROM ${BASE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/ultramem/operators \
    HOME=/tmp

# python:3.11-slim has Python and bash (KubeRay starts Ray through bash); the CUDA runtime
# images have neither Python nor venv, so install them there (Ubuntu 24.04: Python 3.12).
# gcc: the native CPU gather-pool kernel is compiled on first use on the node that runs it
# (-march=native, cached under $HOME/.cache = /tmp); without it shards use the torch path.
RUN set -eux; \
    apt-get update; \
    pkgs="gcc libc6-dev"; \
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        pkgs="$pkgs python3 python3-venv ca-certificates"; \
    fi; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'; \
    python3 -m venv "$VIRTUAL_ENV"; \
    pip install --upgrade pip

WORKDIR /opt/ultramem

# Non-root; the chart runs it with a read-only root filesystem and an emptyDir at /tmp.
RUN groupadd --system --gid 10001 ultramem \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin ultramem

# -- shard-cpu: a CPU value shard needs numpy, gRPC and the C kernel, not torch (~0.7 GB),
# Ray or the Kubernetes client; `serve-shard` there never imports them (the import check
# below fails the build if it did). GPU shards, Ray workers and the operator use the full image.
FROM base AS shard-cpu
COPY docker/shard-cpu-requirements.txt ./
RUN pip install -r shard-cpu-requirements.txt
COPY pyproject.toml README.md ./
COPY ultramem_dist ./ultramem_dist
RUN pip install --no-deps . \
    && python -c "import sys; from ultramem_dist.cli import load_commands; load_commands(); import ultramem_dist.serving.app, ultramem_dist.serving.supervisor; bad = {'torch', 'ray', 'kubernetes'} & set(sys.modules); assert not bad, bad" \
    && python -m ultramem_dist.kernels.native --out /tmp/check-native.so && rm /tmp/check-native.so \
    && ultramem-dist serve-shard --help >/dev/null
USER 10001:10001
EXPOSE 50051 9090
CMD ["ultramem-dist", "serve-shard", "--help"]

# -- full (the default target): everything, torch included.
FROM base AS full
ARG TORCH_VERSION=2.13.0
# CPU wheels by default; a CUDA build points this at the matching CUDA wheel index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# torch first, from its own index (the CPU wheel unless TORCH_INDEX_URL says otherwise), in a
# layer of its own so code changes do not re-download it.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

# The package with the operator extra (kopf); torch==2.13.0 is already satisfied.
COPY pyproject.toml README.md ./
COPY ultramem_dist ./ultramem_dist
COPY operators/ultramem_operator ./operators/ultramem_operator
RUN pip install ".[operator]" \
    && pip check \
    && python -c "import torch, ultramem_dist, ultramem_operator; print('torch', torch.__version__)" \
    && python -m ultramem_dist.kernels.native --out /tmp/check-native.so && rm /tmp/check-native.so \
    && ultramem-dist --help >/dev/null

USER 10001:10001

EXPOSE 50051 9090
CMD ["ultramem-dist", "--help"]
