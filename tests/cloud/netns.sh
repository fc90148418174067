#!/usr/bin/env bash
# Run a command in a private network and mount namespace (unshare -m -n), with
# loopback up and an /etc/hosts that names the stand-in: gcloud derives
# regional hosts from an endpoint override (http://H:P/ -> europe-west1-H), so
# the override must be a name; an API gcloud cannot redirect is reached by its
# real name (tests/cloud/standin.py, TLS_HOSTS). Nothing in here can reach the
# real network.
set -euo pipefail
ip link set lo up
hosts=$(mktemp)
printf '127.0.0.1 localhost run.local.test europe-west1-run.local.test servicenetworking.googleapis.com\n::1 localhost\n' >"$hosts"
mount --bind "$hosts" /etc/hosts
exec "$@"
