# syntax=docker/dockerfile:1
# Small image of the snapshotd daemon (and snapshotctl). No torch and no client library: the
# daemon never imports torch (DESIGN section 2); trainers install snapshotd-client themselves.
#
#   docker build -t snapshotd:0.1.0 .
#   docker run --rm --shm-size=8g -p 7600:7600 -p 9400:9400 snapshotd:0.1.0 --memory-limit 4GiB \
#       --metrics-port 9400
# (a container's own /dev/shm is 64 MiB by default: give it --shm-size, or share the host's
#  /dev/shm with trainers as deploy/kubernetes/daemonset.yaml does.)

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what `pip install .` needs (see .dockerignore): the daemon package, not ./client.
COPY pyproject.toml README.md ./
COPY snapshotd ./snapshotd
# Binary wheels only (pyzmq, pyeclib with its bundled ISA-L, psutil, xxhash): no compiler needed.
RUN python -m venv /opt/snapshotd \
 && /opt/snapshotd/bin/pip install --only-binary=pyzmq,pyeclib,psutil,xxhash . \
 && /opt/snapshotd/bin/python -c "import snapshotd.daemon, pyeclib, zmq" \
 && if /opt/snapshotd/bin/pip show torch >/dev/null 2>&1; then echo "torch must not be in the daemon image" >&2; exit 1; fi

FROM python:3.11-slim
LABEL org.opencontainers.image.title="snapshotd" \
      org.opencontainers.image.description="Per-node in-memory snapshot daemon for training jobs" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/snapshotd /opt/snapshotd
ENV PATH=/opt/snapshotd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The daemon's user. Trainers must run with the same UID (segments and socket are 0600/0700).
RUN groupadd --system --gid 10001 snapshotd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin snapshotd \
 && install -d -o 10001 -g 10001 -m 0700 /run/snapshotd
USER 10001:10001
# 7600: peer traffic (ZeroMQ CURVE); 9400: /metrics, /healthz, /readyz (--metrics-port 9400).
EXPOSE 7600 9400
STOPSIGNAL SIGTERM
ENTRYPOINT ["snapshotd"]
