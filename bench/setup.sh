#!/usr/bin/env bash
# `make bench` setup: the load generator (wrk), the reference proxy and upstream (nginx) and the first-request
# timer (curl) come from Debian's packages. Without root or apt the bench still runs and its report says which
# rows were skipped and why.
set -u
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || echo "bench: could not install ${missing[*]}; the rows that need them will be skipped" >&2
else
    echo "bench: missing ${missing[*]} (as root: apt-get install ${missing[*]}); wrk is the bench's load" \
         "generator and nginx its reference: without them those rows are skipped" >&2
fi
exit 0
