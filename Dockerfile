# modelhost container images (docs/deployment.md). Two targets:
#
#   cpu  (the default)  Debian + CPython 3.11, modelhost[llamacpp,speech,embeddings,diarization]
#                       with PyTorch's CPU build. Serves the built-in models (SmolLM2-135M chat,
#                       Whisper tiny.en, all-MiniLM-L6-v2, speaker diarization) with no GPU
#                       and no network, and GGUF models from the cache.
#   cuda                Ubuntu + CUDA (nvidia/cuda), CPython 3.12, vLLM and the same extras
#                       (vLLM's CUDA build of PyTorch); needs the NVIDIA Container Toolkit.
#
#   docker build --target cpu  -t modelhost:0.1.0-cpu .
#   docker build --target cuda -t modelhost:0.1.0-cuda .
#
# Everything is pinned: base images by exact tag (add @sha256:<digest> after a tag to pin the
# bytes as well; `docker buildx imagetools inspect IMAGE:TAG` prints the digest), the CPU
# image's Python packages by deploy/docker/constraints-cpu.txt (deploy/docker/lock.py), the
# main ones by the build args below (`--build-arg VLLM_VERSION=...` to change one).
# Compiling happens in the *-wheels stages only: the final stages install wheels.
# Both images run as uid 10001, keep their state in /data and the model cache in /models
# (volumes), listen on 0.0.0.0:8000 and refuse to start without keys (deploy/docker/entrypoint.py
# reads them from secret files: MODELHOST_OPENAI_API_KEYS_FILE, MODELHOST_ADMIN_KEYS_FILE).

ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
ARG TORCH_VERSION=2.13.0
# 0.34.0 pins flashinfer-python==0.7.3, which PyPI does not have: it cannot be installed.
ARG VLLM_VERSION=0.33.0

# ------------------------------------------------------------------------------ CPU image
FROM python:3.11.14-slim-bookworm AS cpu-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

FROM cpu-base AS cpu-wheels
ARG LLAMA_CPP_PYTHON_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian bookworm's versions (a stable release: they change only for security fixes).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 cmake=3.25.1-1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY deploy/docker/constraints-cpu.txt /src/constraints.txt
# llama.cpp for any x86-64 CPU with AVX2, not only the build machine's (GGML_NATIVE=OFF), and
# with ggml's own thread pool instead of OpenMP, so that the image needs no libgomp. Then the
# other packages that PyPI has only as source (resemblyzer's).
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" \
        pip wheel --no-deps --wheel-dir /wheels "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" \
    && pip wheel --no-deps --wheel-dir /wheels --constraint constraints.txt webrtcvad typing
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip wheel --no-deps --wheel-dir /wheels /src

# ------------------------------------------------------------------------------ CUDA image
FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS cuda-base
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Python 3.12 is Ubuntu 24.04's; Triton (vLLM's kernels) compiles a small C helper at run
# time, hence gcc and the headers. Not pinned to exact versions: Ubuntu's -updates and
# -security pockets keep only the newest build of a package, so an exact pin stops building
# at the next update; the base image's tag (or digest) fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3.12 -m venv /opt/venv

FROM cuda-base AS cuda-wheels
ARG LLAMA_CPP_PYTHON_VERSION
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY deploy/docker/constraints-cpu.txt /src/constraints.txt
# llama.cpp on the CPU here too (the built-in chat model, GGUF models); LLMs on the GPUs go
# to vLLM.
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" \
        pip wheel --no-deps --wheel-dir /wheels "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" \
    && pip wheel --no-deps --wheel-dir /wheels --constraint constraints.txt webrtcvad typing
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip wheel --no-deps --wheel-dir /wheels /src

FROM cuda-base AS cuda
ARG LLAMA_CPP_PYTHON_VERSION
ARG VLLM_VERSION
COPY --from=cuda-wheels /wheels /tmp/wheels
COPY deploy/docker/constraints-cpu.txt /tmp/constraints.txt
# vLLM pins its own PyTorch (CUDA build) and kernels exactly. The modelhost wheel is installed
# by path: a package of the same name on PyPI must never replace it. webrtcvad and typing are
# pinned to the wheels built above. Wheels only.
RUN pip install --only-binary=:all: --find-links /tmp/wheels \
        "vllm==${VLLM_VERSION}" \
        "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" \
        "$(grep -E '^webrtcvad==' /tmp/constraints.txt)" \
        "$(grep -E '^typing==' /tmp/constraints.txt)" \
        "$(echo /tmp/wheels/modelhost-*.whl)[vllm,llamacpp,speech,embeddings,diarization]" \
    && rm -rf /tmp/wheels /tmp/constraints.txt
RUN groupadd --system --gid 10001 modelhost \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/modelhost \
        --shell /usr/sbin/nologin modelhost \
    && install -d -o 10001 -g 10001 -m 0750 /data /models
COPY deploy/docker/entrypoint.py deploy/docker/healthcheck.py /opt/modelhost/
ENV MODELHOST_API_HOST=0.0.0.0 \
    MODELHOST_API_PORT=8000 \
    MODELHOST_DATA_DIR=/data \
    MODELHOST_MODEL_CACHE_DIR=/models \
    HF_HOME=/models/.huggingface \
    HF_HUB_CACHE=/models
VOLUME ["/data", "/models"]
EXPOSE 8000
USER 10001:10001
WORKDIR /home/modelhost
# A large model takes minutes to load: /ready is 503 until every `required` model is ready.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "/opt/modelhost/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "/opt/modelhost/entrypoint.py"]
CMD ["modelhost", "serve"]
LABEL org.opencontainers.image.title="modelhost (CUDA, vLLM)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# ------------------------------------------------------------------------------ CPU image
# Last, so that a plain `docker build .` builds it.
FROM cpu-base AS cpu
ARG LLAMA_CPP_PYTHON_VERSION
ARG TORCH_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=cpu-wheels /wheels /tmp/wheels
COPY deploy/docker/constraints-cpu.txt /tmp/constraints.txt
# PyTorch's CPU build comes from PyTorch's index (the `+cpu` versions are only there; PyPI's
# torch is the CUDA build, with gigabytes of nvidia-* wheels), everything else from PyPI at the
# versions of the constraints file; wheels only.
RUN pip install --only-binary=:all: --extra-index-url https://download.pytorch.org/whl/cpu \
        --find-links /tmp/wheels --constraint /tmp/constraints.txt \
        "torch==${TORCH_VERSION}+cpu" \
        "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" \
        "$(echo /tmp/wheels/modelhost-*.whl)[llamacpp,speech,embeddings,diarization]" \
    && rm -rf /tmp/wheels /tmp/constraints.txt
RUN groupadd --system --gid 10001 modelhost \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/modelhost \
        --shell /usr/sbin/nologin modelhost \
    && install -d -o 10001 -g 10001 -m 0750 /data /models
COPY deploy/docker/entrypoint.py deploy/docker/healthcheck.py /opt/modelhost/
ENV MODELHOST_API_HOST=0.0.0.0 \
    MODELHOST_API_PORT=8000 \
    MODELHOST_DATA_DIR=/data \
    MODELHOST_MODEL_CACHE_DIR=/models \
    HF_HOME=/models/.huggingface \
    HF_HUB_CACHE=/models
VOLUME ["/data", "/models"]
EXPOSE 8000
USER 10001:10001
WORKDIR /home/modelhost
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/opt/modelhost/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "/opt/modelhost/entrypoint.py"]
CMD ["modelhost", "serve"]
LABEL org.opencontainers.image.title="modelhost (CPU)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
