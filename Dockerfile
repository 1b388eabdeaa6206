# PLACEHOLDER: the service and its weights do not exist yet, so there is nothing to ship.
# This file fails on purpose rather than build an image that pretends to work; the release
# issue replaces it (multi-stage, uv-based, non-root, weights included, HEALTHCHECK).
FROM python:3.11-slim
RUN echo "cervixqc: no deployable image yet; see README 'Status'" >&2 && exit 1
