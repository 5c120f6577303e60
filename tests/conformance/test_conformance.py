"""Every conformance check, for every backend in tests/servers (through the ``store_url``
fixture of tests/conftest.py).  A test below makes sure no check in ``checks.py`` is forgotten."""

from __future__ import annotations

import pytest

from . import checks


@pytest.mark.parametrize("check", checks.URL_CHECKS, ids=lambda f: f.__name__[len("check_"):])
def test_check(check, store_url):
    check(store_url)


def test_concurrent_writers(store_url, backend):
    # Backends whose stores other OS processes can share also race writer processes.
    checks.check_concurrent_writers(store_url, processes=bool(backend.traits.get("processes")))


@pytest.mark.slow
def test_large_payload(store_url):
    checks.check_large_payload(store_url)


def test_every_check_is_run():
    declared = {name for name in dir(checks) if name.startswith("check_")}
    run = {f.__name__ for f in checks.URL_CHECKS}
    assert declared == run | {"check_concurrent_writers", "check_large_payload"}
