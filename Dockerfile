# syntax=docker/dockerfile:1
# The proxy as a container (README: Operating it, Container). Two stages: the first builds a
# virtualenv with README's install command for several processes ([proxy,redis,postgres]),
# the second copies only that virtualenv onto a fresh base and runs as a non-root user.
# BASE_IMAGE is any Debian-based image with Python 3.11+ (python:3.11-slim-bookworm by
# default, or one built locally from Debian's packages).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# The package index pip installs from (a mirror, say); only this stage sees it.
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/robota
ENV PATH=/opt/robota/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY robota_client ./robota_client
COPY robota_proxy ./robota_proxy
# README "What to install": several proxy processes sharing state. The checkout itself is
# installed; its dependencies' bounds are pyproject.toml's (DL3013 asks for pins per package).
# hadolint ignore=DL3013
RUN python -m pip install ".[proxy,redis,postgres]"

FROM ${BASE_IMAGE}
# Not --system: a uid above SYS_UID_MAX makes useradd warn; --no-log-init keeps lastlog small.
RUN groupadd --gid 10001 robota \
    && useradd --no-log-init --uid 10001 --gid robota --home-dir /data \
        --shell /usr/sbin/nologin robota \
    && mkdir -p /data && chown robota:robota /data
COPY --from=build /opt/robota /opt/robota
ENV PATH=/opt/robota/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ROBOTA_DATABASE_URL=sqlite:////data/robota.db
WORKDIR /data
USER 10001:10001
EXPOSE 8787
# Liveness only; orchestrators that tell liveness from readiness probe /ready as well. The
# port is ROBOTA_PORT's, so the check follows a container run with another port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ROBOTA_PORT', '8787'), timeout=2)"]
# SIGTERM (docker stop) drains: running calls get ROBOTA_DRAIN_SECONDS to finish; give
# `docker stop -t` / stop_grace_period a little more than that.
STOPSIGNAL SIGTERM
CMD ["robota-proxy", "serve", "--host", "0.0.0.0"]
