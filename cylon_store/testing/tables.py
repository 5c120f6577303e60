"""Deterministic Arrow test tables: every type the store must round-trip, nulls in every column.

Built with numpy and pyarrow compute (no per-row Python), so the same builders serve a 10-row
check and a multi-hundred-MiB payload.  Fixed seeds: a table is the same on every run and every
machine, so a failing check fails again.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TIMEZONES = (None, "UTC", "America/New_York", "+05:30")
UNITS = ("s", "ms", "us", "ns")


def _mask(rng: np.random.Generator, n: int, frac: float = 0.2) -> np.ndarray:
    """A null mask with roughly ``frac`` nulls and, when n > 1, at least one null and one value."""
    m = rng.random(n) < frac
    if n:
        m[0] = True
    if n > 1:
        m[-1] = False
    return m


def _offsets(rng, n: int, max_len: int) -> np.ndarray:
    lengths = rng.integers(0, max_len + 1, n)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _strings(rng, n: int, *, large: bool = False) -> pa.Array:
    # Unicode on purpose (multi-byte UTF-8), and some empty strings.
    base = pc.cast(pa.array(rng.integers(-10**6, 10**6, n)), pa.string())
    text = pc.binary_join_element_wise(base, pa.array(np.where(rng.random(n) < 0.5, "é✓", "")), "")
    text = pc.if_else(pa.array(rng.random(n) < 0.1), "", text)
    return text.cast(pa.large_string()) if large else text


def _decimals(rng, n: int, dtype) -> pa.Array:
    """Unscaled values as little-endian two's complement words (negative values included)."""
    low = rng.integers(-10**15, 10**15, n)
    words = dtype.byte_width // 8
    raw = np.empty((n, words), dtype=np.int64)
    raw[:, 0] = low
    raw[:, 1:] = (low >> 63)[:, None]  # sign extension
    return pa.Array.from_buffers(dtype, n, [
        pa.py_buffer(np.packbits(~_mask(rng, n), bitorder="little").tobytes()),
        pa.py_buffer(raw.tobytes())])


def all_types_table(n: int = 64, seed: int = 0, *, metadata: bool = True) -> pa.Table:
    """One column per Arrow type family, each with nulls (the ``null`` column is all null)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {}

    for bits in (8, 16, 32, 64):
        for signed in (True, False):
            dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
            info = np.iinfo(dtype)
            values = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
            if n >= 2:
                values[1], values[-1] = info.min, info.max  # the extremes survive
            cols[f"{'int' if signed else 'uint'}{bits}"] = pa.array(values, mask=_mask(rng, n))
    cols["float16"] = pa.array(rng.standard_normal(n).astype(np.float16), mask=_mask(rng, n))
    f32 = rng.standard_normal(n).astype(np.float32)
    f64 = rng.standard_normal(n) * 1e300
    if n >= 3:
        f64[1], f64[2] = np.inf, -np.inf
    cols["float32"] = pa.array(f32, mask=_mask(rng, n))
    cols["float64"] = pa.array(f64, mask=_mask(rng, n))
    cols["bool"] = pa.array(rng.random(n) < 0.5, mask=_mask(rng, n))

    strings = _strings(rng, n)
    null = pa.array(_mask(rng, n))
    cols["string"] = pc.if_else(null, pa.scalar(None, pa.string()), strings)
    cols["large_string"] = pc.if_else(null, pa.scalar(None, pa.large_string()),
                                      _strings(rng, n, large=True))
    cols["binary"] = pc.if_else(null, pa.scalar(None, pa.binary()), strings.cast(pa.binary()))
    cols["large_binary"] = pc.if_else(null, pa.scalar(None, pa.large_binary()),
                                      strings.cast(pa.large_binary()))
    cols["fixed_size_binary"] = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(4), n, [pa.py_buffer(np.packbits(~_mask(rng, n), bitorder="little").tobytes()),
                          pa.py_buffer(rng.integers(0, 256, 4 * n, dtype=np.uint8).tobytes())])

    for name, dtype in (("decimal128", pa.decimal128(20, 2)), ("decimal128_38", pa.decimal128(38, 10)),
                        ("decimal256", pa.decimal256(50, 5))):
        cols[name] = _decimals(rng, n, dtype)

    days = rng.integers(-50_000, 50_000, n).astype(np.int32)
    cols["date32"] = pa.array(days, mask=_mask(rng, n)).cast(pa.date32())
    cols["date64"] = pa.array(days.astype(np.int64) * 86_400_000, mask=_mask(rng, n)).cast(pa.date64())
    cols["time32"] = pa.array(rng.integers(0, 86_400_000, n).astype(np.int32),
                              mask=_mask(rng, n)).cast(pa.time32("ms"))
    cols["time64"] = pa.array(rng.integers(0, 86_400 * 10**9, n),
                              mask=_mask(rng, n)).cast(pa.time64("ns"))
    for unit in UNITS:
        for tz in TIMEZONES:
            cols[f"ts_{unit}_{tz or 'naive'}"] = pa.array(
                rng.integers(-2**40, 2**40, n), mask=_mask(rng, n)).cast(pa.timestamp(unit, tz))
        cols[f"duration_{unit}"] = pa.array(rng.integers(-2**40, 2**40, n),
                                            mask=_mask(rng, n)).cast(pa.duration(unit))
    mdn = np.zeros(n, dtype=[("months", "<i4"), ("days", "<i4"), ("nanos", "<i8")])
    mdn["months"], mdn["days"] = rng.integers(-99, 99, (2, n))
    mdn["nanos"] = rng.integers(-2**50, 2**50, n)
    cols["interval_mdn"] = pa.Array.from_buffers(pa.month_day_nano_interval(), n, [
        pa.py_buffer(np.packbits(~_mask(rng, n), bitorder="little").tobytes()),
        pa.py_buffer(mdn.tobytes())])

    int_values = pa.array(rng.integers(-100, 100, 4 * n + 1), mask=_mask(rng, 4 * n + 1))
    offs = _offsets(rng, n, 4)
    cols["list"] = pa.ListArray.from_arrays(offs, int_values[:offs[-1]], mask=pa.array(_mask(rng, n)))
    str_values = _strings(rng, int(offs[-1]), large=True)
    cols["large_list"] = pa.LargeListArray.from_arrays(offs.astype(np.int64), str_values,
                                                       mask=pa.array(_mask(rng, n)))
    cols["fixed_size_list"] = pa.FixedSizeListArray.from_arrays(
        pa.array(rng.standard_normal(3 * n), mask=_mask(rng, 3 * n)), 3, mask=pa.array(_mask(rng, n)))
    struct_mask = _mask(rng, n)
    cols["struct"] = pa.StructArray.from_arrays(
        [pa.array(rng.integers(0, 10, n), mask=_mask(rng, n)), _strings(rng, n),
         pa.ListArray.from_arrays(offs, int_values[:offs[-1]])],
        names=["a", "b", "c"], mask=pa.array(struct_mask))
    map_offs = _offsets(rng, n, 3)
    cols["map"] = pa.MapArray.from_arrays(
        map_offs, _strings(rng, int(map_offs[-1])),
        pa.array(rng.integers(0, 1000, int(map_offs[-1])).astype(np.int32),
                 mask=_mask(rng, int(map_offs[-1]))),
        mask=pa.array(_mask(rng, n)))
    cols["list_of_struct"] = pa.ListArray.from_arrays(
        offs, pa.StructArray.from_arrays([int_values[:offs[-1]]], names=["x"]),
        mask=pa.array(_mask(rng, n)))
    words = pa.array(["alpha", "beta", "gamma", "δέλτα", ""])
    cols["dictionary"] = pa.DictionaryArray.from_arrays(
        pa.array(rng.integers(0, len(words), n).astype(np.int32), mask=_mask(rng, n)), words)
    cols["dictionary_int8"] = pa.DictionaryArray.from_arrays(
        pa.array(rng.integers(0, 3, n).astype(np.int8), mask=_mask(rng, n)),
        pa.array([1.5, None, -2.0]))
    cols["null"] = pa.nulls(n)

    table = pa.table(cols)
    if metadata:
        fields = [f.with_metadata({"unit": f.name}) if i % 7 == 0 else f
                  for i, f in enumerate(table.schema)]
        schema = pa.schema(fields, metadata={"origin": "cylon-store conformance", "seed": str(seed),
                                             "utf8": "näive ✓"})
        table = table.cast(schema)
    return table


def batched(table: pa.Table, sizes) -> list[pa.RecordBatch]:
    """Split ``table`` into record batches of the given row counts (0 allowed)."""
    out, pos = [], 0
    for size in sizes:
        out.append(table.slice(pos, size).combine_chunks().to_batches()[0]
                   if size else _empty_batch(table.schema))
        pos += size
    assert pos == table.num_rows, (pos, table.num_rows)
    return out


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


def numeric_rows(nbytes: int) -> int:
    """Rows of ``numeric_table(nbytes)``."""
    return max(1, nbytes // 20)  # 4 + 8 + 8 bytes a row


def numeric_table(nbytes: int, seed: int = 0, *, tag: int = 0) -> pa.Table:
    """About ``nbytes`` of int64/float64/string data, tagged with a constant ``tag`` column."""
    rng = np.random.default_rng(seed)
    rows = numeric_rows(nbytes)
    return pa.table({
        "tag": pa.array(np.full(rows, tag, dtype=np.int32)),
        "i": pa.array(rng.integers(-2**62, 2**62, rows)),
        "f": pa.array(rng.standard_normal(rows)),
    })
