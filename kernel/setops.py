"""Distinct rows and set operations with Cylon's set semantics (results are duplicate-free;
nulls equal nulls): local de-duplication, hash shuffle on all (or the ``on``) columns, then a
local group-by that keeps the first occurrence in (rank, row) order.

union, intersect and difference tag each row with its side and move both sides in a single
exchange; a row is kept by how many sides it was seen on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from . import partition, types
from ._common import KernelError, KeyTypeError, agreed_exchange, check_hashable, column_list

__all__ = ["unique", "union", "intersect", "difference", "local_unique"]

_ROW = "__cylon_row"
_SIDE = "__cylon_side"


def _check_groupable(schema: pa.Schema, cols, op: str) -> None:
    check_hashable(schema, cols, op)
    try:
        schema.empty_table().group_by(list(cols), use_threads=False).aggregate([])
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise KeyTypeError(f"{op}: these columns cannot be compared for equality: {exc}") from exc


def _first_rows(table: pa.Table, cols: Sequence[str], keep: str = "first",
                extra: Sequence[tuple[str, pa.ChunkedArray]] = ()) -> pa.Table:
    """Row numbers of the first (or last) row of each distinct value of ``cols``, ascending,
    with any ``extra`` aggregations' columns alongside."""
    n = table.num_rows
    keyed = types.unify_dictionaries(table.select(list(cols))).append_column(_ROW, pa.array(np.arange(n, dtype=np.int64)))
    for name, col in extra:
        keyed = keyed.append_column(name, col)
    func = "min" if keep == "first" else "max"
    aggs = [(_ROW, func)] + [a for name, _ in extra for a in ((name, "min"), (name, "max"))]
    return keyed.group_by(list(cols), use_threads=True).aggregate(aggs)


def local_unique(table: pa.Table, cols, keep: str = "first") -> pa.Table:
    if table.num_rows <= 1:
        return table
    g = _first_rows(table, cols, keep)
    if g.num_rows == table.num_rows:
        return table
    rows = np.sort(g.column(f"{_ROW}_{'min' if keep == 'first' else 'max'}").to_numpy())
    return types.take(table, pa.array(rows))


def unique(comm, table, on=None, keep: str = "first") -> pa.Table:
    """Distinct rows of the distributed table (by the ``on`` columns, default all), keeping the
    first (or last) occurrence in (rank, row) order.  Each distinct value lives on one rank."""
    args = (on if isinstance(on, str) or on is None else tuple(on), keep)

    def prepare(tables):
        t = tables[0]
        if keep not in ("first", "last"):
            raise KernelError(f"unique: keep must be 'first' or 'last', got {keep!r}")
        cols = t.column_names if on is None else column_list(on, t.schema, "unique")
        if not cols:
            raise KernelError("unique: the table has no columns")
        _check_groupable(t.schema, cols, "unique")
        return (cols, local_unique(t, cols, keep)), None

    P = comm.world_size
    ag = agreed_exchange(comm, "unique", [("table", table)], args, prepare,
                         lambda local, tables: [partition.hash_partition(local[1], local[0], P)
                                                if P > 1 else [local[1]]])
    if P == 1:
        return ag.received[0]
    return local_unique(ag.received[0], ag.local[0], keep)


def _unify(a: pa.Table, b: pa.Table, op: str) -> tuple[pa.Table, pa.Table]:
    if a.column_names != b.column_names:
        raise KernelError(f"{op}: both tables need the same columns in the same order; got "
                          f"{a.column_names} and {b.column_names}")
    if a.schema.equals(b.schema, check_metadata=False):
        return a, b
    try:
        schema = pa.unify_schemas([a.schema, b.schema], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise KeyTypeError(f"{op}: column types do not match: {exc}") from exc
    schema = schema.remove_metadata()
    try:
        return a.cast(schema), b.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise KeyTypeError(f"{op}: cannot bring both tables to {schema}: {exc}") from exc


def _setop(comm, op: str, a, b, keep_group) -> pa.Table:
    def prepare(tables):
        A, B = _unify(tables[0], tables[1], op)
        cols = A.column_names
        if not cols:
            raise KernelError(f"{op}: the tables have no columns")
        _check_groupable(A.schema, cols, op)
        tagged = pa.concat_tables([
            A.append_column(_SIDE, pa.array(np.zeros(A.num_rows, dtype=np.int8))),
            B.append_column(_SIDE, pa.array(np.ones(B.num_rows, dtype=np.int8)))])
        # Distinct per side before anything moves.
        return (cols, local_unique(tagged, cols + [_SIDE])), None

    P = comm.world_size
    ag = agreed_exchange(comm, op, [("a", a), ("b", b)], None, prepare,
                         lambda local, tables: [partition.hash_partition(local[1], local[0], P)
                                                if P > 1 else [local[1]]])
    cols, tagged = ag.local[0], ag.received[0]
    if tagged.num_rows == 0:
        return tagged.drop_columns([_SIDE])
    side = tagged.column(_SIDE)
    g = _first_rows(tagged.drop_columns([_SIDE]), cols, "first", extra=[(_SIDE, side)])
    smin = g.column(f"{_SIDE}_min").to_numpy()
    smax = g.column(f"{_SIDE}_max").to_numpy()
    rows = g.column(f"{_ROW}_min").to_numpy()
    rows = np.sort(rows[keep_group(smin, smax)])
    return types.take(tagged.drop_columns([_SIDE]), pa.array(rows))


def union(comm, a, b) -> pa.Table:
    """Distinct rows that are in ``a`` or ``b`` (column types unified)."""
    return _setop(comm, "union", a, b, lambda smin, smax: np.ones(len(smin), dtype=bool))


def intersect(comm, a, b) -> pa.Table:
    """Distinct rows that are in both ``a`` and ``b``."""
    return _setop(comm, "intersect", a, b, lambda smin, smax: (smin == 0) & (smax == 1))


def difference(comm, a, b) -> pa.Table:
    """Distinct rows of ``a`` that are not in ``b`` (Cylon's subtract)."""
    return _setop(comm, "difference", a, b, lambda smin, smax: smax == 0)
