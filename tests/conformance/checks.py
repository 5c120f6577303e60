"""Conformance checks: what every backend must do, through the public Store facade only.

Each ``check_*`` is a plain function of a fresh store URL (and, for a few, the backend's traits);
``test_conformance.py`` calls every one of them for every backend in ``tests/servers``.  A backend
that lacks a capability must raise ``NotSupportedError`` where the check expects it: nothing here
is skipped.  Memory-backed stores live as long as one Store on them is open, so every check keeps
one open for its whole run.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest

import cylon_store as cs
from cylon_store import codec

from .tables import all_types_table, batched, numeric_rows, numeric_table

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers ------------------------------------------------------------------------------
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
def check_roundtrip_all_types(store_url):
    """Every Arrow type family, nulls in every column, schema and field metadata kept."""
    with cs.open_store(store_url) as store:
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


def check_input_kinds(store_url):
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
    with cs.open_store(store_url) as store:
        for name, (data, expected) in inputs.items():
            store.put(f"kinds/{name}", data)
            assert_same(store.get(f"kinds/{name}"), expected)


def check_empty_tables(store_url):
    zero_row = all_types_table(0, seed=3)
    cases = {
        "no-columns": pa.table({}),
        "zero-rows-with-schema": zero_row,
        "rows-but-no-columns": pa.table({"a": [1, 2, 3]}).drop_columns(["a"]),
        "empty-reader": pa.RecordBatchReader.from_batches(zero_row.schema, []),
        "empty-batches": [pa.RecordBatch.from_pylist([], schema=zero_row.schema)] * 3,
    }
    with cs.open_store(store_url) as store:
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


def check_many_batches(store_url):
    """Thousands of small batches: boundaries kept by the stream, equal table from get."""
    sizes = np.random.default_rng(4).integers(0, 8, 3000)
    table = all_types_table(int(sizes.sum()), seed=4).select(
        ["int8", "float64", "string", "decimal128", "ts_us_UTC", "list", "struct", "dictionary"])
    parts = batched(table, sizes.tolist())
    with cs.open_store(store_url) as store:
        info = store.put("many", iter(parts))
        assert info["batches"] == len(parts) and info["rows"] == table.num_rows
        assert_same(store.get("many"), table)
        lengths = [b.num_rows for b in store.get_batches("many")]
        assert lengths == sizes.tolist()


def check_overwrite(store_url):
    with cs.open_store(store_url) as store:
        first, second = numeric_table(5000, 1, tag=1), numeric_table(9000, 2, tag=2)
        store.put("ow", first)
        v1 = store.head("ow")
        store.put("ow", second)
        v2 = store.head("ow")
        assert_same(store.get("ow"), second)
        assert v2.key == "ow" and v2.size == len(memoryview(store.get_bytes("ow")))
        assert v1.version != v2.version or not v1.version, "version must change on replace"
        assert store.list("") == ["ow"]


def check_compression(store_url):
    """lz4 and zstd buffer compression round trip, shrink compressible data, and any store
    reads what any other wrote (the stream says how it was compressed)."""
    rng = np.random.default_rng(5)
    compressible = pa.table({"x": pa.array(np.repeat(rng.integers(0, 5, 2000), 50)),
                             "s": pa.array(np.repeat(np.array(["abcdefgh", "ijk"]), 50_000))})
    typed = all_types_table(200, seed=5)
    with cs.open_store(store_url) as plain:
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
        with pytest.raises(cs.ConfigError, match="compression"):
            cs.open_store(store_url, compression="gzip")


def check_get_batches_bounded_memory(store_url):
    """Streaming read of a 16 MiB object in 256 KiB segments holds about one segment plus one
    batch, not the object.  A backend without byte ranges reads whole objects (declared)."""
    seg, batch_bytes, count = 256 << 10, 256 << 10, 64
    with cs.open_store(store_url, segment_size=seg) as store:
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
        if store.capabilities.byte_ranges:
            assert peak["total"] < stream_bound(seg, batch_bytes) < size / 2, (peak, size)
        assert store.stats()["bytes_in"] >= size


# -- writes, conditions, errors -------------------------------------------------------------
def check_create_mode(store_url):
    t1, t2 = numeric_table(2000, 1, tag=1), numeric_table(3000, 2, tag=2)
    with cs.open_store(store_url) as store:
        if not store.capabilities.conditional_create:
            for put in (lambda: store.put("cm", t1, mode="create"),
                        lambda: store.put_bytes("cm", b"x", mode=cs.PutMode.CREATE)):
                with pytest.raises(cs.NotSupportedError):
                    put()
            assert store.list("") == []
            return
        store.put("cm", t1, mode="create")
        for attempt in (lambda: store.put("cm", t2, mode="create"),
                        lambda: store.put("cm", t2, mode=cs.PutMode.CREATE),
                        lambda: store.put("cm", t2.to_reader(), mode="create"),
                        lambda: store.put_bytes("cm", b"other", mode="create")):
            with pytest.raises(cs.AlreadyExistsError) as info:
                attempt()
            assert isinstance(info.value, FileExistsError)
            assert_names(info.value, "cm")
            assert_same(store.get("cm"), t1)
        store.put("cm", t2, mode="overwrite")
        assert_same(store.get("cm"), t2)
        store.delete("cm")
        store.put("cm", t1, mode="create")
        assert_same(store.get("cm"), t1)
        with pytest.raises(cs.ConfigError, match="mode"):
            store.put("cm2", t1, mode="append")
        assert store.list("") == ["cm"]


def check_concurrent_creators(store_url):
    """Of many simultaneous create-if-absent puts, exactly one wins and its data is stored."""
    n = 8
    tables = [numeric_table(20_000, i, tag=i) for i in range(n)]
    with cs.open_store(store_url) as store:
        if not store.capabilities.conditional_create:
            with pytest.raises(cs.NotSupportedError):
                store.put("race/create", tables[0], mode="create")
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


def check_not_found(store_url):
    with cs.open_store(store_url) as store:
        store.put("nf/present/x", pa.table({"a": [1]}))
        for key in ("nf/missing", "nf/present", "nf/present/x/y", "nf/presen"):
            for op in (store.get, store.get_batches, store.head, store.get_bytes):
                with pytest.raises(cs.NotFoundError) as info:
                    op(key)
                assert isinstance(info.value, FileNotFoundError)
                assert_names(info.value, key)
            assert store.exists(key) is False
            store.delete(key)  # deleting a missing key is not an error
        store.delete_many(["nf/missing", "nf/other"])
        assert store.exists("nf/present/x")
        assert store.list("") == ["nf/present/x"]


def check_delete(store_url):
    table = pa.table({"a": [1, 2, 3]})
    keys = ["d/a", "d/b/c", "d/b/d/e", "d2"]
    with cs.open_store(store_url) as store:
        for k in keys:
            store.put(k, table)
        store.delete("d/b/c")
        assert not store.exists("d/b/c")
        with pytest.raises(cs.NotFoundError):
            store.get("d/b/c")
        assert store.list("") == ["d/a", "d/b/d/e", "d2"]
        store.delete("d/b/c")  # idempotent
        store.delete_many(["d/a", "d/b/d/e", "d/never"])
        assert store.list("") == ["d2"]
        store.delete_many([])
        store.put("d/b/c", table)  # a key can be written again after delete
        assert_same(store.get("d/b/c"), table)
        store.delete_many(["d/b/c", "d2"])
        assert store.list("") == []


def check_list_prefix(store_url):
    """``list(prefix)`` is a plain string prefix (not a directory), sorted, exact keys only."""
    keys = ["p/x", "p/y/z", "p/y/zz", "pq", "p2/x", "q", "p-/a", "über/ß", "p/y.z"]
    with cs.open_store(store_url) as store:
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
        with pytest.raises(cs.ConfigError):
            store.list(None)
        store.delete("p/y/z")
        assert store.list("p/y/") == ["p/y/zz"]


GOOD_KEYS = ["plain", "a/b/c", "with space/and=sign,semi;colon", "-dash", ".hidden/x",
             "a..b/c...", "ünïcödé/日本/🙂", "x" * 200 + "/" + "y" * 200 + "/" + "z" * 200,
             "/".join(["s" * 200] * 5)]
BAD_KEYS = ["", "/abs", "/", "a/", "a//b", "..", ".", "a/../b", "a/./b", "../up", "nul\x00byte",
            "ctl\x01x", "new\nline", "tab\tkey", "back\\slash", "k" * 1025,
            "lone\ud800surrogate", 123, None, b"bytes"]


def check_keys(store_url):
    """Valid keys round-trip exactly; invalid ones are refused by every operation, with a
    clear error and nothing written."""
    table = pa.table({"a": [1]})
    with cs.open_store(store_url) as store:
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
                with pytest.raises(cs.InvalidKeyError) as info:
                    call()
                assert isinstance(info.value, ValueError)
                assert "invalid key" in str(info.value), (op, str(info.value))
            assert store.list("") == [], f"something was written for bad key {key!r}"
        for key in GOOD_KEYS:
            store.put(key, pa.table({"k": [key]}))
            assert store.get(key)["k"][0].as_py() == key
        assert store.list("") == sorted(GOOD_KEYS)


def check_bad_data_nothing_written(store_url):
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
    with cs.open_store(store_url) as store:
        for name, (data, error) in bad.items():
            data = failing() if name == "failing-generator" else data
            with pytest.raises(error):
                store.put("bd/new", data)
            assert store.list("") == [], name
        store.put("bd/old", good)
        for name, (data, error) in bad.items():
            data = failing() if name == "failing-generator" else data
            with pytest.raises(error):
                store.put("bd/old", data)
            assert_same(store.get("bd/old"), good)
        assert store.list("") == ["bd/old"]


def check_integrity(store_url):
    """Any damage to a stored object is an IntegrityError naming backend and key, on get and
    on get_batches; nothing damaged is ever returned as data."""
    table = all_types_table(500, seed=6)
    with cs.open_store(store_url, segment_size=16 << 10) as store:
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
            with pytest.raises(cs.IntegrityError) as info:
                store.get(key)
            assert_names(info.value, key)
            with pytest.raises(cs.IntegrityError) as info:
                read_stream(store, key)
            assert_names(info.value, key)
        assert_same(store.get("orig"), table)


# -- facade services ------------------------------------------------------------------------
def check_pickle(store_url):
    table = all_types_table(50, seed=7)
    with cs.open_store(store_url, compression="zstd", segment_size="64KiB") as store:
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
        # errors pickle with their fields (a launcher re-raises them in the caller)
        with pytest.raises(cs.NotFoundError) as info:
            store.get("pk/missing")
        err = pickle.loads(pickle.dumps(info.value))
        assert type(err) is cs.NotFoundError and err.key == "pk/missing"
        assert err.backend == info.value.backend and str(err) == str(info.value)


def check_stats(store_url):
    with cs.open_store(store_url) as store:
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


def check_capabilities(store_url):
    """Declared capabilities hold; undeclared optional operations raise NotSupportedError."""
    with cs.open_store(store_url) as store:
        caps = store.capabilities
        assert isinstance(caps, cs.Capabilities)
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
        else:
            with pytest.raises(cs.NotSupportedError):
                adapter.notify("cap-ch")
            with pytest.raises(cs.NotSupportedError):
                adapter.wait("cap-ch", 0.01)
        if caps.atomic_counter:
            assert [adapter.incr("cap-counter") for _ in range(3)] == [1, 2, 3]
            adapter.delete_counter("cap-counter")
            assert adapter.incr("cap-counter") == 1
            adapter.delete_counter("cap-counter")
        else:
            with pytest.raises(cs.NotSupportedError):
                adapter.incr("cap-counter")
        store.delete("cap/raw")


def check_close(store_url):
    with cs.open_store(store_url) as keeper:
        with cs.open_store(store_url) as store:
            store.put("cl", pa.table({"a": [1]}))
            assert "Store(" in repr(store)
        with pytest.raises(cs.StoreError, match="closed"):
            store.get("cl")
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
    """A racing process: ``url key tag rounds create_key``.  Says 'ready', waits for a line on
    stdin, puts its version of ``key`` up to ``rounds`` times and says 'done'; waits for another
    line, then tries to create ``create_key`` once and says 'won' or 'lost'."""
    url, key, tag, rounds, create_key = argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4]
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
    """Racing writer processes, driven line by line over their stdin/stdout."""

    def __init__(self, url, key, tags, rounds, create_key):
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from conformance.checks import _child; _child(sys.argv[2:])")
        self.procs = [subprocess.Popen(
            [sys.executable, "-c", code, TESTS_DIR, url, key, str(tag), str(rounds), create_key],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for tag in tags]
        if self.expect() != ["ready"] * len(self.procs):
            self.kill()
            raise AssertionError("a writer process failed to start")

    def send(self):
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()

    def expect(self) -> list[str]:
        return [p.stdout.readline().strip() for p in self.procs]

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


def check_concurrent_writers(store_url, *, processes: bool = False, threads: int = 4,
                             rounds: int = 25):
    """Writers race to replace one key while readers read it: every read (whole or streamed)
    is exactly one version that some writer put, never a mix.  A streamed read may instead
    fail with PreconditionError when the object is replaced under it (documented).  With
    ``processes``, two writer processes join the race, and then they and this process race to
    create one key: exactly one wins."""
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
        creating = store.capabilities.conditional_create
        children = _Children(store_url, key, tags[threads:], rounds, "race/created") if n_proc else None
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
def check_large_payload(store_url):
    """About 300 MiB streamed in 4 MiB batches: a streaming put that never holds the object
    (on backends declaring ``streaming_put``; their own buffering, such as multipart parts in
    flight, must stay well below it), get equal, and a streamed read bounded by a few segments.
    A backend whose declared maximum object size is smaller must say so with
    PayloadTooLargeError, and write nothing."""
    batch_bytes, count = 4 << 20, 75
    payload = count * batch_bytes
    want_rows = count * numeric_rows(batch_bytes)
    with cs.open_store(store_url) as store:
        limit = store.capabilities.max_object_size
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
        if store.capabilities.streaming_put:
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
        if store.capabilities.byte_ranges:
            assert peak["total"] < stream_bound(seg, batch_bytes) < payload / 4, peak
        store.delete("large")
        assert store.list("") == []


#: Checks that take only the store URL (``check_concurrent_writers`` also takes the backend's
#: traits, ``check_large_payload`` is marked slow): run by test_conformance for every backend.
URL_CHECKS = [
    check_roundtrip_all_types,
    check_input_kinds,
    check_empty_tables,
    check_many_batches,
    check_overwrite,
    check_compression,
    check_get_batches_bounded_memory,
    check_create_mode,
    check_concurrent_creators,
    check_not_found,
    check_delete,
    check_list_prefix,
    check_keys,
    check_bad_data_nothing_written,
    check_integrity,
    check_pickle,
    check_stats,
    check_capabilities,
    check_close,
]
