# syntax=docker/dockerfile:1
# The raresignal server image: gRPC ingest and alert APIs, health port, Prometheus /metrics.
# It carries the server and postgres extras only (psycopg's binary wheel brings its own
# libpq, so the chart's PostgreSQL replicas need nothing more): no torch, no training code.
#
#   docker build -t raresignal:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9464:9464 -v raresignal-data:/data raresignal:0.1.0

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: turn the source tree into a wheel ---------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY constraints.txt ./
RUN pip install --constraint constraints.txt build
COPY pyproject.toml README.md ./
COPY agent/ agent/
COPY client/ client/
COPY server/ server/
COPY integrations/ integrations/
COPY demo/ demo/
COPY protos/ protos/
RUN python -m build --wheel --outdir /wheels .

# --- runtime: the wheel with its server and postgres extras, pinned by the constraints file ----------------
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
LABEL org.opencontainers.image.title="raresignal" \
      org.opencontainers.image.description="raresignal server: training-health monitor" \
      org.opencontainers.image.source="https://github.com/raresignal/raresignal" \
      org.opencontainers.image.licenses="Apache-2.0"
# MALLOC_ARENA_MAX=2: glibc gives each thread that allocates (event loop, storage thread,
# gRPC pollers) an arena of its own, and memory freed in one is not reused by another;
# after benchmarks/quota_memory.py's 150 refused 2 MiB OpenRun calls the server kept
# about 10 MiB less with two (118 -> 108 MiB; 300 -> 291 MiB over the whole abuse).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    RARESIGNAL_HEALTH_PORT=8081
COPY --from=builder /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
# The wheel's file name carries the version, so the install names it through a glob.
RUN set -eu; \
    wheel="$(ls /wheels/raresignal-*.whl)"; \
    pip install --constraint /tmp/constraints.txt "${wheel}[server,postgres]"; \
    rm -rf /wheels /tmp/constraints.txt; \
    groupadd --system --gid "${UID}" raresignal; \
    useradd --system --uid "${UID}" --gid "${UID}" --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin raresignal; \
    mkdir -p /data; \
    chown "${UID}:${UID}" /data
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
# gRPC, the plaintext gRPC health port, Prometheus /metrics.
EXPOSE 50051 8081 9464
# The standard gRPC health service on the health port: SERVING or the check fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:' + os.environ.get('RARESIGNAL_HEALTH_PORT', '8081')); r = g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["raresignal"]
CMD ["server", "--db", "/data/raresignal.db", "--host", "0.0.0.0"]
