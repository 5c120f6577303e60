"""Errors are never swallowed without a trace (issue 15, defect 6): a broken third-party
adapter is named, a cleanup that fails is logged with the command that finishes it, and a failed
cleanup after an error never replaces the error that ended the job."""

from __future__ import annotations

import logging
import sys
import threading
import uuid

import pytest

import cylon_store as cs
from cylon_store import registry
from cylon_store.adapters.memory import MemoryAdapter
from cylon_store.errors import TransientError


@pytest.fixture
def scheme():
    """A fresh scheme name, unregistered afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    registry._REGISTRY.pop(name, None)
    registry._LOADED.pop(name, None)


def test_broken_third_party_adapter_is_named(tmp_path, monkeypatch, scheme):
    (tmp_path / "broken_adapter_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.register(scheme, "broken_adapter_mod:Adapter")
    try:
        with pytest.warns(RuntimeWarning, match=f"{scheme}://.*cannot be loaded.*boom at import"):
            classes = registry.option_classes_of_other_schemes("memory")
    finally:
        sys.modules.pop("broken_adapter_mod", None)
    assert classes  # the other backends' options are still known


class _Switch(MemoryAdapter):
    """memory:// whose counter deletion and (once ``FAIL`` is set) listing fail."""

    FAIL = threading.Event()

    def delete_counter(self, key):
        raise TransientError("counter deletion refused", backend="memory", op="delete_counter")

    def list(self, prefix):
        if self.FAIL.is_set():
            raise TransientError("listing refused", backend="memory", op="list")
        return super().list(prefix)


def test_failed_counter_cleanup_is_logged(scheme, caplog):
    registry.register(scheme, _Switch)
    _Switch.FAIL.clear()
    with caplog.at_level(logging.WARNING, logger="cylon_store"):
        with cs.connect(f"{scheme}://ctr-{uuid.uuid4().hex[:8]}", job="logged", world_size=1,
                        rendezvous="counter", timeout=10) as comm:
            comm.barrier()
    messages = [r.getMessage() for r in caplog.records]
    assert any("rendezvous counter" in m and "cylon-store clean" in m and "logged" in m
               for m in messages), messages


def test_failed_cleanup_after_an_error_does_not_replace_it(scheme, caplog):
    registry.register(scheme, _Switch)
    _Switch.FAIL.clear()
    with caplog.at_level(logging.WARNING, logger="cylon_store"):
        with pytest.raises(ValueError, match="the user's own error"):
            with cs.connect(f"{scheme}://abort-{uuid.uuid4().hex[:8]}", job="masked", rank=0,
                            world_size=1, timeout=10) as comm:
                comm.barrier()
                _Switch.FAIL.set()
                raise ValueError("the user's own error")
    _Switch.FAIL.clear()
    assert any("cleanup after an error failed" in r.getMessage() and "listing refused" in
               r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
