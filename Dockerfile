# syntax=docker/dockerfile:1
# One image for every role: `splitserve gateway | prefill-worker | decode-worker | demo-model | serve | generate`.
#
#   docker build -t splitserve .                                          # CPU torch (the default)
#   docker build -t splitserve:gpu --build-arg TORCH_INDEX=https://pypi.org/simple \
#                --build-arg RUNTIME_APT_PACKAGES="gcc libc6-dev" .       # CUDA torch (what compose.gpu.yaml does)
#
# TORCH_INDEX is the package index torch comes from: PyTorch's CPU index by default; PyPI's Linux wheels are CUDA
# builds, and https://download.pytorch.org/whl/cuXYZ picks one CUDA version. TORCH_VERSION pins torch (empty: the
# newest that index has). RUNTIME_APT_PACKAGES go into the final image: Triton compiles its GPU launcher with a C
# compiler at run time, so the GPU image needs gcc; the CPU image needs none and gets none.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/splitserve
ENV PATH=/opt/splitserve/bin:$PATH
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX" "torch${TORCH_VERSION:+==$TORCH_VERSION}"
COPY . /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install /src && splitserve --help > /dev/null

FROM python:${PYTHON_VERSION}-slim
ARG RUNTIME_APT_PACKAGES=""
RUN if [ -n "$RUNTIME_APT_PACKAGES" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $RUNTIME_APT_PACKAGES \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin splitserve \
    && mkdir /models && chown splitserve:splitserve /models
COPY --from=build /opt/splitserve /opt/splitserve
ENV PATH=/opt/splitserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER splitserve
WORKDIR /home/splitserve
EXPOSE 50051
ENTRYPOINT ["splitserve"]
CMD ["--help"]
