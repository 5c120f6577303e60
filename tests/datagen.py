"""Deterministic random tables of every Arrow type, with nulls in every column."""

from __future__ import annotations

import decimal

import numpy as np
import pyarrow as pa


def all_types_table(rows: int, seed: int = 0, null_fraction: float = 0.2) -> pa.Table:
    rng = np.random.default_rng(seed)

    def mask():
        return rng.random(rows) < null_fraction

    ints = {f"i{w}": pa.array(rng.integers(np.iinfo(f"int{w}").min, np.iinfo(f"int{w}").max, rows,
                                           dtype=f"int{w}"), mask=mask()) for w in (8, 16, 32, 64)}
    uints = {f"u{w}": pa.array(rng.integers(0, np.iinfo(f"uint{w}").max, rows, dtype=f"uint{w}"),
                               mask=mask()) for w in (8, 16, 32, 64)}
    words = np.array(["", "a", "βeta", "long-" * 5, "x y"], dtype=object)
    strs = words[rng.integers(0, len(words), rows)]
    m = mask()
    str_list = [None if m[i] else strs[i] for i in range(rows)]
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 4, rows))]).astype(np.int32)
    values = pa.array(rng.integers(-5, 5, int(offsets[-1])), pa.int32())
    lists = pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(mask()))
    cols = {
        **ints, **uints,
        "f16": pa.array(rng.standard_normal(rows).astype(np.float16), mask=mask()),
        "f32": pa.array(rng.standard_normal(rows).astype(np.float32), mask=mask()),
        "f64": pa.array(np.where(rng.random(rows) < 0.05, np.nan, rng.standard_normal(rows)), mask=mask()),
        "bool": pa.array(rng.random(rows) < 0.5, mask=mask()),
        "str": pa.array(str_list, pa.string()),
        "lstr": pa.array(str_list, pa.large_string()),
        "bin": pa.array([None if s is None else s.encode() for s in str_list], pa.binary()),
        "dec": pa.array([None if x is None else decimal.Decimal(int(x)).scaleb(-2)
                         for x in pa.array(rng.integers(-10**9, 10**9, rows), mask=mask()).to_pylist()],
                        pa.decimal128(12, 2)),
        "date": pa.array(rng.integers(-20000, 20000, rows).astype(np.int32), pa.int32(), mask=mask()).cast(pa.date32()),
        "ts_tz": pa.array(rng.integers(0, 2**40, rows), pa.int64(), mask=mask()).cast(pa.timestamp("us", tz="Europe/Paris")),
        "ts": pa.array(rng.integers(0, 2**40, rows), pa.int64(), mask=mask()).cast(pa.timestamp("ns")),
        "dur": pa.array(rng.integers(-2**30, 2**30, rows), pa.int64(), mask=mask()).cast(pa.duration("ms")),
        "list": lists,
        "llist": lists.cast(pa.large_list(pa.int32())),
        "struct": pa.StructArray.from_arrays([pa.array(rng.integers(0, 9, rows)), pa.array(str_list, pa.string())],
                                             names=["n", "s"], mask=pa.array(mask())),
        "map": pa.MapArray.from_arrays(pa.array(offsets), pa.array([f"k{i}" for i in range(int(offsets[-1]))]),
                                       values, mask=pa.array(mask())) if rows else pa.array([], pa.map_(pa.string(), pa.int32())),
        "dict": pa.array(str_list, pa.string()).dictionary_encode(),
        "null": pa.nulls(rows),
    }
    return pa.table(cols).replace_schema_metadata({"origin": "cylon-store-tests"})


def _nan_free(table: pa.Table) -> pa.Table:
    import pyarrow.compute as pc
    cols, names = [], []
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_floating(col.type):
            isnan = pc.fill_null(pc.is_nan(col), False)
            cols += [pc.if_else(isnan, pa.scalar(0, col.type), col), isnan]
            names += [name, name + "#nan"]
        else:
            cols.append(col)
            names.append(name)
    return pa.Table.from_arrays(cols, names=names)


def tables_equal(a: pa.Table, b: pa.Table) -> bool:
    """Table equality where NaN equals NaN (Arrow's equals says NaN != NaN)."""
    return a.schema.equals(b.schema) and _nan_free(a).equals(_nan_free(b))
