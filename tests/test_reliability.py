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


SECRET = "S3cr3tValue42"


@pytest.mark.parametrize("url", [
    f"redis://default:{SECRET}@127.0.0.1:1/0?retries=1&retries=2",     # option given twice
    f"mpi://somewhere?token={SECRET}",                                    # mpi takes no location
    f"ucx://?rendezvous=redis://u:{SECRET}@",                             # bad rendezvous
    f"ucx://?token={SECRET}",                                             # ucx opened as a store
    f"flight://u:{SECRET}@127.0.0.1:1",                                   # credentials in the host
    f"redis://default:{SECRET}@127.0.0.1:1/0?retries=1&socket_timeout=1",  # unreachable
    f"flight://127.0.0.1:1?token={SECRET}&retries=1&call_timeout=2",     # unreachable
])
def test_no_secret_in_any_error_or_log(url, caplog, capfd):
    """No password or token from a URL appears in an error, a repr, a log line or the output,
    whatever fails: parsing, a transport opened as a store, an unreachable server."""
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(Exception) as info:
            with cs.open_store(url) as store:
                repr(store)
                store.put_bytes("k", b"v")
        try:
            cs.connect(url, job="j", rank=0, world_size=1, timeout=2)
        except Exception as exc:
            connect_error = exc
        else:  # pragma: no cover - every URL above fails
            connect_error = None
    texts = [str(info.value), repr(info.value), str(connect_error), repr(connect_error),
             *(r.getMessage() for r in caplog.records), *capfd.readouterr()]
    chain = info.value
    while chain is not None:
        texts.append(str(chain))
        chain = chain.__cause__ or chain.__context__
    assert not [t for t in texts if SECRET in t], [t for t in texts if SECRET in t]
