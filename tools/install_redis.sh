#!/usr/bin/env bash
# Installs redis-server (Debian's package) when it is missing: the Redis metadata and store tests
# start their own real server on 127.0.0.1 and need the binary on PATH.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  echo "redis-server present: $(redis-server --version)"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package starts a system-wide server on 6379; the tests start their own, so stop it.
$sudo service redis-server stop >/dev/null 2>&1 || true
echo "installed: $(redis-server --version)"
