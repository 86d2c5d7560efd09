# Test image standing in for nginx:1.28-alpine in deploy/compose/cluster.yaml (tests/deploy.rs,
# NGINX_IMAGE): Debian's /usr/sbin/nginx with the shared libraries `ldd` names, so that no
# base image is pulled. The published image runs nginx as root with
# /etc/nginx/nginx.conf; its workers run as nginx's default user, `nobody`, which the test
# puts into /etc/passwd and /etc/group. The mount points of cluster.yaml's tmpfs exist in
# the context because the root filesystem is read-only.
#
# Build context: a directory the test fills.
FROM scratch
COPY . /
STOPSIGNAL SIGQUIT
CMD ["/usr/sbin/nginx", "-g", "daemon off;"]
