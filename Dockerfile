# Training image: CUDA PyTorch runtime + this project. Build and push (from the repository root):
#   docker build --build-arg PIPELINE_GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/ORG/lstm-pipeline:$(git rev-parse --short HEAD) .
#   docker push ghcr.io/ORG/lstm-pipeline:$(git rev-parse --short HEAD)
# No secrets are baked in: the W&B key arrives at run time from a Kubernetes Secret.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# The image has no .git: the commit W&B records comes from this build argument.
ARG PIPELINE_GIT_COMMIT=
ENV PIPELINE_GIT_COMMIT=${PIPELINE_GIT_COMMIT}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app

# Pin the base image's CUDA torch: without the constraint, resolving torchvision could pull a
# different torch wheel from PyPI and silently replace it.
RUN python -m pip freeze | grep -iE '^(torch|torchvision|torchaudio)==' > /tmp/torch-constraints.txt \
 && python -m pip install -c /tmp/torch-constraints.txt . \
 && rm /tmp/torch-constraints.txt

# Non-root, numeric uid (runAsNonRoot can only verify a numeric USER); matches runAsUser in
# pipeline/kube/pod.py. /app stays root-owned: outputs go to the mounted volume.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app
ENV HOME=/home/app
USER 10001

# The pod command is rendered by launch/submit.py; this default only shows the image works.
CMD ["python", "launch/train.py", "--help"]
