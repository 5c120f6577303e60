"""The conformance checks: what every backend must do, through the public Store facade.

Each ``check_*`` is ``check(make_url, capabilities=None)``: ``make_url()`` returns the URL of a
fresh, empty store (each check calls it once and opens as many Stores on that URL as it needs),
and ``capabilities``, when given, is what the store must declare (``expect_capabilities``).
What the backend declares decides what is checked: a capability it lacks must be refused with
``NotSupportedError`` (an object above ``max_object_size`` with ``PayloadTooLargeError``), so
no check ever passes by doing nothing.  Memory-backed stores live as long as one Store on them
is open, so every check keeps one open for its whole run.  Failures are ``AssertionError`` or
the exception the backend raised; nothing here imports pytest or hypothesis.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from contextlib import contextmanager
from typing import Callable, Optional, TypeVar, Union

import numpy as np
import pyarrow as pa

import cylon_store as cs
from cylon_store import codec, registry

from .tables import all_types_table, batched, numeric_rows, numeric_table

#: A URL factory: each call returns the URL of a fresh, empty, isolated store.
MakeUrl = Callable[[], str]


# -- helpers ------------------------------------------------------------------------------
_E = TypeVar("_E", bound=BaseException)


def raises(expected: Union[type[_E], tuple[type[_E], ...]], fn: Callable, *args,
           match: Optional[str] = None, **kwargs) -> _E:
    """Call ``fn(*args, **kwargs)``; it must raise ``expected`` (a type or a tuple of types),
    whose message ``re.search``-es ``match`` when given.  Returns the exception; any other
    exception propagates unchanged (pytest.raises without pytest)."""
    try:
        fn(*args, **kwargs)
    except expected as exc:
        if match is not None and not re.search(match, str(exc)):
            raise AssertionError(f"{type(exc).__name__} raised, but its message {str(exc)!r} does "
                                 f"not match {match!r}") from exc
        return exc
    names = (" or ".join(e.__name__ for e in expected) if isinstance(expected, tuple)
             else expected.__name__)
    raise AssertionError(f"{getattr(fn, '__qualname__', fn)!s} did not raise {names}")


def expect_capabilities(store: cs.Store, capabilities: Optional[cs.Capabilities]) -> cs.Capabilities:
    """What ``store`` declares; when ``capabilities`` is given the declaration must equal it, so
    a declaration changed by accident fails the suite instead of switching which half of a
    check runs."""
    caps = store.capabilities
    assert isinstance(caps, cs.Capabilities), f"capabilities is not a cylon_store.Capabilities: {caps!r}"
    if capabilities is not None:
        assert caps == capabilities, (f"{store.scheme}:// declares {caps}, but the suite was told "
                                      f"to expect {capabilities}")
    return caps


def assert_same(got: pa.Table, want: pa.Table) -> None:
    """Equal values, schema and schema/field metadata."""
    assert got.schema.equals(want.schema, check_metadata=True), (
        f"schema differs:\n got: {got.schema}\nwant: {want.schema}")
    assert got.num_rows == want.num_rows
    assert got.equals(want, check_metadata=True)


def assert_names(err: cs.StoreError, key: str) -> None:
    """An error says which backend and which key it is about."""
    assert err.backend, f"error without a backend: {err!r}"
    assert err.backend in str(err) and err.key == key and repr(key) in str(err), str(err)


def read_stream(store: cs.Store, key: str) -> pa.Table:
    reader = store.get_batches(key)
    assert isinstance(reader, pa.RecordBatchReader)
    return reader.read_all()


#: Proxy pools installed by ``peak_memory``, kept alive for the buffers they allocated.
_PROXY_POOLS: list = []
#: What a streamed read may hold, whatever the object's size: a few copies of the segment being
#: read (a remote client's HTTP body, base64 or JSON decoding, the verified bytes), a few batches
#: (the one decoded, the one the caller still holds) and a constant for the client itself.
SEGMENT_COPIES, BATCH_COPIES, CLIENT_ALLOWANCE = 6, 3, 4 << 20


def stream_bound(segment_size: int, batch_bytes: int) -> int:
    return SEGMENT_COPIES * segment_size + BATCH_COPIES * batch_bytes + CLIENT_ALLOWANCE


@contextmanager
def peak_memory():
    """Peak of Python heap (tracemalloc) plus Arrow pool allocations inside the block.

    Arrow allocations go through a proxy pool installed as the default for the block, whose
    ``max_memory`` is exactly the peak of what the block allocated.  ``result["now"]()`` is
    what the block holds at the moment (for sampling inside it)."""
    previous = pa.default_memory_pool()
    proxy = pa.proxy_memory_pool(previous)
    _PROXY_POOLS.append(proxy)  # buffers allocated inside may outlive the block: keep their pool
    result = {"now": lambda: tracemalloc.get_traced_memory()[0] + proxy.bytes_allocated()}
    pa.set_memory_pool(proxy)
    tracemalloc.start()
    try:
        yield result
    finally:
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        pa.set_memory_pool(previous)
        del result["now"]
        result.update(python=py_peak, arrow=proxy.max_memory(), total=py_peak + proxy.max_memory())


def _stream_batches(count: int, batch_bytes: int, seed: int = 0, samples: list | None = None,
                   now=None):
    """Batches made on demand, so a streaming put never holds them all; ``samples`` receives
    ``now()`` each time the consumer asks for the next batch."""
    for i in range(count):
        if samples is not None:
            samples.append(now())
        yield numeric_table(batch_bytes, seed + i, tag=i).combine_chunks().to_batches()[0]


# -- round trips --------------------------------------------------------------------------
def check_roundtrip_all_types(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Every Arrow type family, nulls in every column, schema and field metadata kept."""
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        table = all_types_table(300, seed=1)
        assert all(table[c].null_count for c in table.column_names)
        info = store.put("types/one-batch", table)
        assert info["rows"] == 300 and info["batches"] == 1 and info["bytes"] > 0
        assert_same(store.get("types/one-batch"), table)
        assert_same(read_stream(store, "types/one-batch"), table)

        # several batches of uneven sizes, including empty ones
        parts = batched(table, [0, 1, 99, 0, 150, 50])
        store.put("types/batches", parts)
        want = pa.Table.from_batches(parts)
        assert_same(store.get("types/batches"), want)
        got = list(store.get_batches("types/batches"))
        assert [b.num_rows for b in got] == [b.num_rows for b in parts]

        # sliced input (non-zero offsets in every buffer) and chunked columns
        sliced = table.slice(17, 200)
        store.put("types/sliced", sliced)
        assert_same(store.get("types/sliced"), sliced)
        chunked = pa.concat_tables([table.slice(0, 10), table.slice(10, 290)])
        store.put("types/chunked", chunked)
        assert_same(store.get("types/chunked"), chunked)

        # a dictionary column whose dictionary changes from batch to batch
        b1 = pa.record_batch({"d": pa.array(["a", "b", None]).dictionary_encode()})
        b2 = pa.record_batch({"d": pa.array(["c", None, "c"]).dictionary_encode()})
        store.put("types/dict-replaced", [b1, b2])
        want = pa.Table.from_batches([b1, b2])
        assert_same(store.get("types/dict-replaced"), want)
        assert_same(read_stream(store, "types/dict-replaced"), want)


def check_input_kinds(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Table, RecordBatch, RecordBatchReader, iterables of batches or tables, C stream objects."""
    table = all_types_table(40, seed=2)
    parts = batched(table, [10, 0, 30])
    want = pa.Table.from_batches(parts)

    class CStream:  # any object speaking the Arrow PyCapsule stream protocol
        def __arrow_c_stream__(self, requested_schema=None):
            return want.__arrow_c_stream__(requested_schema)

    inputs = {
        "table": (table, table),
        "batch": (parts[2], pa.Table.from_batches([parts[2]])),
        "reader": (pa.RecordBatchReader.from_batches(table.schema, parts), want),
        "generator": ((b for b in parts), want),
        "list": (parts, want),
        "tuple": (tuple(parts), want),
        "list-of-tables": ([table.slice(0, 25), table.slice(25)], table),
        "c-stream": (CStream(), want),
    }
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        for name, (data, expected) in inputs.items():
            store.put(f"kinds/{name}", data)
            assert_same(store.get(f"kinds/{name}"), expected)


def check_empty_tables(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """No columns, no rows, rows without columns, empty readers and empty batches."""
    zero_row = all_types_table(0, seed=3)
    cases = {
        "no-columns": pa.table({}),
        "zero-rows-with-schema": zero_row,
        "rows-but-no-columns": pa.table({"a": [1, 2, 3]}).drop_columns(["a"]),
        "empty-reader": pa.RecordBatchReader.from_batches(zero_row.schema, []),
        "empty-batches": [pa.RecordBatch.from_pylist([], schema=zero_row.schema)] * 3,
    }
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        for name, data in cases.items():
            want = (pa.Table.from_batches([], schema=zero_row.schema)
                    if name in ("empty-reader", "empty-batches") else data)
            info = store.put(f"empty/{name}", data)
            assert info["rows"] == want.num_rows
            got = store.get(f"empty/{name}")
            assert_same(got, want)
            streamed = read_stream(store, f"empty/{name}")
            assert streamed.schema.equals(want.schema, check_metadata=True)
            assert streamed.num_rows == want.num_rows
        assert store.get("empty/rows-but-no-columns").num_rows == 3


def check_many_batches(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Thousands of small batches: boundaries kept by the stream, equal table from get."""
    sizes = np.random.default_rng(4).integers(0, 8, 3000)
    table = all_types_table(int(sizes.sum()), seed=4).select(
        ["int8", "float64", "string", "decimal128", "ts_us_UTC", "list", "struct", "dictionary"])
    parts = batched(table, sizes.tolist())
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        info = store.put("many", iter(parts))
        assert info["batches"] == len(parts) and info["rows"] == table.num_rows
        assert_same(store.get("many"), table)
        lengths = [b.num_rows for b in store.get_batches("many")]
        assert lengths == sizes.tolist()


def check_overwrite(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """A put replaces the object, and its version changes (where the backend has versions)."""
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        first, second = numeric_table(5000, 1, tag=1), numeric_table(9000, 2, tag=2)
        store.put("ow", first)
        v1 = store.head("ow")
        store.put("ow", second)
        v2 = store.head("ow")
        assert_same(store.get("ow"), second)
        assert v2.key == "ow" and v2.size == len(memoryview(store.get_bytes("ow")))
        assert v1.version != v2.version or not v1.version, "version must change on replace"
        assert store.list("") == ["ow"]


def check_compression(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """lz4 and zstd buffer compression round trip, shrink compressible data, and any store
    reads what any other wrote (the stream says how it was compressed)."""
    store_url = make_url()
    rng = np.random.default_rng(5)
    compressible = pa.table({"x": pa.array(np.repeat(rng.integers(0, 5, 2000), 50)),
                             "s": pa.array(np.repeat(np.array(["abcdefgh", "ijk"]), 50_000))})
    typed = all_types_table(200, seed=5)
    with cs.open_store(store_url) as plain:
        expect_capabilities(plain, capabilities)
        sizes = {}
        for comp in (None, "lz4", "zstd"):
            with cs.open_store(store_url, compression=comp) as store:
                assert store.options.compression == comp
                store.put(f"c/{comp}/table", compressible)
                store.put(f"c/{comp}/types", typed)
                sizes[comp] = store.head(f"c/{comp}/table").size
                assert_same(store.get(f"c/{comp}/table"), compressible)
                assert_same(read_stream(store, f"c/{comp}/types"), typed)
            assert_same(plain.get(f"c/{comp}/table"), compressible)
            assert_same(plain.get(f"c/{comp}/types"), typed)
        assert sizes["lz4"] < sizes[None] / 4 and sizes["zstd"] < sizes[None] / 4, sizes
        raises(cs.ConfigError, cs.open_store, store_url, compression="gzip", match="compression")


def check_get_batches_bounded_memory(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Streaming read of a 16 MiB object in 256 KiB segments holds about one segment plus one
    batch, not the object.  A backend without byte ranges reads whole objects (declared)."""
    seg, batch_bytes, count = 256 << 10, 256 << 10, 64
    with cs.open_store(make_url(), segment_size=seg) as store:
        caps = expect_capabilities(store, capabilities)
        store.put("big/stream", _stream_batches(count, batch_bytes))
        size = store.head("big/stream").size
        assert size > count * batch_bytes
        rows = 0
        with peak_memory() as peak:
            for i, batch in enumerate(store.get_batches("big/stream")):
                assert batch.column(0)[0].as_py() == i
                rows += batch.num_rows
                del batch
        assert rows == count * numeric_rows(batch_bytes)
        if caps.byte_ranges:
            assert peak["total"] < stream_bound(seg, batch_bytes) < size / 2, (peak, size)
        assert store.stats()["bytes_in"] >= size


# -- writes, conditions, errors -------------------------------------------------------------
def check_create_mode(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """``mode="create"`` fails with AlreadyExistsError (also a FileExistsError) naming backend
    and key, and leaves the object alone; without ``conditional_create``: NotSupportedError and
    nothing written."""
    t1, t2 = numeric_table(2000, 1, tag=1), numeric_table(3000, 2, tag=2)
    with cs.open_store(make_url()) as store:
        if not expect_capabilities(store, capabilities).conditional_create:
            for put in (lambda: store.put("cm", t1, mode="create"),
                        lambda: store.put_bytes("cm", b"x", mode=cs.PutMode.CREATE)):
                raises(cs.NotSupportedError, put)
            assert store.list("") == []
            return
        store.put("cm", t1, mode="create")
        for attempt in (lambda: store.put("cm", t2, mode="create"),
                        lambda: store.put("cm", t2, mode=cs.PutMode.CREATE),
                        lambda: store.put("cm", t2.to_reader(), mode="create"),
                        lambda: store.put_bytes("cm", b"other", mode="create")):
            err = raises(cs.AlreadyExistsError, attempt)
            assert isinstance(err, FileExistsError)
            assert_names(err, "cm")
            assert_same(store.get("cm"), t1)
        store.put("cm", t2, mode="overwrite")
        assert_same(store.get("cm"), t2)
        store.delete("cm")
        store.put("cm", t1, mode="create")
        assert_same(store.get("cm"), t1)
        raises(cs.ConfigError, store.put, "cm2", t1, mode="append", match="mode")
        assert store.list("") == ["cm"]


def check_concurrent_creators(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Of many simultaneous create-if-absent puts, exactly one wins and its data is stored."""
    store_url = make_url()
    n = 8
    tables = [numeric_table(20_000, i, tag=i) for i in range(n)]
    with cs.open_store(store_url) as store:
        if not expect_capabilities(store, capabilities).conditional_create:
            raises(cs.NotSupportedError, store.put, "race/create", tables[0], mode="create")
            return
        for round_ in range(3):
            key = f"race/create-{round_}"
            barrier = threading.Barrier(n)
            outcome: dict[int, object] = {}

            def create(i):
                with cs.open_store(store_url) as mine:
                    barrier.wait()
                    try:
                        mine.put(key, tables[i], mode="create")
                        outcome[i] = "won"
                    except cs.AlreadyExistsError:
                        outcome[i] = "lost"
                    except BaseException as exc:  # reported below
                        outcome[i] = exc

            threads = [threading.Thread(target=create, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [i for i, o in outcome.items() if o == "won"]
            assert sorted(outcome.values(), key=str) == sorted(["won"] + ["lost"] * (n - 1)), outcome
            assert_same(store.get(key), tables[winners[0]])


def check_not_found(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """A missing key is NotFoundError (also a FileNotFoundError) naming backend and key, from
    every read; a key's prefix or extension is not the key; deleting a missing key is fine."""
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        store.put("nf/present/x", pa.table({"a": [1]}))
        for key in ("nf/missing", "nf/present", "nf/present/x/y", "nf/presen"):
            for op in (store.get, store.get_batches, store.head, store.get_bytes):
                err = raises(cs.NotFoundError, op, key)
                assert isinstance(err, FileNotFoundError)
                assert_names(err, key)
            assert store.exists(key) is False
            store.delete(key)  # deleting a missing key is not an error
        store.delete_many(["nf/missing", "nf/other"])
        assert store.exists("nf/present/x")
        assert store.list("") == ["nf/present/x"]


def check_delete(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """delete and delete_many remove exactly the keys named, idempotently; a key can be
    written again after its delete."""
    table = pa.table({"a": [1, 2, 3]})
    keys = ["d/a", "d/b/c", "d/b/d/e", "d2"]
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        for k in keys:
            store.put(k, table)
        store.delete("d/b/c")
        assert not store.exists("d/b/c")
        raises(cs.NotFoundError, store.get, "d/b/c")
        assert store.list("") == ["d/a", "d/b/d/e", "d2"]
        store.delete("d/b/c")  # idempotent
        store.delete_many(["d/a", "d/b/d/e", "d/never"])
        assert store.list("") == ["d2"]
        store.delete_many([])
        store.put("d/b/c", table)  # a key can be written again after delete
        assert_same(store.get("d/b/c"), table)
        store.delete_many(["d/b/c", "d2"])
        assert store.list("") == []


def check_list_prefix(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """``list(prefix)`` is a plain string prefix (not a directory), sorted, exact keys only."""
    keys = ["p/x", "p/y/z", "p/y/zz", "pq", "p2/x", "q", "p-/a", "über/ß", "p/y.z"]
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        assert store.list("") == []
        for k in keys:
            store.put(k, pa.table({"k": [k]}))
        expect = {
            "": sorted(keys),
            "p": sorted(k for k in keys if k.startswith("p")),
            "p/": ["p/x", "p/y.z", "p/y/z", "p/y/zz"],
            "p/y": ["p/y.z", "p/y/z", "p/y/zz"],
            "p/y/": ["p/y/z", "p/y/zz"],
            "p/y/z": ["p/y/z", "p/y/zz"],
            "p/y/zz": ["p/y/zz"],
            "p/x": ["p/x"],
            "p/x/": [],
            "pq/": [],
            "nothing": [],
            "über/": ["über/ß"],
            # prefixes no valid key can start with match nothing (and never escape the store)
            "/": [], "../": [], "./": [], "p//": [], "p/../": [], "p\x00": [], "p/\x00/": [],
        }
        for prefix, want in expect.items():
            assert store.list(prefix) == want, prefix
        assert [m.key for m in store.list_meta("p/y/")] == ["p/y/z", "p/y/zz"]
        assert all(m.size > 0 for m in store.list_meta(""))
        raises(cs.ConfigError, store.list, None)
        store.delete("p/y/z")
        assert store.list("p/y/") == ["p/y/zz"]


GOOD_KEYS = ["plain", "a/b/c", "with space/and=sign,semi;colon", "-dash", ".hidden/x",
             "a..b/c...", "ünïcödé/日本/🙂", "x" * 200 + "/" + "y" * 200 + "/" + "z" * 200,
             "/".join(["s" * 200] * 5)]
BAD_KEYS = ["", "/abs", "/", "a/", "a//b", "..", ".", "a/../b", "a/./b", "../up", "nul\x00byte",
            "ctl\x01x", "new\nline", "tab\tkey", "back\\slash", "k" * 1025,
            "lone\ud800surrogate", 123, None, b"bytes"]


def check_keys(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Valid keys round-trip exactly; invalid ones are refused by every operation, with a
    clear error and nothing written."""
    table = pa.table({"a": [1]})
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        for key in BAD_KEYS:
            ops = {
                "put": lambda: store.put(key, table),
                "put-create": lambda: store.put(key, table, mode="create"),
                "put_bytes": lambda: store.put_bytes(key, b"x"),
                "get": lambda: store.get(key),
                "get_batches": lambda: store.get_batches(key),
                "get_bytes": lambda: store.get_bytes(key),
                "head": lambda: store.head(key),
                "exists": lambda: store.exists(key),
                "delete": lambda: store.delete(key),
                "delete_many": lambda: store.delete_many(["fine", key]),
            }
            for op, call in ops.items():
                err = raises(cs.InvalidKeyError, call)
                assert isinstance(err, ValueError)
                assert "invalid key" in str(err), (op, str(err))
            assert store.list("") == [], f"something was written for bad key {key!r}"
        for key in GOOD_KEYS:
            store.put(key, pa.table({"k": [key]}))
            assert store.get(key)["k"][0].as_py() == key
        assert store.list("") == sorted(GOOD_KEYS)


def check_bad_data_nothing_written(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Data that is no Arrow data, mixed schemas, or a source that fails mid-stream: the put
    raises and leaves nothing new, and an existing object unchanged."""
    good = pa.table({"a": [1, 2]})
    other = pa.table({"b": ["x"]})

    def failing():
        yield good.to_batches()[0]
        raise RuntimeError("source failed mid-stream")

    bad = {
        "str": ("not a table", cs.ConfigError),
        "bytes": (b"raw", cs.ConfigError),
        "none": (None, cs.ConfigError),
        "dict": ({"a": [1]}, cs.ConfigError),
        "int": (5, cs.ConfigError),
        "empty-list": ([], cs.ConfigError),
        "list-of-ints": ([1, 2], cs.ConfigError),
        "mixed-schemas": ([good.to_batches()[0], other.to_batches()[0]], cs.ConfigError),
        "mixed-schemas-generator": ((b for b in (good.to_batches()[0], other.to_batches()[0])),
                                    cs.ConfigError),
        "failing-generator": (None, RuntimeError),
    }
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        for name, (data, error) in bad.items():
            data = failing() if name == "failing-generator" else data
            raises(error, store.put, "bd/new", data)
            assert store.list("") == [], name
        store.put("bd/old", good)
        for name, (data, error) in bad.items():
            data = failing() if name == "failing-generator" else data
            raises(error, store.put, "bd/old", data)
            assert_same(store.get("bd/old"), good)
        assert store.list("") == ["bd/old"]


def check_integrity(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Any damage to a stored object is an IntegrityError naming backend and key, on get and
    on get_batches; nothing damaged is ever returned as data."""
    table = all_types_table(500, seed=6)
    with cs.open_store(make_url(), segment_size=16 << 10) as store:
        expect_capabilities(store, capabilities)
        store.put("orig", table)
        raw = bytes(memoryview(store.get_bytes("orig")))
        size = len(raw)
        tail = codec.TAIL_SIZE

        def flipped(pos):
            b = bytearray(raw)
            b[pos] ^= 0x40
            return bytes(b)

        damaged = {
            "schema-message": flipped(12),
            "body-early": flipped(size // 5),
            "body-middle": flipped(size // 2),
            "footer": flipped(size - tail - 3),
            "tail-length": flipped(size - tail),
            "tail-hash": flipped(size - tail + 9),
            "tail-magic": flipped(size - 1),
            "truncated-1": raw[:-1],
            "truncated-half": raw[:size // 2],
            "truncated-tail": raw[:-tail],
            "appended": raw + b"\0",
            "prepended": b"\0" + raw,
            "empty": b"",
            "foreign": b"PAR1 this is not a cylon-store object",
        }
        for name, data in damaged.items():
            key = f"bad/{name}"
            store.put_bytes(key, data)
            assert_names(raises(cs.IntegrityError, store.get, key), key)
            assert_names(raises(cs.IntegrityError, read_stream, store, key), key)
        assert_same(store.get("orig"), table)


# -- facade services ------------------------------------------------------------------------
def check_pickle(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """A Store pickles with its options and reaches the same objects; errors pickle with their
    fields (a launcher re-raises them in the caller)."""
    table = all_types_table(50, seed=7)
    with cs.open_store(make_url(), compression="zstd", segment_size="64KiB") as store:
        expect_capabilities(store, capabilities)
        store.put("pk/a", table)
        clone = pickle.loads(pickle.dumps(store))
        try:
            assert clone.options == store.options
            assert clone.options.compression == "zstd" and clone.options.segment_size == 65536
            assert_same(clone.get("pk/a"), table)
            clone.put("pk/b", table.slice(5))
            assert_same(store.get("pk/b"), table.slice(5))
            assert clone.stats()["requests"].get("put") == 1  # stats are per Store object
            again = pickle.loads(pickle.dumps(clone, protocol=pickle.HIGHEST_PROTOCOL))
            assert again.list("pk/") == ["pk/a", "pk/b"]
            again.close()
        finally:
            clone.close()
        original = raises(cs.NotFoundError, store.get, "pk/missing")
        err = pickle.loads(pickle.dumps(original))
        assert type(err) is cs.NotFoundError and err.key == "pk/missing"
        assert err.backend == original.backend and str(err) == str(original)


def check_stats(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Requests are counted by kind and bytes both ways; reset_stats zeroes them."""
    with cs.open_store(make_url()) as store:
        expect_capabilities(store, capabilities)
        table = numeric_table(50_000, 8)
        store.put("st", table)
        size = store.head("st").size
        store.get("st")
        store.exists("st")
        store.list("")
        store.delete("st")
        s = store.stats()
        for kind in ("put", "get", "head", "list", "delete"):
            assert s["requests"].get(kind, 0) >= 1, (kind, s)
        assert s["requests_total"] >= 5
        assert s["bytes_out"] >= size and s["bytes_in"] >= size
        store.reset_stats()
        s = store.stats()
        assert s["requests_total"] == 0 and s["bytes_out"] == 0 and s["bytes_in"] == 0


def check_capabilities(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """Declared capabilities hold; undeclared optional operations raise NotSupportedError.
    (The one check that calls the adapter directly: its notify/wait/incr/delete_counter.)"""
    with cs.open_store(make_url()) as store:
        caps = expect_capabilities(store, capabilities)
        raw = b"0123456789abcdef" * 100
        store.put_bytes("cap/raw", [raw[:700], memoryview(raw)[700:], pa.py_buffer(b"")])
        assert bytes(memoryview(store.get_bytes("cap/raw"))) == raw
        # byte ranges work everywhere: natively, or read whole and sliced by the facade
        for start, end in ((0, 10), (5, 5), (100, 1100), (len(raw) - 3, len(raw))):
            assert bytes(memoryview(store.get_bytes("cap/raw", byte_range=(start, end)))) == raw[start:end]
        adapter = store.adapter
        if caps.notification:
            adapter.notify("cap-ch")
            assert adapter.wait("cap-ch", 5.0) == [b""]
            assert adapter.wait("cap-ch", 0.01) == []
            for m in (b"a/1", b"b", b"a/1"):      # messages kept in order, duplicates too
                adapter.notify("cap-ch", m)
            assert adapter.wait("cap-ch", 0) == [b"a/1", b"b", b"a/1"]
            assert adapter.wait("cap-ch", 0) == []
        elif caps.doorbell:
            # Doorbells reach the listeners of this machine; the first wait starts listening.
            assert adapter.wait("cap-ch", 0) == []
            assert adapter.notify("cap-ch", b"a/1") is not False
            adapter.notify("cap-ch", b"b")
            assert adapter.wait("cap-ch", 5.0) == [b"a/1", b"b"]
            assert adapter.wait("cap-ch", 0.01) == []
            # Nobody listens: the doorbell is not delivered, and says so.
            assert adapter.notify("cap-nobody", b"x") is False
            assert adapter.notify_many([("cap-ch", b"c"), ("cap-nobody", b"x")]) == [True, False]
            assert adapter.wait("cap-ch", 1.0) == [b"c"]
        else:
            raises(cs.NotSupportedError, adapter.notify, "cap-ch")
            raises(cs.NotSupportedError, adapter.wait, "cap-ch", 0.01)
        if caps.atomic_counter:
            assert [adapter.incr("cap-counter") for _ in range(3)] == [1, 2, 3]
            adapter.delete_counter("cap-counter")
            assert adapter.incr("cap-counter") == 1
            adapter.delete_counter("cap-counter")
        else:
            raises(cs.NotSupportedError, adapter.incr, "cap-counter")
        store.delete("cap/raw")


def check_close(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """A closed Store refuses work (idempotently) without touching other Stores on the URL."""
    store_url = make_url()
    with cs.open_store(store_url) as keeper:
        expect_capabilities(keeper, capabilities)
        with cs.open_store(store_url) as store:
            store.put("cl", pa.table({"a": [1]}))
            assert "Store(" in repr(store)
        raises(cs.StoreError, store.get, "cl", match="closed")
        store.close()  # idempotent
        assert keeper.get("cl").num_rows == 1
        assert cs.open_store(keeper) is keeper


# -- concurrency ----------------------------------------------------------------------------
def race_table(tag: int) -> pa.Table:
    """Versions written by racing writers: tags 0 and 1 have exactly the same byte size, so a
    reader cannot tell them apart by length; the others differ in size."""
    nbytes = 96_000 if tag < 2 else 64_000 + 24_000 * tag
    return numeric_table(nbytes, 1000 + tag, tag=tag)


RACE_SEGMENT = 32 << 10  # several segments per version: streamed reads take several requests
#: Seconds a racing writer keeps going: fast backends do all their rounds, slow remote ones
#: stop early (after at least three puts) instead of stretching the suite.
RACE_BUDGET = 3.0


def _put_rounds(store, key, table, rounds):
    deadline = time.monotonic() + RACE_BUDGET
    for i in range(rounds):
        if i >= 3 and time.monotonic() > deadline:
            break
        store.put(key, table)


def _child(argv):
    """A racing process: ``url key tag rounds create_key scheme adapter``.  Registers
    ``adapter`` ("module:Class") for ``scheme`` if this process does not know the scheme (a
    third party's), says 'ready', waits for a line on stdin, puts its version of ``key`` up to
    ``rounds`` times and says 'done'; waits for another line, then tries to create
    ``create_key`` once and says 'won' or 'lost'."""
    url, key, tag, rounds, create_key, scheme, adapter = argv
    tag, rounds = int(tag), int(rounds)
    if scheme not in registry.schemes():
        cs.register(scheme, adapter)
    table = race_table(tag)
    with cs.open_store(url, segment_size=RACE_SEGMENT) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        _put_rounds(store, key, table, rounds)
        print("done", flush=True)
        sys.stdin.readline()
        try:
            store.put(create_key, table, mode="create")
            print("won", flush=True)
        except cs.AlreadyExistsError:
            print("lost", flush=True)


class _Children:
    """Racing writer processes, driven line by line over their stdin/stdout.  They see this
    process's ``sys.path`` (the way ``cs.launch`` starts ranks), so they import the same
    cylon_store and the adapter of the store under test."""

    def __init__(self, store: cs.Store, url, key, tags, rounds, create_key):
        cls = type(store.adapter)
        adapter = f"{cls.__module__}:{cls.__qualname__}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
        code = "import sys; from cylon_store.testing.checks import _child; _child(sys.argv[1:])"
        self.procs = [subprocess.Popen(
            [sys.executable, "-c", code, url, key, str(tag), str(rounds), create_key,
             store.scheme, adapter],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for tag in tags]
        if self.expect() != ["ready"] * len(self.procs):
            self.kill()
            raise AssertionError("a writer process failed to start")

    def send(self):
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()

    def expect(self) -> list[str]:
        return [p.stdout.readline().strip() for p in self.procs if p.stdout]

    def close(self, timeout=120):
        try:
            for p in self.procs:
                p.communicate(timeout=timeout)
                assert p.returncode == 0, f"writer process failed ({p.returncode})"
        finally:
            self.kill()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def check_concurrent_writers(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None, *,
                             processes: bool = False, threads: int = 4, rounds: int = 25):
    """Writers race to replace one key while readers read it: every read (whole or streamed)
    is exactly one version that some writer put, never a mix.  A streamed read may instead
    fail with PreconditionError when the object is replaced under it (documented).  With
    ``processes`` (for stores other OS processes can open by the URL), two writer processes
    join the race, and then they and this process race to create one key: exactly one wins
    (without ``conditional_create``, this process's create is NotSupportedError)."""
    store_url = make_url()
    key = "race/obj"
    n_proc = 2 if processes else 0
    tags = list(range(threads + n_proc))
    versions = {t: race_table(t) for t in tags}
    errors: list = []
    stop = threading.Event()
    seen = {"get": 0, "stream": 0, "precondition": 0}
    seen_lock = threading.Lock()

    def check_version(got: pa.Table, how: str):
        tag = got["tag"][0].as_py()
        want = versions.get(tag)
        if want is None or not got.equals(want, check_metadata=True):
            raise AssertionError(f"{how} returned a table that is no whole version (tag {tag})")
        with seen_lock:
            seen[how] += 1

    def reader(streamed: bool):
        try:
            with cs.open_store(store_url, segment_size=RACE_SEGMENT) as mine:
                while not stop.is_set():
                    try:
                        if streamed:
                            check_version(read_stream(mine, key), "stream")
                        else:
                            check_version(mine.get(key), "get")
                    except cs.NotFoundError:
                        time.sleep(0.001)
                    except cs.PreconditionError:
                        with seen_lock:
                            seen["precondition"] += 1
        except BaseException as exc:
            errors.append(exc)

    def writer(store, tag):
        try:
            _put_rounds(store, key, versions[tag], rounds)
        except BaseException as exc:
            errors.append(exc)

    with cs.open_store(store_url, segment_size=RACE_SEGMENT) as store:
        creating = expect_capabilities(store, capabilities).conditional_create
        children = (_Children(store, store_url, key, tags[threads:], rounds, "race/created")
                    if n_proc else None)
        try:
            readers = [threading.Thread(target=reader, args=(s,)) for s in (False, True, False, True)]
            writers = [threading.Thread(target=writer, args=(store, t)) for t in tags[:threads]]
            for t in readers:
                t.start()
            if children:
                children.send()
            for t in writers:
                t.start()
            for t in writers:
                t.join()
            try:
                if children:
                    assert children.expect() == ["done"] * n_proc, "a writer process failed"
            finally:
                stop.set()
                for t in readers:
                    t.join()
            if errors:
                raise errors[0]
            assert seen["get"] > 0 and seen["stream"] + seen["precondition"] > 0, seen
            check_version(store.get(key), "get")
            assert store.list("") == [key]

            if children:
                # create-if-absent across processes: the children and this process race
                children.send()
                try:
                    store.put("race/created", versions[0], mode="create")
                    outcome = ["won"]
                except (cs.AlreadyExistsError, cs.NotSupportedError) as exc:
                    assert creating == isinstance(exc, cs.AlreadyExistsError)
                    outcome = ["lost"]
                outcome += children.expect()
                if creating:
                    assert sorted(outcome) == ["lost"] * n_proc + ["won"], outcome
                    check_version(store.get("race/created"), "get")
        except BaseException:
            if children:
                children.kill()
            raise
        if children:
            children.close()


# -- large payload ----------------------------------------------------------------------------
def check_large_payload(make_url: MakeUrl, capabilities: Optional[cs.Capabilities] = None):
    """About 300 MiB streamed in 4 MiB batches: a streaming put that never holds the object
    (on backends declaring ``streaming_put``; their own buffering, such as multipart parts in
    flight, must stay well below it), get equal, and a streamed read bounded by a few segments.
    A backend whose declared maximum object size is smaller must say so with
    PayloadTooLargeError, and write nothing."""
    batch_bytes, count = 4 << 20, 75
    payload = count * batch_bytes
    want_rows = count * numeric_rows(batch_bytes)
    with cs.open_store(make_url()) as store:
        caps = expect_capabilities(store, capabilities)
        limit = caps.max_object_size
        held: list[int] = []  # memory held each time the put asks for the next batch
        try:
            with peak_memory() as peak:
                info = store.put("large", _stream_batches(count, batch_bytes, seed=100,
                                                          samples=held, now=peak["now"]))
        except cs.PayloadTooLargeError:
            assert limit is not None and limit < payload
            assert store.list("") == []
            return
        assert info["rows"] == want_rows and info["bytes"] > payload
        if caps.streaming_put:
            # What a streaming put holds does not grow with what it has written (a collecting
            # put would grow by the 200 MiB written between the first and last third).
            third = count // 3
            growth = max(held[-third:]) - max(held[:third])
            assert growth < payload / 6, (growth, held[:3], held[-3:])
        got = store.get("large")
        assert got.num_rows == want_rows
        for i, (a, b) in enumerate(zip(got.to_batches(), _stream_batches(count, batch_bytes, seed=100))):
            assert a.equals(b), f"batch {i} differs"
        del got, a, b
        seg = store.options.segment_size
        with peak_memory() as peak:
            for i, batch in enumerate(store.get_batches("large")):
                assert batch.num_rows == numeric_rows(batch_bytes) and batch.column(0)[0].as_py() == i
                del batch
        assert i == count - 1
        if caps.byte_ranges:
            assert peak["total"] < stream_bound(seg, batch_bytes) < payload / 4, peak
        store.delete("large")
        assert store.list("") == []
