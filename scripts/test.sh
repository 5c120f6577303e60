#!/usr/bin/env bash
# The test command of the README and of CI: installs what the tests need, then runs them all.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k exchange -x);
# CYLON_STORE_TEST_WORKERS sets the number of pytest-xdist workers (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

# A normal (non-editable) install: the suite imports the clone's sources (cylon_store/ links
# kernel/, adapters/ and bench/ in, so they import as installed), and the installed copy agrees.
python -m pip install --disable-pip-version-check -q '.[test,bench,redis,s3,dynamodb,mpi,ucx,lambda,ray,dask,fsspec]'

# Real servers for the backend tests: redis-server from Debian when missing.
if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q redis-server
fi

# The package type-checks (configuration in pyproject.toml; py.typed ships).
python -m mypy

# Two pytest-xdist workers: much of the suite waits on servers, rank processes and timeouts,
# so two workers use a 2-core machine better than one (each starts its own servers).
exec python -m pytest -q -n "${CYLON_STORE_TEST_WORKERS:-2}" "$@"
