"""The Store facade beyond the conformance suite: import lightness, the scheme registry and its
install hints, key validation, the error hierarchy, retries, and what only the file backend
can show (bytes flipped on disk, nothing left behind, another process reading a pickled store).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pytest

import cylon_store as cs
from cylon_store import registry
from cylon_store.adapters.base import BlobAdapter
from cylon_store.adapters.file import TMP_DIR
from cylon_store.adapters.memory import SHM_ROOT, MemoryAdapter
from cylon_store.store import MAX_KEY_BYTES, validate_key

from conformance import checks
from conformance.tables import all_types_table, numeric_table

HEAVY = ("boto3", "botocore", "s3fs", "aiobotocore", "redis", "ucxx", "ucp", "mpi4py")


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYLON_STORE_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# -- import lightness and the registry --------------------------------------------------------
def test_import_loads_no_sdk_or_transport(tmp_path):
    code = (
        "import sys, pyarrow as pa, cylon_store as cs\n"
        f"heavy = {HEAVY!r}\n"
        "print('import', sorted(m for m in heavy if m in sys.modules))\n"
        "with cs.open_store('memory://') as s: s.put('k', pa.table({'a': [1]})); s.get('k')\n"
        f"with cs.open_store('file://{tmp_path}/s') as s: s.put('k', pa.table({{'a': [1]}}))\n"
        "print('use', sorted(m for m in heavy if m in sys.modules))\n"
    )
    assert _run(code).splitlines() == ["import []", "use []"]


@pytest.fixture
def scheme():
    """A fresh scheme name, unregistered again afterwards."""
    name = f"fake{uuid.uuid4().hex[:8]}"
    yield name
    with registry._LOCK:
        registry._REGISTRY.pop(name, None)
        registry._LOADED.pop(name, None)


def test_missing_dependency_gives_install_hint(scheme):
    cs.register(scheme, "cylon_store.adapters.memory:MemoryAdapter",
                requires=("some_missing_module",))
    with pytest.raises(cs.ConfigError) as info:
        cs.open_store(f"{scheme}://x")
    msg = str(info.value)
    assert "pip install" in msg and "some_missing_module" in msg and scheme in msg
    assert isinstance(info.value.__cause__, ImportError)


def test_missing_extra_gives_extra_install_hint(scheme):
    cs.register(scheme, "cylon_store.adapters.memory:MemoryAdapter", extra="fancy",
                requires=("some_missing_module",))
    with pytest.raises(cs.ConfigError, match=r"pip install 'cylon-store\[fancy\]'"):
        cs.open_store(f"{scheme}://x")


def test_missing_adapter_module_gives_install_hint(scheme):
    cs.register(scheme, "some_missing_package.adapter:Adapter", extra="fancy")
    with pytest.raises(cs.ConfigError, match=r"pip install 'cylon-store\[fancy\]'"):
        cs.open_store(f"{scheme}://x")


def test_incomplete_third_party_adapter_is_named(scheme):
    """The contract is enforced: an adapter that leaves out an operation fails when its scheme
    is opened, naming what is missing; one that declares nothing is assumed to have nothing."""
    from cylon_store.adapters.base import BlobAdapter, Capabilities

    class HalfDone(BlobAdapter):
        scheme = "halfdone"

        def put(self, key, chunks, mode=None):
            return 0

        def get(self, key, byte_range=None, if_version=None):
            return b""

    cs.register(scheme, HalfDone)
    with pytest.raises(cs.ConfigError, match="does not implement delete_many, head, list"):
        cs.open_store(f"{scheme}://x")
    caps = Capabilities()
    assert not (caps.conditional_create or caps.byte_ranges or caps.streaming_put
                or caps.notification or caps.atomic_counter or caps.request_priced)
    with pytest.raises(ValueError, match="billing"):
        Capabilities(billing="sometimes")


def test_request_priced_backend_under_any_scheme_gets_the_cheap_exchange(scheme):
    """The exchange strategy follows the declared billing, not the scheme's name: an
    S3-compatible adapter registered under its own scheme opts in."""
    import dataclasses

    from cylon_store.comm import choose_strategy

    class PricedMemory(MemoryAdapter):
        capabilities = dataclasses.replace(MemoryAdapter.capabilities, billing="requests")

    cs.register(scheme, PricedMemory)
    with cs.open_store(f"{scheme}://priced") as s:
        assert choose_strategy("auto", s, 8) == "combined"
        assert choose_strategy("auto", s, 64) == "twolevel"
    with cs.open_store("memory://") as s:
        assert choose_strategy("auto", s, 64) == "direct"


def test_byte_ranges_are_checked_once_in_the_facade():
    with cs.open_store("memory://") as s:
        s.put_bytes("k", b"0123456789")
        assert bytes(s.get_bytes("k", (2, 5))) == b"234"
        assert bytes(s.get_bytes("k", (8, 50))) == b"89"      # end clipped to the object
        assert bytes(s.get_bytes("k", (5, 2))) == b""         # as a slice: nothing
        for bad in ((-1, 3), (2, -1), (0.5, 3), ("a", "b"), (1,), (True, 3), 7):
            with pytest.raises(cs.ConfigError, match="byte_range"):
                s.get_bytes("k", bad)


def test_optional_abilities_go_through_the_facade():
    with cs.open_store("memory://") as s:
        s.notify("_cylon/chan", b"m")
        assert s.wait("_cylon/chan", 1.0) == [b"m"]
        assert [s.incr("_cylon/n") for _ in range(2)] == [1, 2]
        s.delete_counter("_cylon/n")
        assert s.stats()["requests"]["notify"] == 1 and s.stats()["requests"]["incr"] == 2
        with pytest.raises(cs.ConfigError):
            s.wait("_cylon/chan", -1)
    with cs.open_store("memory://t-facade-shared?shared=true") as s:  # shared memory: doorbells
        assert s.capabilities.doorbell and not s.capabilities.notification
        assert s.wait("_cylon/chan", 0) == []          # listening from here on
        assert s.notify_many([("_cylon/chan", b"m"), ("_cylon/nobody", b"x")]) == [True, False]
        assert s.wait("_cylon/chan", 1.0) == [b"m"]
        with pytest.raises(cs.NotSupportedError, match="atomic_counter"):
            s.incr("_cylon/n")
    with cs.open_store("memory://t-facade-shared2?shared=true&doorbell=false") as s:
        with pytest.raises(cs.NotSupportedError, match="notification"):
            s.notify("_cylon/chan")


def test_third_party_adapter_class(scheme):
    class TaggedMemory(MemoryAdapter):
        scheme = "tagged"

    cs.register(scheme, TaggedMemory)
    with pytest.raises(cs.ConfigError, match="already registered"):
        cs.register(scheme, TaggedMemory)
    cs.register(scheme, TaggedMemory, replace=True)
    with cs.open_store(f"{scheme}://shared-name") as s:
        assert isinstance(s.adapter, TaggedMemory)
        s.put("k", pa.table({"a": [1]}))
        assert s.get("k")["a"][0].as_py() == 1
    assert scheme in registry.schemes()


# -- keys -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, why", [
    ("", "empty"), ("/a", "absolute"), ("a/", "trailing"), ("a//b", "empty segment"),
    ("..", "'..'"), ("a/../b", "'..'"), (".", "'.'"), ("a/./b", "'.'"), ("a\x00b", "NUL"),
    ("a\x7fb", "control"), ("a\\b", "backslash"), ("x" * (MAX_KEY_BYTES + 1), "longer"),
    ("é" * (MAX_KEY_BYTES // 2 + 1), "longer"), ("a\udc80", "surrogate"), (7, "str"),
    (None, "str"), (b"a", "str"),
])
def test_bad_keys_say_why(key, why):
    with pytest.raises(cs.InvalidKeyError, match=why) as info:
        validate_key(key, backend="file", op="put")
    assert str(info.value).startswith("file put ")


@pytest.mark.parametrize("key", ["a", "a/b/c", "é" * (MAX_KEY_BYTES // 2), "x" * MAX_KEY_BYTES,
                                 "a..b", "...", ".a/b.", "a b/c=d"])
def test_good_keys_pass_unchanged(key):
    assert validate_key(key) == key


def test_file_specific_key_limits_write_nothing(tmp_path):
    with cs.open_store(f"file://{tmp_path}/s?fsync=false") as s:
        for key in (f"{TMP_DIR}/x", TMP_DIR, "seg/" + "x" * 256):
            with pytest.raises(cs.InvalidKeyError):
                s.put(key, pa.table({"a": [1]}))
        s.put("a", pa.table({"a": [1]}))
        with pytest.raises(cs.InvalidKeyError, match="prefix"):
            s.put("a/b", pa.table({"a": [2]}))
        assert s.list("") == ["a"] and s.get("a")["a"][0].as_py() == 1
        assert os.listdir(tmp_path / "s" / TMP_DIR) == []


# -- errors -----------------------------------------------------------------------------------
def test_error_hierarchy():
    assert issubclass(cs.NotFoundError, FileNotFoundError)
    assert issubclass(cs.AlreadyExistsError, FileExistsError)
    assert issubclass(cs.PermissionDeniedError, PermissionError)
    assert issubclass(cs.ConfigError, ValueError) and issubclass(cs.InvalidKeyError, cs.ConfigError)
    assert issubclass(cs.NotSupportedError, NotImplementedError)
    assert issubclass(cs.ExchangeTimeoutError, TimeoutError)
    assert cs.ThrottledError.retryable and cs.TransientError.retryable
    assert not cs.IntegrityError.retryable and not cs.NotFoundError.retryable
    for name in cs.errors.__all__:
        assert issubclass(getattr(cs, name), cs.StoreError)


@pytest.mark.parametrize("err", [
    cs.NotFoundError("no such key", backend="s3", op="get", key="a/b"),
    cs.AlreadyExistsError("exists", backend="file", op="put", key="k"),
    cs.IntegrityError("checksum mismatch", backend="redis", op="get", key="k"),
    cs.ConfigError("bad option"),
    cs.ExchangeError("failed", seq=7, backend="memory"),
    cs.ExchangeTimeoutError("waited", missing=[3, 5], seq=2),
    cs.RankFailedError("rank 2 raised", rank=2, remote_traceback="Traceback ...\nValueError"),
])
def test_errors_pickle_with_their_fields(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert back.__dict__ == err.__dict__


def test_error_messages_name_where():
    err = cs.NotFoundError("no such key", backend="file", op="get", key="a/b")
    assert str(err) == "file get 'a/b': no such key"
    assert str(cs.ConfigError("plain")) == "plain"


def test_adapter_errors_keep_their_cause(tmp_path):
    with cs.open_store(f"file://{tmp_path}/s") as s:
        with pytest.raises(cs.NotFoundError) as info:
            s.get("missing")
        assert isinstance(info.value.__cause__, OSError)


# -- retries ----------------------------------------------------------------------------------
class FlakyMemory(MemoryAdapter):
    """Fails the first ``FAILS`` calls of each operation with a transient error."""

    FAILS = 2

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: dict = {}

    def _flaky(self, op):
        self.calls[op] = self.calls.get(op, 0) + 1
        if self.calls[op] <= self.FAILS:
            raise cs.TransientError("connection reset", backend="flaky", op=op)

    def put(self, key, chunks, mode=cs.PutMode.OVERWRITE):
        self._flaky(f"put-{mode.value}")
        return super().put(key, chunks, mode)

    def get(self, key, byte_range=None, if_version=None):
        self._flaky("get")
        return super().get(key, byte_range, if_version)


def test_idempotent_operations_are_retried(scheme):
    cs.register(scheme, FlakyMemory)
    table = numeric_table(10_000, 1)
    with cs.open_store(f"{scheme}://r", retry_base=0.001, retry_cap=0.002) as s:
        s.put("k", table)                      # overwrite of a Table: retried
        assert s.get("k").equals(table)        # get: retried
        assert s.stats()["requests"]["retries"] == 4
        with pytest.raises(cs.TransientError):  # create is not idempotent: not retried
            s.put("c", table, mode="create")
        s.adapter.calls.clear()
        with pytest.raises(cs.TransientError):  # a stream cannot be replayed: not retried
            s.put("c", table.to_reader())
        assert not s.exists("c")
    with cs.open_store(f"{scheme}://r2", retries=1, retry_base=0.001, retry_cap=0.002) as s:
        with pytest.raises(cs.TransientError):
            s.put("k", table)


# -- file backend: damage on disk, leftovers, processes ---------------------------------------
@pytest.fixture
def file_store(tmp_path):
    with cs.open_store(f"file://{tmp_path}/s?fsync=false", segment_size=4096) as s:
        s.root = tmp_path / "s"
        yield s


@pytest.mark.parametrize("where", ["start", "middle", "footer", "end", "truncate", "grow"])
def test_flipped_byte_on_disk_is_detected(file_store, where):
    table = all_types_table(400, seed=3)
    file_store.put("dir/obj", table)
    path = file_store.root / "dir" / "obj"
    data = bytearray(path.read_bytes())
    pos = {"start": 0, "middle": len(data) // 2, "footer": len(data) - 30, "end": len(data) - 1}
    if where == "truncate":
        del data[-100:]
    elif where == "grow":
        data += b"\0"
    else:
        data[pos[where]] ^= 0x01
    path.write_bytes(bytes(data))
    for read in (file_store.get, lambda k: file_store.get_batches(k).read_all()):
        with pytest.raises(cs.IntegrityError) as info:
            read("dir/obj")
        assert info.value.backend == "file" and info.value.key == "dir/obj"
        assert "file" in str(info.value) and "'dir/obj'" in str(info.value)


def test_nothing_left_behind(file_store):
    root = file_store.root
    table = pa.table({"a": [1, 2]})

    def failing():
        yield table.to_batches()[0]
        raise RuntimeError("boom")

    file_store.put("a/b/c", table)
    with pytest.raises(RuntimeError):
        file_store.put("a/b/d", failing())
    with pytest.raises(cs.AlreadyExistsError):
        file_store.put("a/b/c", table, mode="create")
    with pytest.raises(cs.ConfigError):
        file_store.put("a/x", [table.to_batches()[0], pa.record_batch({"z": [1.0]})])
    assert file_store.list("") == ["a/b/c"]
    assert os.listdir(root / TMP_DIR) == []
    file_store.delete("a/b/c")
    assert sorted(os.listdir(root)) == [TMP_DIR], "emptied directories are removed"


def test_list_never_leaves_the_root(tmp_path):
    (tmp_path / "secret").write_text("x")
    with cs.open_store(f"file://{tmp_path}/s?fsync=false") as s:
        s.put("a/b", pa.table({"a": [1]}))
        for prefix in ("../", "./", "a/../", "/", f"{tmp_path}/", f"/{tmp_path}/", f"{TMP_DIR}/",
                       "a/\x00/", "a//"):
            assert s.list(prefix) == [], prefix
            assert s.adapter.list(prefix) == [], prefix  # the adapter guards itself too
        assert [m.key for m in s.adapter.list("a/")] == ["a/b"]


def test_pickled_store_in_another_process(tmp_path):
    table = all_types_table(30, seed=9)
    with cs.open_store(f"file://{tmp_path}/s?fsync=false", compression="lz4") as s:
        s.put("shared/t", table)
        blob = tmp_path / "store.pickle"
        blob.write_bytes(pickle.dumps(s))
        code = (
            "import pickle, sys\n"
            f"s = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
            "t = s.get('shared/t')\n"
            "s.put('shared/from-child', t.slice(0, 5))\n"
            "print(s.options.compression, t.num_rows)\n"
        )
        assert _run(code) == "lz4 30"
        assert s.get("shared/from-child").equals(table.slice(0, 5), check_metadata=True)


def test_get_batches_pins_the_version(file_store):
    # Replaced mid-read: the streamed read fails instead of mixing two versions.
    first = numeric_table(200_000, 1, tag=1)
    file_store.put("pin", first.to_batches(max_chunksize=1000))
    reader = file_store.get_batches("pin")
    head = reader.read_next_batch()
    file_store.put("pin", numeric_table(200_000, 2, tag=2).to_batches(max_chunksize=1000))
    with pytest.raises(cs.PreconditionError):
        reader.read_all()
    assert head.column(0)[0].as_py() == 1


# -- memory stores shared between processes (memory://name?shared=true) -----------------------
SHARED_CHECKS = [checks.check_roundtrip_all_types, checks.check_create_mode, checks.check_not_found,
                 checks.check_delete, checks.check_list_prefix, checks.check_integrity,
                 checks.check_capabilities, checks.check_pickle]


@pytest.fixture
def shared_memory_url():
    if SHM_ROOT is None:
        pytest.fail("memory://?shared=true needs /dev/shm")
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}?shared=true"
    shutil.rmtree(os.path.join(SHM_ROOT, "cylon-store", name), ignore_errors=True)


@pytest.mark.parametrize("check", SHARED_CHECKS, ids=lambda f: f.__name__[len("check_"):])
def test_shared_memory_store(check, shared_memory_url):
    check(shared_memory_url)


def test_shared_memory_store_across_processes(shared_memory_url):
    checks.check_concurrent_writers(shared_memory_url, processes=True, rounds=10)


# -- a backend with none of the optional capabilities ----------------------------------------
class LimitedMemory(MemoryAdapter):
    """Declares no conditional create, no byte ranges, no notification, no counter and no
    streaming put, and fails loudly if the facade asks for any of them anyway."""

    capabilities = cs.Capabilities(conditional_create=False, byte_ranges=False,
                                   notification=False, atomic_counter=False, streaming_put=False)
    notify = BlobAdapter.notify
    wait = BlobAdapter.wait
    incr = BlobAdapter.incr
    delete_counter = BlobAdapter.delete_counter

    def put(self, key, chunks, mode=cs.PutMode.OVERWRITE):
        assert mode is cs.PutMode.OVERWRITE, "create asked of a backend without conditional_create"
        assert isinstance(chunks, (list, tuple)), "a stream given to a backend without streaming_put"
        return super().put(key, chunks, mode)

    def get(self, key, byte_range=None, if_version=None):
        assert byte_range is None, "byte range asked of a backend without byte_ranges"
        return super().get(key, None, if_version)


@pytest.mark.parametrize("check", checks.URL_CHECKS, ids=lambda f: f.__name__[len("check_"):])
def test_backend_without_optional_capabilities(check, scheme):
    cs.register(scheme, LimitedMemory)
    url = f"{scheme}://{scheme}"
    with cs.open_store(url):  # keeps the named in-memory store alive
        check(url)


# -- misc -------------------------------------------------------------------------------------
def test_put_reports_rows_batches_bytes():
    with cs.open_store("memory://") as s:
        info = s.put("k", [pa.record_batch({"a": np.arange(10)})] * 3)
        assert info["rows"] == 30 and info["batches"] == 3
        assert info["bytes"] == s.head("k").size


def test_anonymous_memory_stores_are_separate():
    with cs.open_store("memory://") as a, cs.open_store("memory://") as b:
        a.put("k", pa.table({"a": [1]}))
        assert not b.exists("k")
        clone = pickle.loads(pickle.dumps(a))
        assert clone.exists("k")
        clone.close()
