#!/usr/bin/env bash
# The test command of the README and of CI: installs what the tests need, then runs them all.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k exchange -x).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --disable-pip-version-check -q -e '.[test,redis,s3,dynamodb,mpi,ucx]'

# Real servers for the backend tests: redis-server from Debian when missing.
if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q redis-server
fi

exec python -m pytest -q "$@"
