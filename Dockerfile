# syntax=docker/dockerfile:1
# omni_ray image for Ray clusters (cluster/aws/spot-cluster.yaml) and KubeRay
# (cluster/kuberay/*.yaml):
#
#   docker build -t ghcr.io/omni-ray/omni-ray:0.1.0 .
#   docker push ghcr.io/omni-ray/omni-ray:0.1.0   # prints the digest: sha256:...
#
# Deploy by digest where you can: `image: ghcr.io/omni-ray/omni-ray:0.1.0@sha256:<digest>`
# in cluster/ (the tag stays for readers; the digest decides what runs). For the base
# image likewise: --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128@sha256:<digest>.
#
# Base: the official Ray image of the Ray version pinned in pyproject.toml
# (ray==2.60.0), Python 3.11, CUDA 12.8; Ray tags images {ray}-py{XY}-cu{XY}.
# CUDA 12.8 is built by Ray's image pipeline (cu12.8.1) and by PyTorch's wheels,
# runs Hopper (H100/H200) and Blackwell, and wants an R570+ driver on the nodes.
# PyTorch brings its own CUDA libraries from PyPI. Another CUDA line:
#   docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cu129 ...
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${BASE_IMAGE}

# DS_BUILD_OPS=0: DeepSpeed installs as pure Python, without compiling its C++/CUDA
# ops; it builds an op on first use if one is ever needed (with torch optimizers,
# none is).
ENV DS_BUILD_OPS=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The base image runs as `ray` (uid 1000, group users = gid 100). Become root only
# to create /app, owned by ray because `pip install .` builds in place. From here
# on everything runs as that user, given numerically so that Kubernetes'
# runAsNonRoot can verify it.
USER root
RUN mkdir -p /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app

# Dependencies first, in their own layer: torch, transformers, deepspeed, ... are
# reinstalled only when the lock file changes, not on every code change.
# requirements.lock pins every package, transitive ones included, to one version
# and its sha256 hashes (generated from pyproject.toml, see its header), so two
# builds install the same bytes and a tampered or substituted wheel fails the build.
COPY --chown=1000:100 requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock

# README* is a glob so COPY cannot fail on it.
COPY --chown=1000:100 pyproject.toml README* ./

COPY --chown=1000:100 omni_ray/ ./omni_ray/
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import omni_ray" \
 && rm -rf build ./*.egg-info

# Job configs, referenced by the RayJob entrypoint as /app/jobs/<name>.yaml.
COPY --chown=1000:100 jobs/ ./jobs/
