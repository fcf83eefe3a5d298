#!/usr/bin/env bash
# README's test command: from a fresh clone to lint, type check and CPU tests, as CI runs them.
# Installs what the tests need (redis-server for the Redis metadata tests, the project venv from
# the lock), then runs `nox -t ci`. Prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."

stage_start=$SECONDS
stage() {
  local now=$SECONDS
  [ -n "${stage_name:-}" ] && printf '== stage %s: %d s\n' "$stage_name" $((now - stage_start))
  stage_name=$1
  stage_start=$now
  [ -n "$stage_name" ] && printf '== %s\n' "$stage_name"
  return 0
}

stage "services (redis-server)"
bash tools/install_redis.sh

stage "project venv (tools/bootstrap.py)"
python3 tools/bootstrap.py

stage "nox -t ci (lint, typecheck, tests)"
.venv/bin/nox -t ci

stage ""
printf '== total: %d s\n' "$SECONDS"
