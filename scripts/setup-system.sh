#!/usr/bin/env bash
# System packages the tests need: PostgreSQL (the policy store's replica backend; the
# tests start their own throw-away server from its binaries). Called by `make setup`;
# does nothing when the binaries are already there.
set -euo pipefail

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "[setup] PostgreSQL is missing; install the 'postgresql' package (needs root) to run the Postgres store tests" >&2
  exit 0
fi
echo "[setup] installing PostgreSQL (policy store tests)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
# The Debian package starts a cluster of its own; the tests do not use it.
if command -v pg_ctlcluster >/dev/null 2>&1; then
  for c in /etc/postgresql/*/main; do
    [ -d "$c" ] && pg_ctlcluster "$(basename "$(dirname "$c")")" main stop >/dev/null 2>&1 || true
  done
fi
ls /usr/lib/postgresql/*/bin/initdb >/dev/null
echo "[setup] PostgreSQL installed"
