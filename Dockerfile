# syntax=docker/dockerfile:1
# cervixqc service image: docker compose up (GPU) or --profile cpu (see README, Deployment).
# The build stage installs with the Makefile's own target, the one CI runs, from uv.lock;
# the runtime stage is slim Python with the virtual environment, the code and the weights.

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

FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/cervixqc cervixqc \
    && mkdir -p /quarantine && chown cervixqc /quarantine
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
    CERVIXQC_QUARANTINE_ROOT=/quarantine
USER cervixqc
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["cervixqc", "serve"]
