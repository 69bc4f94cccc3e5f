# Training image: a PyTorch runtime + this project, non-root, no secrets inside.
#   make image                       # builds it with docker or podman, tagged from git (launch/build_image.py)
#   docker build --build-arg PIPELINE_GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/ORG/lstm-pipeline:$(git rev-parse --short HEAD) .
# The default base is the CUDA PyTorch runtime. Any base with `python` (with pip) and torch on
# PATH works unchanged: where that one cannot be pulled, `make image` builds a CPU stand-in from
# Debian packages and the CPU torch wheel (Dockerfile.cpu-base) and passes it as BASE_IMAGE.
ARG BASE_IMAGE=docker.io/pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Non-root, numeric uid (runAsNonRoot can only verify a numeric USER); matches runAsUser in
# pipeline/kube/pod.py. /app stays root-owned: outputs go to the mounted volume.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app

# Dependencies first, from the project metadata alone, so that a code change rebuilds one small
# layer instead of re-downloading every dependency. The base image's torch is pinned: without the
# constraint, resolving torchvision could pull a different torch wheel and silently replace it.
# A package index behind a private CA: pass its bundle as the build secret `pip-ca`.
COPY pyproject.toml /app/
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    mkdir -p pipeline && touch pipeline/__init__.py README.md \
 && python -m pip list --format=freeze | grep -iE '^(torch|torchvision|torchaudio)==' > /tmp/torch-constraints.txt \
 && python -m pip install -c /tmp/torch-constraints.txt . \
 && python -m pip uninstall --yes pipeline \
 && rm -rf /tmp/torch-constraints.txt pipeline build README.md

COPY . /app
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    python -m pip install --no-deps . && rm -rf build

# The image has no .git: the commit W&B records comes from this build argument. Declared after
# the installs, so a new commit does not invalidate their layers.
ARG PIPELINE_GIT_COMMIT=
ENV PIPELINE_GIT_COMMIT=${PIPELINE_GIT_COMMIT}

# The root filesystem is read-only at run time (pods mount a scratch volume at /tmp and HOME;
# `podman run --read-only` mounts a tmpfs there, docker wants `--tmpfs /tmp`): the caches of
# matplotlib and W&B go to /tmp.
ENV HOME=/home/app \
    MPLCONFIGDIR=/tmp/matplotlib \
    WANDB_CONFIG_DIR=/tmp/wandb/config \
    WANDB_CACHE_DIR=/tmp/wandb/cache \
    WANDB_DATA_DIR=/tmp/wandb/data
# No OMP_NUM_THREADS, OMP_WAIT_POLICY or GOMP_SPINCOUNT here: each entry point sets them before torch
# loads (pipeline/distributed/cpu_threads.py), from the container's own CPU limit and how busy its CPUs
# are; a value baked in would be the same for every container, whatever its CPUs.
USER 10001

# The pod command is rendered by launch/submit.py; this default only shows the image works.
CMD ["python", "launch/train.py", "--help"]
