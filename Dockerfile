# syntax=docker/dockerfile:1
# cervixqc service image: docker compose up (GPU) or --profile cpu (see README, Deployment).
# The build stage installs with the Makefile's own target, the one CI runs, from uv.lock;
# the runtime stage is slim Python with the virtual environment, the code and the weights.
# Two tags from this one file (sizes measured by `make image-check`, README, Deployment):
#   docker build -t cervixqc:0.1.0 .                                 GPU and CPU hosts (default)
#   docker build --build-arg DEVICE=cpu -t cervixqc:0.1.0-cpu .      CPU hosts only, ~1.5 GB smaller
# podman: add `--format docker`, or the OCI format drops the HEALTHCHECK.

FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
# Dependencies in their own layer, from the lock alone: a code change rebuilds from the next
# COPY in seconds instead of downloading the 3.5 GB of wheels again.
COPY Makefile pyproject.toml uv.lock ./
RUN make install SYNC_FLAGS="--no-dev --no-editable --no-install-project"
COPY README.md ./
COPY models ./models
COPY pipelines ./pipelines
COPY service ./service
RUN rm -f .venv/.installed && make install SYNC_FLAGS="--no-dev --no-editable"
# DEVICE=cpu: the registry's torch is a CUDA build and needs, to import at all, the CUDA
# libraries its own loader names (torch/__init__.py, _preload_cuda_deps); everything else in
# nvidia/ (cuDNN's kernels, cuSOLVER, headers, static archives) loads only on a GPU, and triton
# only under torch.compile, which cervixqc does not use. Removed, they leave an image that imports
# torch and torchvision and runs the engine (torch and OpenVINO) on CPU, but cannot run on a GPU.
ARG DEVICE=auto
RUN if [ "$DEVICE" = cpu ]; then \
      sp=.venv/lib/python3.11/site-packages && rm -rf "$sp"/triton && \
      find "$sp"/nvidia -type f ! -name '__init__.py' \
        ! -name 'libcublas.so.*' ! -name 'libcublasLt.so.*' ! -name 'libcudnn.so.*' ! -name 'libnvrtc.so.*' \
        ! -name 'libnvrtc-builtins.so.*' ! -name 'libcudart.so.*' ! -name 'libcupti.so.*' ! -name 'libcufft.so.*' \
        ! -name 'libcurand.so.*' ! -name 'libnvJitLink.so.*' ! -name 'libcusparse.so.*' ! -name 'libcusparseLt.so.*' \
        ! -name 'libcusolver.so.*' ! -name 'libnccl.so.*' ! -name 'libnvshmem_host.so.*' ! -name 'libcufile.so.*' \
        ! -name 'libnvToolsExt.so.*' -delete && find "$sp"/nvidia -xtype l -delete && \
      .venv/bin/python -c "import torch, torchvision.ops as o; assert o.nms(torch.ones(1, 4).cumsum(1), torch.ones(1), .5).tolist() == [0]"; \
    fi

FROM python:3.11-slim
ARG DEVICE=auto
# its own group 10001: a system group's id (999 here) is often the host's docker or
# systemd-journal group, whose members could then read the results and quarantined photos
RUN groupadd --system --gid 10001 cervixqc \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/cervixqc cervixqc \
    && mkdir -p /quarantine && chown cervixqc:cervixqc /quarantine
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY weights /app/weights
RUN chmod -R a+rX /app/weights
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CERVIXQC_HOST=0.0.0.0 \
    CERVIXQC_PORT=8000 \
    CERVIXQC_WEIGHTS_DIR=/app/weights \
    CERVIXQC_STATE_DIR=/var/lib/cervixqc \
    CERVIXQC_QUARANTINE_ROOT=/quarantine \
    CERVIXQC_DEVICE=$DEVICE
USER cervixqc
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
CMD ["cervixqc", "serve"]
