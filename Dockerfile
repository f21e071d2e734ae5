# One image for every Site Recovery Engine process; compose.yaml picks the process by its command
# (`asr db upgrade`, `asr api`, `asr beat`, `asr worker orchestration|recovery|host NAME`, `asr flower`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ASR_HOME=/var/lib/asr

WORKDIR /opt/site-recovery-engine

# Only what the package is built from (no .venv, .tools or test data in the image).
COPY pyproject.toml setup.py README.md worker.py ./
COPY api ./api
COPY datapath ./datapath
COPY migrations ./migrations
COPY models ./models
COPY sites ./sites
COPY tasks ./tasks
COPY workflows ./workflows
# Runtime dependencies only (no test extra): tests/test_install.py installs the same way and starts a worker.
# The package's compiled parts (sites/storage/xts_build.py: OpenSSL's AES-XTS; datapath/writepath_build.py:
# the NBD write path) need a C compiler and libc's and OpenSSL's headers to build, removed in the same layer;
# libssl3 (libcrypto.so.3), which the first runs with, is part of the base image and stays.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && pip install . \
    && apt-get purge -y --auto-remove gcc libc6-dev libssl-dev && rm -rf /var/lib/apt/lists/* \
    && cd / && python -c "import sites.storage.xts, datapath.nbd"

# Not root. The mount points exist, owned by that user, so named volumes mounted there start out
# writable by it (Docker copies a mount point's ownership into an empty volume); each process's passwords
# (/secrets/NAME, compose's per-role credentials) and the TLS files (/tls/ca with the CA's key, /tls/server,
# /tls/client) in folders only that user reads. uid 999, as the redis and postgres images' users: the
# deployment's private keys (compose's certs service, mode 0600) are then readable by the servers of
# compose.yaml that mount them and by our processes alike.
RUN useradd --system --uid 999 --user-group --create-home --home-dir /var/lib/asr asr \
    && mkdir -p /hosts/host1 /hosts/host2 /hosts/dr1 /tls/ca /tls/server /tls/client /acl \
       /secrets/engine /secrets/owner /secrets/api /secrets/host1 /secrets/host2 /secrets/dr1 \
    && chmod 0700 /tls/ca /tls/server /tls/client \
       /secrets/engine /secrets/owner /secrets/api /secrets/host1 /secrets/host2 /secrets/dr1 \
    && chown -R asr:asr /hosts /var/lib/asr /tls /acl /secrets
USER asr

CMD ["asr", "--help"]
