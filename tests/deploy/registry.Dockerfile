# The upstream registry of the compose cluster test (tests/deploy.rs): Debian's
# docker-registry (distribution 2.8) with the shared libraries `ldd` names. It runs on the
# project's network because the replicas cannot reach the host's loopback; it serves the
# storage the test pushed to through a registry on the host.
#
# Build context: a directory the test fills.
FROM scratch
COPY . /
EXPOSE 5000
CMD ["/usr/bin/docker-registry", "serve", "/etc/docker/registry/config.yml"]
