# Offline stand-ins for the official flwr/superlink, flwr/supernode and flwr/superexec images, for machines
# that cannot pull from a registry (scripts/docker_e2e.sh builds them; online users keep the official ones).
# Same layout as the official images where the demo relies on it: user `app` (uid 49999), WORKDIR /app,
# a venv on PATH, the Flower entry point as ENTRYPOINT. flwr and its dependencies come pinned by
# requirements.lock. Build context: the repository root; one target per image:
#
#   docker build --network host -f docker/flwr-standin.Dockerfile --target superlink \
#     --build-arg BASE_IMAGE=fedsq-offline/bookworm-py:<key> --build-arg FLWR_VERSION=1.42.0 \
#     --build-arg PIP_INSTALL_ARGS="--no-index --find-links http://127.0.0.1:38471/" \
#     -t fedsq-offline/superlink:1.42.0 .
#
# BASE_IMAGE: any Debian/Ubuntu image with python3 and python3-venv (3.11: the lock's wheels are cp311).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS flwr
ARG FLWR_VERSION
ARG PIP_INSTALL_ARGS=""
ENV PATH=/python/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
RUN groupadd --gid 49999 app \
    && useradd --uid 49999 --gid 49999 --create-home --home-dir /app --shell /bin/sh app \
    && python3 -m venv /python/venv && chown -R app:app /python/venv
COPY requirements.lock /tmp/requirements.lock
USER app
WORKDIR /app
# The lock as constraints: flwr's dependencies at exactly the versions the project tests against.
RUN test -n "${FLWR_VERSION}" \
    && python -m pip install --no-cache-dir --disable-pip-version-check ${PIP_INSTALL_ARGS} \
       -c /tmp/requirements.lock "flwr==${FLWR_VERSION}"

FROM flwr AS superlink
ENTRYPOINT ["flower-superlink"]

FROM flwr AS supernode
ENTRYPOINT ["flower-supernode"]

FROM flwr AS superexec
ENTRYPOINT ["flower-superexec"]
