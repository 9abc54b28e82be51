# Tiny image for the compose `gen-certs` service (docker/certs.yml): bash, openssl, ssh-keygen and the
# project's own deploy/make-certs.sh + deploy/make-node-keys.sh. Build context: the repository root.
# BASE_IMAGE: alpine by default (the tools come from apk); any image that already has bash, openssl and
# ssh-keygen works as is (scripts/docker_e2e.sh uses its offline Debian base).
ARG BASE_IMAGE=alpine:3.20
FROM ${BASE_IMAGE}
RUN if ! command -v bash || ! command -v openssl || ! command -v ssh-keygen; then \
      apk add --no-cache bash openssl openssh-keygen; \
    fi >/dev/null
COPY deploy/make-certs.sh deploy/make-node-keys.sh /usr/local/bin/
RUN chmod 755 /usr/local/bin/make-certs.sh /usr/local/bin/make-node-keys.sh
ENTRYPOINT ["bash", "-c"]
