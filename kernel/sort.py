"""Distributed sort by sample sort: sample, agree on splitters, range-partition, exchange, sort.

The concatenation of the ranks' results in rank order is the stable global sort of the input
taken in (rank, row) order.  Rows are ordered by the sort keys and then by (source rank, row
number), so splitters are unique even when every key is equal: heavy skew still spreads evenly.
Samples are weighted by their rank's row count, so a rank holding all the rows gets its share.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import types
from ._common import (KernelError, KeyTypeError, column_list, exchange_tables, preflight,
                      table_from_bytes, table_to_bytes)

__all__ = ["sort", "normalize_sort_keys", "argsort_stable", "SAMPLES_PER_RANK"]

#: Samples each rank contributes per destination rank (oversampling factor).
SAMPLES_PER_RANK = 128
_RANK, _ROW, _SPLIT = "__cylon_rank", "__cylon_row", "__cylon_split"


def normalize_sort_keys(by, null_placement: str = "at_end") -> list[tuple[str, str, str]]:
    """"a" | ["a", "b"] | [("a", "ascending"), ("b", "descending", "at_start")]
    -> [(name, order, null_placement)]."""
    if null_placement not in ("at_end", "at_start"):
        raise KernelError(f"sort: null_placement must be 'at_end' or 'at_start', got "
                          f"{null_placement!r}")
    if isinstance(by, str):
        return [(by, "ascending", null_placement)]
    if by is None:
        raise KernelError("sort: no sort keys given")
    out = []
    try:
        items = list(by)
    except TypeError:
        raise KernelError(f"sort: by must be a column name, a list of names or of (name, order) "
                          f"pairs, got {type(by).__name__}") from None
    for item in items:
        if isinstance(item, str):
            out.append((item, "ascending", null_placement))
        elif (isinstance(item, (tuple, list)) and len(item) in (2, 3)
              and isinstance(item[0], str)):
            order = item[1]
            placement = item[2] if len(item) == 3 else null_placement
            if order not in ("ascending", "descending"):
                raise KernelError(f"sort: order of {item[0]!r} must be 'ascending' or "
                                  f"'descending', got {order!r}")
            if placement not in ("at_end", "at_start"):
                raise KernelError(f"sort: null placement of {item[0]!r} must be 'at_end' or "
                                  f"'at_start', got {placement!r}")
            out.append((item[0], order, placement))
        else:
            raise KernelError(f"sort: cannot read sort key {item!r}; use a name or (name, order)")
    if not out:
        raise KernelError("sort: no sort keys given")
    return out


def _key_table(table: pa.Table, keys) -> pa.Table:
    """The sort-key columns, dictionaries decoded (Arrow sorts their values, not their codes),
    types Arrow cannot sort as an equivalent it can (``types.sort_key``)."""
    cols = [types.sort_key(table.column(name)) for name, _, _ in keys]
    return pa.Table.from_arrays(cols, names=[f"k{i}" for i in range(len(keys))])


def _sort_keys(keys, tiebreak: bool):
    sk = [(f"k{i}", order, placement) for i, (_, order, placement) in enumerate(keys)]
    if tiebreak:
        sk += [(_RANK, "ascending", "at_end"), (_ROW, "ascending", "at_end"),
               (_SPLIT, "ascending", "at_end")]
    return sk


def _per_key_placement() -> bool:
    try:
        pc.sort_indices(pa.table({"a": [1]}), sort_keys=[("a", "ascending", "at_end")])
        return True
    except (TypeError, ValueError, pa.ArrowInvalid):
        return False


_PER_KEY = _per_key_placement()


def sort_indices(table: pa.Table, sort_keys) -> pa.Array:
    """Stable sort indices for (name, order, null_placement) keys, on any pyarrow >= 14."""
    if _PER_KEY:
        return pc.sort_indices(table, sort_keys=sort_keys)
    placements = {p for _, _, p in sort_keys}
    if len(placements) > 1:
        raise KernelError("sort: null placement per key needs pyarrow >= 25")
    return pc.sort_indices(table, sort_keys=[(n, o) for n, o, _ in sort_keys],
                           null_placement=placements.pop() if placements else "at_end")


def sort(comm, table, by, *, null_placement: str = "at_end",
         samples_per_rank: Optional[int] = None) -> pa.Table:
    """Sort the rows of every rank's ``table``; return this rank's range of the result.

    ``by``: a column name, a list of names, or [("a", "ascending"), ("b", "descending")]
    (a third item may give that key's null placement).  Nulls go ``null_placement``
    ("at_end" or "at_start") otherwise, NaN next to them on the numbers' side (Arrow's order);
    ties keep their (rank, row) order.
    """
    oversample = SAMPLES_PER_RANK if samples_per_rank is None else int(samples_per_rank)
    keys_arg = by if isinstance(by, str) or by is None else tuple(
        tuple(b) if isinstance(b, list) else b for b in by)
    me, P = comm.rank, comm.world_size

    def prepare(tables):
        t = tables[0]
        keys = normalize_sort_keys(by, null_placement)
        column_list([k for k, _, _ in keys], t.schema, "sort")
        if oversample < 1:
            raise KernelError(f"sort: samples_per_rank must be positive, got {oversample}")
        try:
            sort_indices(_key_table(t.schema.empty_table(), keys), _sort_keys(keys, False))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise KeyTypeError(f"sort: cannot sort by {[k for k, _, _ in keys]}: {exc}") from exc
        kt = _key_table(t, keys)
        payload = None
        if P > 1:
            payload = table_to_bytes(_sample(kt, me, oversample * P))
        return (keys, kt), payload

    pf = preflight(comm, "sort", [("table", table)], (keys_arg, null_placement, oversample), prepare)
    keys, kt = pf.local
    t = pf.tables[0]
    if P == 1 or pf.total_rows(0) == 0:
        return _local_sort(t, kt, keys)

    splitters = _splitters(pf, keys, P)
    n = t.num_rows
    fast = _numeric_key(kt, keys)
    # The splitters come from every rank's samples: they may hold a NaN this rank does not (a
    # NaN "at_start" has no numeric key), and then the general path orders them.
    s_vals = _numeric_key(_splitter_key(splitters), keys) if fast is not None else None
    if fast is not None and s_vals is not None:
        order, bounds = _range_bounds_numeric(fast, s_vals, splitters, keys, me, n)
    else:
        order, bounds = _range_bounds(kt, splitters, keys, me, n)
    # The table moves in sorted order, so every part is a sorted run.
    ordered = types.take(t, pa.array(order))
    edges = np.concatenate([[0], bounds, [n]])
    parts = [ordered.slice(int(edges[d]), int(edges[d + 1] - edges[d])) for d in range(P)]
    received = exchange_tables(comm, parts)
    return _local_sort(received, _key_table(received, keys), keys)


def _range_bounds(kt, splitters, keys, me, n):
    """General case: sort our keys together with the splitters; a row goes to the number of
    splitters ahead of it.  Returns (local sorted order, P-1 part boundaries)."""
    local = kt.append_column(_RANK, pa.array(np.full(n, me, dtype=np.int32))) \
              .append_column(_ROW, pa.array(np.arange(n, dtype=np.int64))) \
              .append_column(_SPLIT, pa.array(np.zeros(n, dtype=np.int8)))
    both = pa.concat_tables([local, splitters.cast(local.schema)])
    order = sort_indices(both, _sort_keys(keys, True)).to_numpy()
    is_split = order >= n
    bounds = np.flatnonzero(is_split) - np.arange(int(is_split.sum()))
    return order[~is_split], bounds


def _numeric_key(kt: pa.Table, keys) -> Optional[np.ndarray]:
    """For one integer, temporal or floating key without nulls: numpy values whose ascending
    stable order is Arrow's order for the key's direction.  Arrow puts NaN with the nulls
    (after the numbers for "at_end" in either direction), numpy puts NaN last: so NaN with
    "at_start" takes the general path."""
    if len(keys) != 1 or kt.num_rows == 0:
        return None
    col = kt.column(0)
    t = col.type
    if col.null_count:
        return None
    if pa.types.is_floating(t) and t != pa.float16():
        v = col.to_numpy()
        if keys[0][2] == "at_start" and np.isnan(v).any():
            return None
        return -v if keys[0][1] == "descending" else v
    if pa.types.is_integer(t) or pa.types.is_temporal(t):
        if not pa.types.is_integer(t):
            width = t.bit_width
            col = col.cast(pa.int64() if width == 64 else pa.int32())
        v = col.to_numpy()
        return np.invert(v) if keys[0][1] == "descending" else v
    return None


def _splitter_key(splitters: pa.Table) -> pa.Table:
    """The splitters' key column, nulls filled (``_range_bounds_numeric`` places those apart)."""
    skey = splitters.column(0)
    return pa.table({"k0": skey.fill_null(0) if skey.null_count else skey})


def _range_bounds_numeric(v: np.ndarray, s_vals: np.ndarray, splitters: pa.Table,
                          keys: list[tuple[str, str, str]], me: int,
                          n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fast path of ``_range_bounds``: one stable numpy sort and a binary search per splitter,
    with the same (key, rank, row) order.  ``v`` and ``s_vals`` are the numeric keys of this
    rank's rows and of the splitters (``_numeric_key``)."""
    order = argsort_stable(v)
    skey = splitters.column(0)
    s_null = skey.is_null().to_numpy(zero_copy_only=False)
    s_rank = splitters.column(_RANK).to_numpy()
    s_row = splitters.column(_ROW).to_numpy()
    bounds = np.empty(len(s_rank), dtype=np.int64)
    for j in range(len(s_rank)):
        if s_null[j]:   # we hold no nulls: all our rows are on one side of a null splitter
            bounds[j] = n if keys[0][2] == "at_end" else 0
            continue
        # Binary searches through the permutation (``sorter``): no sorted copy of the keys.
        lo = int(np.searchsorted(v, s_vals[j], side="left", sorter=order))
        hi = int(np.searchsorted(v, s_vals[j], side="right", sorter=order))
        if me < s_rank[j]:
            bounds[j] = hi
        elif me > s_rank[j]:
            bounds[j] = lo
        else:
            bounds[j] = lo + int(np.searchsorted(order[lo:hi], s_row[j], side="right"))
    return order, bounds


#: Below this many rows ``argsort_stable`` is numpy's stable argsort as is.
_BUCKET_MIN_ROWS = 1 << 16
_BUCKET_BITS = 16


def _sortable_bits(v: np.ndarray) -> Optional[np.ndarray]:
    """A fresh uint64 array whose unsigned order is numpy's ascending order of ``v`` with the
    same ties: integers with the sign bit flipped; floats with -0.0 as 0.0, negative numbers
    bit-inverted, and every NaN as one value after +inf.  None for other dtypes."""
    kind = v.dtype.kind
    if kind == "u":
        return v.astype(np.uint64, copy=True)
    if kind == "i":
        u = v.astype(np.int64, copy=True).view(np.uint64)
        u ^= np.uint64(1 << 63)
        return u
    if kind == "f":
        f = v.astype(np.float64, copy=True)
        f[f == 0] = 0.0                          # -0.0 ties with 0.0, as in numpy's sort
        nan = np.isnan(f)
        u = f.view(np.uint64)
        neg = (u >> np.uint64(63)).astype(bool)
        np.invert(u, out=u, where=neg)
        u[~neg] |= np.uint64(1 << 63)
        u[nan] = np.uint64(0xFFFFFFFFFFFFFFFF)   # after +inf, every NaN tied
        return u
    return None


def argsort_stable(v: np.ndarray) -> np.ndarray:
    """``np.argsort(v, kind="stable")``, faster for large integer and float arrays.

    One radix pass (numpy's stable sort of 16-bit integers is a counting sort) orders the rows
    by the top 16 bits of their offset from the minimum; numpy's stable sort of the keys in that
    order (timsort) then only has to order short runs of near-equal keys, which it finds and
    merges in near-linear time.  The composition of two stable sorts by keys of which the first
    is a monotone function of the second is the stable sort by the second: the result is exactly
    numpy's, ties in row order.  About 2.5x faster on 2.5M uniform int64 keys; when one bucket
    would hold most rows (heavy skew of distinct values) the plain sort is used.
    """
    n = len(v)
    if n < _BUCKET_MIN_ROWS:
        return np.argsort(v, kind="stable")
    u = _sortable_bits(v)
    if u is None:
        return np.argsort(v, kind="stable")
    lo, hi = u.min(), u.max()
    span = int(hi) - int(lo)
    if span == 0:
        return np.arange(n, dtype=np.intp)
    shift = np.uint64(max(0, span.bit_length() - _BUCKET_BITS))
    u -= lo
    digit = (u >> shift).astype(np.uint16)
    if int(np.bincount(digit).max()) > n // 4:
        return np.argsort(u, kind="stable")
    first = np.argsort(digit, kind="stable")
    return first[np.argsort(u[first], kind="stable")]


def _local_sort(t: pa.Table, kt: pa.Table, keys) -> pa.Table:
    if t.num_rows <= 1:
        return t
    fast = _numeric_key(kt, keys)
    if fast is not None:   # timsort: the received sorted runs merge in near-linear time
        order = np.argsort(fast, kind="stable")
        if t.num_columns and t.column(0).num_chunks > 1:
            t = t.combine_chunks()   # one copy; a take from a single chunk is much faster
        return types.take(t, order)
    return types.take(t, sort_indices(kt, _sort_keys(keys, False)))


def _sample(kt: pa.Table, rank: int, want: int) -> pa.Table:
    """Up to ``want`` rows, one drawn at random from each of ``want`` equal strata."""
    n = kt.num_rows
    s = min(n, want)
    if s == 0:
        pos = np.zeros(0, dtype=np.int64)
    else:
        rng = np.random.default_rng(0x5EED + rank)
        lo = (np.arange(s, dtype=np.int64) * n) // s
        hi = (np.arange(1, s + 1, dtype=np.int64) * n) // s
        pos = lo + (rng.random(s) * (hi - lo)).astype(np.int64)
    out = kt.take(pa.array(pos))
    return out.append_column(_RANK, pa.array(np.full(s, rank, dtype=np.int32))) \
              .append_column(_ROW, pa.array(pos)) \
              .append_column(_SPLIT, pa.array(np.ones(s, dtype=np.int8)))


def _splitters(pf, keys, P) -> pa.Table:
    """P-1 splitter rows at the weighted quantiles of all samples (same on every rank)."""
    samples, weights = [], []
    for r, b in enumerate(pf.payloads):
        if b is None:   # a rank that passed None: no rows, no samples
            continue
        s = table_from_bytes(b)
        if s.num_rows:
            samples.append(s)
            weights.append(np.full(s.num_rows, pf.rows[0][r] / s.num_rows))
    allsamples = pa.concat_tables(samples)
    w = np.concatenate(weights)
    order = sort_indices(allsamples, _sort_keys(keys, True)).to_numpy()
    cum = np.cumsum(w[order])
    total = cum[-1]
    targets = np.arange(1, P) * (total / P)
    picks = np.searchsorted(cum, targets, side="left")
    picks = np.minimum(picks, len(order) - 1)
    return allsamples.take(pa.array(order[picks]))
