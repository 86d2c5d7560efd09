# Test image standing in for dxflrs/garage in deploy/compose/cluster.yaml (tests/deploy.rs,
# GARAGE_IMAGE): the Garage that tests/run.sh builds into target/tools/bin/garage, with the
# shared libraries `ldd` names, so that no base image is pulled. Same layout as the published
# image: the binary at /garage (garage-init.sh runs `/garage …` in the containers), and
# `garage server` reading /etc/garage.toml.
#
# Build context: a directory the test fills (garage, libraries and loader at their paths).
FROM scratch
COPY . /
CMD ["/garage", "server"]
