"""Shared fixtures: every backend in ``tests/servers`` is a parameter of ``backend``/``store_url``.

``CYLON_STORE_TEST_BACKENDS=memory,file`` narrows the set for a quick local run; CI runs all.
"""

from __future__ import annotations

import os
import pkgutil

import pytest

from servers import Backend  # noqa: E402  (tests/ is on sys.path through rootdir conftest)

import servers as _servers

ALL_BACKENDS = sorted(m.name for m in pkgutil.iter_modules(_servers.__path__) if not m.name.startswith("_"))
_wanted = os.environ.get("CYLON_STORE_TEST_BACKENDS")
BACKENDS = [b for b in ALL_BACKENDS if not _wanted or b in _wanted.split(",")]

def _backend(name, tmp_path_factory) -> Backend:
    return _servers.started_backend(name, tmp_path_factory)


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request, tmp_path_factory) -> Backend:
    return _backend(request.param, tmp_path_factory)


@pytest.fixture
def store_url(backend) -> str:
    return backend.make_url()


@pytest.fixture
def store(store_url):
    import cylon_store as cs
    with cs.open_store(store_url) as s:
        yield s


def pytest_sessionfinish(session, exitstatus):
    for b in _servers.STARTED.values():
        try:
            b.stop()
        except Exception:
            pass
    # memory://t-...?shared=true stores that tests opened across processes live in /dev/shm
    # until removed: the suite removes the ones it named — once every test is done, i.e. not
    # in a pytest-xdist worker (others may still use theirs) but in the controller.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import glob
    import shutil
    for path in glob.glob("/dev/shm/cylon-store/t-*"):
        shutil.rmtree(path, ignore_errors=True)
