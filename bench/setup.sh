#!/usr/bin/env bash
# `make bench` setup: the nginx reference proxy comes from Debian's packages. Without root or apt the bench
# still runs and says that nginx was skipped.
set -u
if command -v nginx >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing nginx-light for the reference proxy" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1
    apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 \
        || echo "bench: could not install nginx; the nginx rows will be skipped" >&2
else
    echo "bench: nginx is not installed (apt-get install nginx-light); the nginx rows will be skipped" >&2
fi
exit 0
