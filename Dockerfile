# syntax=docker/dockerfile:1
# meterstream worker image: `docker run IMAGE` runs one worker (`meterstream worker`);
# any other subcommand works too, e.g. `docker run IMAGE migrate` or
# `docker run IMAGE stripe-emulator --port 12111`.
#
# Production install: exactly requirements/runtime.txt, the lock of the runtime with the
# `rocksdb` extra at the versions the tests ran on (README, Development), every download
# checked against its hash; then meterstream itself with no dependency of its own. No
# `embedded` extra (no Tansu broker, no chdb), so the worker needs
# METERSTREAM_KAFKA_BOOTSTRAP_SERVERS and METERSTREAM_CLICKHOUSE_DSN; rocksdict (a
# manylinux wheel) is there so METERSTREAM_STORE=rocksdb works. Every dependency ships a
# manylinux wheel for CPython 3.11: no compiler needed.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/meterstream
WORKDIR /src
# The dependencies first, as their own layer: it is rebuilt only when the lock changes.
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN /opt/meterstream/bin/pip install --require-hashes -r requirements/runtime.txt
# pyproject.toml names README.md as the readme, so it is part of the build.
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY topics ./topics
COPY sinks ./sinks
COPY clients/python/meterstream_client ./clients/python/meterstream_client
RUN /opt/meterstream/bin/pip install --no-deps --no-build-isolation . \
 && /opt/meterstream/bin/pip check \
 && /opt/meterstream/bin/python -c "import rocksdict, faust.stores.rocksdb as r; assert r.USE_ROCKSDICT" \
 && /opt/meterstream/bin/meterstream --help >/dev/null

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="meterstream" \
      org.opencontainers.image.description="Usage metering: Kafka -> Faust workers -> ClickHouse -> Stripe" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, non-root uid/gid, so Kubernetes `runAsNonRoot` can verify it.
RUN groupadd --system --gid 10001 meterstream \
 && useradd --system --uid 10001 --gid meterstream --home-dir /var/lib/meterstream \
        --no-create-home --shell /usr/sbin/nologin meterstream \
 && mkdir -p /var/lib/meterstream /var/lib/meterstream-keys /etc/meterstream \
 && chown meterstream:meterstream /var/lib/meterstream /var/lib/meterstream-keys \
 && chmod 0700 /var/lib/meterstream /var/lib/meterstream-keys

COPY --from=build /opt/meterstream /opt/meterstream

# Defaults suited to a container; every one can be overridden with -e / env.
# WEB_HOST 0.0.0.0: the settings default (127.0.0.1) would hide /healthz, /readyz
# and /metrics from probes and scrapers outside the container.
ENV PATH=/opt/meterstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    METERSTREAM_WEB_HOST=0.0.0.0 \
    METERSTREAM_WEB_PORT=6066 \
    METERSTREAM_STATE_DIR=/var/lib/meterstream \
    METERSTREAM_METERS_FILE=/etc/meterstream/meters.yaml \
    METERSTREAM_LOG_FORMAT=json

USER 10001:10001
WORKDIR /var/lib/meterstream
EXPOSE 6066

# Liveness of the worker's web server; python is the only HTTP client in the slim image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METERSTREAM_WEB_PORT', '6066'), timeout=4)"]

ENTRYPOINT ["meterstream"]
CMD ["worker"]
