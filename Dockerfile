# syntax=docker/dockerfile:1
# One image for the API (default command) and its migrations
# (`alembic upgrade head`), on Cloud Run and on GKE.
#
# The base is pinned to an exact tag. CI pins it by digest as well, passing
#   --build-arg PYTHON_IMAGE=python:3.13.9-slim-trixie@sha256:<digest>
# (`docker buildx imagetools inspect python:3.13.9-slim-trixie` prints it).
# Python 3.13: in `nox -s bench-pythons` it served 1.2x the GETs and 1.4x the
# PUTs of 3.11 (docs/performance.md); noxfile.py's IMAGE_PYTHON names it too.
ARG PYTHON_IMAGE=python:3.13.9-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# The locked runtime dependencies, hash-checked, in a virtual environment.
COPY requirements/main.txt /tmp/main.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r /tmp/main.txt \
 && /opt/venv/bin/pip uninstall --yes pip \
 && python3 -m compileall -q -j 0 /opt/venv
COPY app /srv/app
COPY migrations /srv/migrations
COPY alembic.ini /srv/alembic.ini
RUN python3 -m compileall -q /srv/app /srv/migrations

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
ARG SOURCE=https://github.com/hello-birthday/hello-birthday
LABEL org.opencontainers.image.title="hello-birthday" \
      org.opencontainers.image.description="Greets people with the days to their birthday" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /srv /srv
WORKDIR /srv
# Read-only root filesystem: the only writable place is TMPDIR (mount a tmpfs
# or an emptyDir there). Python writes no bytecode; it was compiled above.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    HOST=0.0.0.0 \
    PORT=8080 \
    METRICS_PORT=9090 \
    BUILD_VERSION=${VERSION} \
    BUILD_REVISION=${REVISION}
# A fixed, unprivileged UID/GID that owns nothing in the image.
USER 10001:10001
# 8080: the API; 9090: Prometheus metrics, for the scraper only.
EXPOSE 8080 9090
# Exec form: SIGTERM reaches the server itself, which drains and exits 0.
# The migration job runs the same image with: alembic upgrade head
CMD ["python", "-m", "app"]
