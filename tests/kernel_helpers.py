"""Helpers of the kernel tests: run ranks, split a table over ranks, random tables of every key
type, and comparison against a single-process result."""

from __future__ import annotations

import decimal
import threading
import traceback
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import cylon_store as cs

COMM_TIMEOUT = 30.0


def run_ranks(fn, world_size: int, store_url: str, *args, capture: bool = False,
              exchange=None):
    """Run ``fn(comm, *args)`` on ``world_size`` thread ranks over ``store_url``; return each
    rank's value in rank order.  With ``capture``, return ("ok", value) or ("err", exception)
    per rank instead of raising (to check that every rank raises alike); ``exchange`` pins the
    store exchange strategy."""
    if not capture:
        body = fn
    else:
        def body(comm, *a):
            try:
                return ("ok", fn(comm, *a))
            except Exception as exc:  # the test inspects it
                return ("err", exc)
    try:
        from cylon_store.launch import launch
    except ImportError:
        launch = None
    if launch is not None:
        return launch(body, world_size, store=store_url, launcher="threads", args=args,
                      job=f"k-{uuid.uuid4().hex[:10]}", timeout=4 * COMM_TIMEOUT,
                      comm_timeout=COMM_TIMEOUT, exchange=exchange)
    return _run_threads(body, world_size, store_url, args)


def _run_threads(fn, world_size, store_url, args):
    job = f"k-{uuid.uuid4().hex[:10]}"
    results, errors = [None] * world_size, {}

    def run(rank):
        try:
            with cs.connect(store_url, job=job, world_size=world_size, rank=rank,
                            timeout=COMM_TIMEOUT) as comm:
                results[rank] = fn(comm, *args)
        except BaseException as exc:
            errors[rank] = (exc, traceback.format_exc())

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * COMM_TIMEOUT)
    if errors:
        r = min(errors)
        raise RuntimeError(f"rank {r} failed:\n{errors[r][1]}") from errors[r][0]
    return results


# -- distributing a table over ranks ----------------------------------------------------------

def split_rows(table: pa.Table, world_size: int, how: str = "random", seed: int = 0) -> list[pa.Table]:
    """Per-rank parts of ``table`` whose concatenation in rank order is ``table``.

    how: "random" (random contiguous cuts), "even", "first" (all rows on rank 0), "last"."""
    n = table.num_rows
    if how == "first":
        cuts = [n] * world_size
    elif how == "last":
        cuts = [0] * (world_size - 1) + [n]
    elif how == "even":
        cuts = [(r + 1) * n // world_size for r in range(world_size)]
    else:
        rng = np.random.default_rng(seed)
        cuts = sorted(rng.integers(0, n + 1, world_size - 1).tolist()) + [n]
    parts, lo = [], 0
    for hi in cuts:
        parts.append(table.slice(lo, hi - lo))
        lo = hi
    return parts


# -- random data -------------------------------------------------------------------------------

KEY_TYPES = ["int64", "int32", "uint8", "float64", "string", "large_string", "binary", "bool",
             "date32", "timestamp", "decimal", "dictionary"]


def key_array(kind: str, codes: np.ndarray, null_mask: np.ndarray) -> pa.Array:
    """A key column of type ``kind`` whose values are a function of the integer ``codes`` (so
    equal codes give equal keys)."""
    if kind == "int64":
        return pa.array(codes.astype(np.int64) * 7919 - 1000, pa.int64(), mask=null_mask)
    if kind == "int32":
        return pa.array(codes.astype(np.int32) - 3, pa.int32(), mask=null_mask)
    if kind == "uint8":
        return pa.array((codes % 256).astype(np.uint8), pa.uint8(), mask=null_mask)
    if kind == "float64":
        # -0.0 / 0.0 collapse into one code so that equal codes mean equal keys for every
        # operator; NaN is its own value.
        vals = codes.astype(np.float64) * 0.5 - 2.0
        vals[codes == 4] = np.nan
        return pa.array(vals, pa.float64(), mask=null_mask)
    if kind in ("string", "large_string", "binary", "dictionary"):
        words = np.array([f"k{c}-" + "x" * int(c % 13) for c in range(int(codes.max(initial=0)) + 1)],
                         dtype=object)
        vals = [None if (null_mask is not None and null_mask[i]) else words[c]
                for i, c in enumerate(codes)]
        if kind == "binary":
            return pa.array([None if v is None else v.encode() for v in vals], pa.binary())
        arr = pa.array(vals, pa.large_string() if kind == "large_string" else pa.string())
        return arr.dictionary_encode() if kind == "dictionary" else arr
    if kind == "bool":
        return pa.array(codes % 2 == 1, pa.bool_(), mask=null_mask)
    if kind == "date32":
        return pa.array(codes.astype(np.int32) - 10, pa.int32(), mask=null_mask).cast(pa.date32())
    if kind == "timestamp":
        return pa.array(codes.astype(np.int64) * 10**9 + 17, pa.int64(),
                        mask=null_mask).cast(pa.timestamp("ns", tz="UTC"))
    if kind == "decimal":
        return pa.array([None if (null_mask is not None and null_mask[i]) else
                         decimal.Decimal(int(c) * 25 - 100).scaleb(-2) for i, c in enumerate(codes)],
                        pa.decimal128(10, 2))
    raise ValueError(kind)


def random_table(n: int, *, seed: int = 0, key_kinds=("int64",), cardinality: int = 20,
                 null_fraction: float = 0.1, skew: float = 0.0, prefix: str = "k",
                 value_cols: bool = True) -> pa.Table:
    """Columns k0.. (keys of the given kinds), v (int64 with nulls), x (float64 with nulls),
    s (string).  ``skew``: fraction of rows on one hot key."""
    rng = np.random.default_rng(seed)
    cols = {}
    for i, kind in enumerate(key_kinds):
        codes = rng.integers(0, cardinality, n)
        if skew:
            codes[rng.random(n) < skew] = 1
        nulls = rng.random(n) < null_fraction if null_fraction else None
        cols[f"{prefix}{i}"] = key_array(kind, codes, nulls)
    if value_cols:
        cols["v"] = pa.array(rng.integers(-1000, 1000, n), pa.int64(), mask=rng.random(n) < 0.1)
        cols["x"] = pa.array(rng.standard_normal(n) * 100 + 1e6, pa.float64(), mask=rng.random(n) < 0.1)
        cols["s"] = pa.array([f"s{v}" for v in rng.integers(0, 50, n)], pa.string())
    return pa.table(cols)


# -- comparison --------------------------------------------------------------------------------

def _sortable(t: pa.DataType) -> bool:
    return not (pa.types.is_nested(t) or pa.types.is_null(t))


def canonical(table: pa.Table, by=None) -> pa.Table:
    """``table`` with dictionaries decoded, sorted by ``by`` (default every sortable column)."""
    cols = []
    for c in table.columns:
        cols.append(c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c)
    table = pa.Table.from_arrays(cols, names=table.column_names)
    keys = by if by is not None else [n for n in table.column_names
                                     if _sortable(table.schema.field(n).type)]
    if not keys or table.num_rows == 0:
        return table
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))


def assert_same_rows(got: pa.Table, expected: pa.Table, by=None, rtol: float = 1e-9,
                     ordered: bool = False):
    """Equal as multisets of rows (as sequences if ``ordered``); floats compared with ``rtol``,
    NaN equal to NaN."""
    assert got.column_names == expected.column_names, (got.column_names, expected.column_names)
    assert got.num_rows == expected.num_rows, (got.num_rows, expected.num_rows)
    if ordered:
        g, e = canonical(got, []), canonical(expected, [])
    else:
        g, e = canonical(got, by), canonical(expected, by)
    for i, name in enumerate(g.column_names):
        a, b = g.column(i), e.column(i)
        assert a.type == b.type, (name, a.type, b.type)
        if pa.types.is_floating(a.type):
            an = a.is_null().to_numpy(zero_copy_only=False)
            bn = b.is_null().to_numpy(zero_copy_only=False)
            assert (an == bn).all(), f"null mask differs in {name}"
            av = a.fill_null(0).to_numpy(zero_copy_only=False)
            bv = b.fill_null(0).to_numpy(zero_copy_only=False)
            assert np.allclose(av, bv, rtol=rtol, atol=0, equal_nan=True), \
                f"{name}: {av[:10]} vs {bv[:10]}"
        else:
            assert a.equals(b), f"column {name} differs:\n{a.to_pylist()[:20]}\n{b.to_pylist()[:20]}"


def concat(tables) -> pa.Table:
    return pa.concat_tables(tables)
