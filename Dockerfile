# sparta's image for the KubeRay RayCluster and RayJob (launch/k8s/*.yaml name it sparta:0.1.0):
#
#   docker build -t sparta:0.1.0 .
#
# Base: PyTorch's CUDA image with the GPU machines' stack (torch 2.11, CUDA 13.0, cuDNN 9), the devel variant
# because DeepSpeed and Triton compile small ops with nvcc/g++ on first use.
FROM pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel

# The Ray of every client that talks to the cluster must match the cluster's: 2.60.0 is what pyproject's range
# (ray[default,train]>=2.50,<3) resolves to, and RayCluster.spec.rayVersion says the same.
ARG RAY_VERSION=2.60.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Not root: uid 1000 as in Ray's own images; the pods' fsGroup 1000 makes the shared volume writable to it.
# (Ubuntu 24.04 bases ship a user `ubuntu` with that uid.)
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --uid 1000 --user-group --shell /bin/bash ray

# The repo stays in the image: launch/train.py and configs/ are run from it, the package is installed editable.
WORKDIR /workspace/sparta
COPY . .

# Keep the base image's torch and the CUDA wheels built for it: they become constraints, so a dependency that
# wants another torch fails the build instead of replacing it (pyproject's torch>=2.5 is met by the base's).
RUN python -m pip list --format=freeze | grep -iE '^(torch|triton|nvidia-[a-z0-9-]+)==' > /tmp/base-image.txt \
 && python -m pip install --no-cache-dir -c /tmp/base-image.txt -e '.[train]' "ray[default,train]==${RAY_VERSION}" \
 && python -c "import ray, torch, sparta.platform; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
 && rm /tmp/base-image.txt

USER 1000:1000
