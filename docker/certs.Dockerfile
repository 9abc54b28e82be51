# Tiny image for the compose `gen-certs` service (docker/certs.yml): bash, openssl, ssh-keygen and the
# project's own deploy/make-certs.sh + deploy/make-node-keys.sh. Build context: the repository root.
FROM alpine:3.20
RUN apk add --no-cache bash openssl openssh-keygen
COPY deploy/make-certs.sh deploy/make-node-keys.sh /usr/local/bin/
RUN chmod 755 /usr/local/bin/make-certs.sh /usr/local/bin/make-node-keys.sh
ENTRYPOINT ["bash", "-c"]
