# syntax=docker/dockerfile:1

# Targets: `api` (the HTTP API and `trainjob db upgrade`; no PyTorch) and `worker`
# (training, on a CUDA PyTorch image). `docker compose up --build` builds both.

# The worker's base image: its torch must satisfy the `worker` extra (torch>=2.6,<3).
ARG PYTORCH_TAG=2.6.0-cuda12.4-cudnn9-runtime

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TRAINJOB_HOME=/var/lib/trainjob
# A fixed uid, the same in both images, so that a shared TRAINJOB_CHECKPOINT_DIR volume
# is writable by the API and the workers alike.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin trainjob \
    && install -d -o trainjob -g trainjob /var/lib/trainjob
WORKDIR /srv/trainjob
COPY pyproject.toml README.md ./
COPY app/ app/
COPY worker/ worker/
COPY cli/ cli/
# Base dependencies only: no torch, so the API image stays small.
RUN pip install --no-cache-dir . && rm -rf build ./*.egg-info
USER trainjob

FROM base AS api
EXPOSE 8000
# Liveness only (/healthz); /readyz also needs PostgreSQL and Redis.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
# Workers run in their own containers (the `worker` target).
CMD ["trainjob", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]

FROM pytorch/pytorch:${PYTORCH_TAG} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TRAINJOB_HOME=/var/lib/trainjob
# The Celery parent forks the training child, so it must not initialise CUDA: NVML
# answers torch.cuda.is_available() without doing so.
ENV PYTORCH_NVML_BASED_CUDA_CHECK=1
# Hugging Face models load from TRAINJOB_HF_MODEL_DIRS or the cache under HF_HOME (mount
# a volume there) and never download: the code asks for local files only, and this makes
# every Hugging Face library in the image offline too.
ENV HF_HUB_OFFLINE=1 \
    HF_HOME=/var/lib/trainjob/huggingface
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin trainjob \
    && install -d -o trainjob -g trainjob /var/lib/trainjob
WORKDIR /srv/trainjob
COPY pyproject.toml README.md ./
COPY app/ app/
COPY worker/ worker/
COPY cli/ cli/
# `hf`: transformers for hf-* models (a few tens of MB beside CUDA's gigabytes); `cuda`:
# bitsandbytes (and accelerate) for the CUDA-only options `quantize` and optimizer
# `adamw8bit`, which a GPU worker without them fails with invalid_spec.
# `mlflow`: MLflow's client (mlflow-skinny) for jobs with `tracking`; a worker without it
# trains them untracked, with a warning event.
# Keep the base image's CUDA torch: the constraint pins it, so pip fails loudly instead
# of replacing it with a different build should the `worker` extra ever disagree.
RUN python -c 'from importlib.metadata import version; print("torch==" + version("torch"))' \
        > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[worker,hf,cuda,mlflow]" \
    && rm -rf /tmp/torch-constraint.txt build ./*.egg-info
USER trainjob
CMD ["trainjob", "worker"]
