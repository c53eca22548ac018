# Chatterbox TTS server on an NVIDIA GPU (the image also runs without one: TTS_MODEL=auto then picks Piper).
#   docker build -t chatterbox-tts-server .
#   docker run --gpus all -p 8000:8000 -v hf-cache:/cache/huggingface -v torch-cache:/cache/torch \
#     -v voices:/app/voices chatterbox-tts-server
# torch 2.11.0 from PyPI is built for CUDA 13.0 and brings its own CUDA libraries; the base image's CUDA
# version only has to match it so that the NVIDIA container runtime checks the host driver for it.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# gcc, libc6-dev and python3.11-dev: TORCH_COMPILE's Triton builds each kernel's launcher (C, including
# Python.h) at run time, which the CUDA runtime image has no compiler or headers for.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc libc6-dev \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements.txt requirements-nodeps.txt ./
# As the Makefile installs them: the nodeps packages declare pins that are wrong for us.
RUN pip install --upgrade "pip>=24" \
    && pip install -r requirements.txt \
    && pip install --no-deps -r requirements-nodeps.txt
# .dockerignore lets through only the server's own files (server.py, t3_decoder.py, text_frontend.py, adapters.py,
# tools/, web/).
COPY . .

RUN useradd --create-home --uid 10001 tts \
    && mkdir -p /cache/huggingface /cache/torch /app/voices \
    && chown tts:tts /cache/huggingface /cache/torch /app/voices
# Named volumes copy these directories' owner when first mounted, so the tts user can write to them.
# /cache/torch keeps TORCH_COMPILE's kernels (inductor's and Triton's caches): a restart does not recompile.
ENV HF_HOME=/cache/huggingface \
    VOICES_DIR=/app/voices \
    TORCHINDUCTOR_CACHE_DIR=/cache/torch/inductor \
    TRITON_CACHE_DIR=/cache/torch/triton \
    NUMBA_CACHE_DIR=/tmp/numba
VOLUME ["/cache/huggingface", "/cache/torch", "/app/voices"]
USER tts

EXPOSE 8000
# /ready is 503 while the model downloads, loads and warms up (first start: minutes), then 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = bool(os.environ.get('TLS_CERT')); urllib.request.urlopen('%s://127.0.0.1:%s/ready' % ('https' if tls else 'http', os.environ.get('PORT', '8000')), timeout=4, context=ssl._create_unverified_context() if tls else None)"]
CMD ["python", "server.py"]
