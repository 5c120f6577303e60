"""Every check of the shipped ``cylon_store.testing`` for every backend in tests/servers (through
the ``backend`` fixture of tests/conftest.py), called the way a third party calls it — so this
suite proves the module it ships.  Then the same checks against a third party's adapter
registered as ``module:Class`` (``toy_store``, the recipe of docs/conformance.md, writer
processes included), a broken adapter the suite must catch, and ``run_all`` in a process that
never imports pytest."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import cylon_store as cs
from cylon_store import registry, testing
from cylon_store.adapters.memory import MemoryAdapter

from . import checks

ROOT = Path(__file__).resolve().parents[2]
#: Every check, the slow ones marked (still run by CI).
CHECK_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in testing.SLOW else n
               for n in testing.CHECKS]


@pytest.fixture(scope="session")
def capabilities(backend) -> cs.Capabilities:
    """What the backend declares on this server (S3 on moto may differ from the class default):
    every check is told to expect it, so every store it opens must declare the same."""
    with cs.open_store(backend.make_url()) as store:
        return store.capabilities


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_check(name, backend, capabilities):
    # Backends whose stores other OS processes can share also race writer processes.
    testing.run_check(name, backend.make_url, capabilities,
                      processes=bool(backend.traits.get("processes")))


def test_every_check_is_run():
    """Every check_* of the module is in CHECKS (so run above), and the URL form test_store.py
    uses has all of them."""
    declared = {name[len("check_"):] for name, fn in inspect.getmembers(testing.checks, inspect.isfunction)
                if name.startswith("check_") and fn.__module__ == testing.checks.__name__}
    assert declared == set(testing.CHECKS)
    assert {f.__name__ for f in checks.URL_CHECKS} == {
        f"check_{n}" for n in testing.CHECKS if n not in testing.SLOW | testing.CROSS_PROCESS}
    assert testing.SLOW | testing.CROSS_PROCESS <= set(testing.CHECKS)


# -- a third party's adapter, through the documented recipe ------------------------------------
TOY = "toy"


@pytest.fixture(scope="session")
def toy_url(tmp_path_factory):
    if TOY not in registry.schemes():
        cs.register(TOY, "conformance.toy_store:ToyAdapter")
    root = tmp_path_factory.mktemp("toy-store")
    return lambda: f"{TOY}://{root}/{uuid.uuid4().hex[:12]}?fsync=false"


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_third_party_adapter(name, toy_url):
    from conformance.toy_store import ToyAdapter
    testing.run_check(name, toy_url, ToyAdapter.capabilities, processes=True)


# -- the suite fails a backend that breaks the contract ---------------------------------------
class IgnoresCreate(MemoryAdapter):
    """Declares conditional_create (inherited) but overwrites on every create."""

    def put(self, key, chunks, mode=cs.PutMode.OVERWRITE):
        return super().put(key, chunks, cs.PutMode.OVERWRITE)


def test_run_all_reports_a_broken_backend():
    scheme = f"broken{uuid.uuid4().hex[:8]}"
    cs.register(scheme, IgnoresCreate)
    try:
        def make_url():
            return f"{scheme}://t-{uuid.uuid4().hex[:12]}"

        results = testing.run_all(make_url, names=["create_mode", "overwrite", "concurrent_creators"])
        assert [(r.name, r.passed) for r in results] == [
            ("overwrite", True), ("create_mode", False), ("concurrent_creators", False)]
        assert all(isinstance(r.error, AssertionError) for r in results if not r.passed)
        assert "did not raise AlreadyExistsError" in str(results[1].error)
        with pytest.raises(AssertionError, match="did not raise AlreadyExistsError") as info:
            testing.run_all(make_url, names=["create_mode"], failfast=True)
        assert "'create_mode'" in "".join(getattr(info.value, "__notes__", ["'create_mode'"]))
        # a pinned declaration that differs fails every check, naming both
        with pytest.raises(AssertionError, match="declares"):
            testing.run_check("overwrite", make_url, cs.Capabilities())
        with pytest.raises(ValueError, match="no conformance check 'nope'"):
            testing.run_all(make_url, names=["nope"])
        with pytest.raises(ValueError, match="no conformance check 'nope'"):
            testing.run_check("nope", make_url)
    finally:
        with registry._LOCK:  # as test_store's ``scheme`` fixture: leave the registry as found
            registry._REGISTRY.pop(scheme, None)
            registry._LOADED.pop(scheme, None)


def test_raises_helper():
    err = testing.raises(KeyError, {}.__getitem__, "k")
    assert isinstance(err, KeyError)
    assert isinstance(testing.raises((KeyError, ValueError), int, "x", match="invalid literal"), ValueError)
    with pytest.raises(AssertionError, match="does not match"):
        testing.raises(ValueError, int, "x", match="^nothing like it$")
    with pytest.raises(AssertionError, match="did not raise KeyError or ValueError"):
        testing.raises((KeyError, ValueError), int, "1")
    with pytest.raises(TypeError):  # another exception propagates unchanged
        testing.raises(KeyError, int, None)


# -- without pytest ----------------------------------------------------------------------------
def test_run_all_without_pytest():
    """A process that imports cylon_store.testing but never pytest runs every fast check on
    memory:// and reports them."""
    code = (
        "import json, sys, uuid\n"
        "import cylon_store.testing as t\n"
        "assert 'pytest' not in sys.modules and 'hypothesis' not in sys.modules, 'imported pytest'\n"
        "results = t.run_all(lambda: f'memory://t-{uuid.uuid4().hex[:12]}',\n"
        "                    names=[n for n in t.CHECKS if n not in t.SLOW])\n"
        "assert 'pytest' not in sys.modules, 'a check imported pytest'\n"
        "print(json.dumps([[r.name, r.passed, repr(r.error)] for r in results]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYLON_STORE_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r[0] for r in results] == [n for n in testing.CHECKS if n not in testing.SLOW]
    assert all(passed for _, passed, _ in results), results
