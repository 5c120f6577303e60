"""Arrow types that pyarrow's compute kernels lack, handled at the operators' boundaries.

pyarrow reads types from Parquet and IPC that some of its own kernels do not take: ``take`` and
``filter`` have no kernel for ``string_view``/``binary_view`` (also inside structs and lists),
Acero's hash join takes neither as key nor as payload, sorting has no kernel for the views,
dictionaries, ``float16`` or ``decimal32``/``decimal64``, and the hash aggregations lack
min/max/first/last for several types.  The operators compute on an *equivalent* type (a view as
its large variant, a dictionary as its values, ``float16`` as ``float32``, ``decimal32/64`` as
``decimal128``, a duration as ``int64``: every value and its order kept exactly) and give the
result back in the input's type.  Types that need nothing are never copied.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

__all__ = ["compute_type", "to_compute", "restore", "restore_array", "take", "take_column",
           "filter_table", "cast", "unify_dictionaries", "decode", "sort_key", "sort_type", "join_type", "to_join",
           "prepare_aggregate"]

_VIEWS = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}


def _map_type(t: pa.DataType, leaf: Callable[[pa.DataType], pa.DataType]) -> pa.DataType:
    """``t`` with ``leaf`` applied to every non-nested type inside it (dictionaries kept: take
    and filter only touch their indices)."""
    if pa.types.is_struct(t):
        return pa.struct([_map_field(t.field(i), leaf) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(_map_field(t.key_field, leaf), _map_field(t.item_field, leaf),
                       keys_sorted=t.keys_sorted)
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_map_field(t.value_field, leaf), t.list_size)
    if pa.types.is_large_list(t):
        return pa.large_list(_map_field(t.value_field, leaf))
    if pa.types.is_list(t):
        return pa.list_(_map_field(t.value_field, leaf))
    if pa.types.is_large_list_view(t):
        return pa.large_list_view(_map_field(t.value_field, leaf))
    if pa.types.is_list_view(t):
        return pa.list_view(_map_field(t.value_field, leaf))
    if pa.types.is_dictionary(t):
        return t
    return leaf(t)


def _map_field(f: pa.Field, leaf) -> pa.Field:
    return f.with_type(_map_type(f.type, leaf))


@lru_cache(maxsize=None)
def compute_type(t: pa.DataType) -> pa.DataType:
    """The type ``take``/``filter``/concatenation work on: views become their large variants,
    also nested (the values and their lengths are kept; the layout is rebuilt)."""
    return _map_type(t, lambda x: _VIEWS.get(x, x))


def _needs(schema: pa.Schema) -> bool:
    return any(compute_type(t) != t for t in schema.types)


def to_compute(table: pa.Table) -> pa.Table:
    """``table`` with every column in its ``compute_type`` (the same table if none differs)."""
    if not _needs(table.schema):
        return table
    return _cast_columns(table, [compute_type(t) for t in table.schema.types])


def _cast_columns(table: pa.Table, types: Sequence[pa.DataType]) -> pa.Table:
    cols = [c if c.type == t else c.cast(t) for c, t in zip(table.columns, types)]
    return pa.Table.from_arrays(cols, schema=pa.schema(
        [f.with_type(t) for f, t in zip(table.schema, types)], metadata=table.schema.metadata))


def restore(table: pa.Table, schema) -> pa.Table:
    """``table`` (columns in ``schema``'s order, possibly of equivalent types) in the types of
    ``schema`` (a Schema or a list of types)."""
    want = list(schema.types if isinstance(schema, pa.Schema) else schema)
    if table.schema.types == want:
        return table
    cols = [restore_array(c, t) for c, t in zip(table.columns, want)]
    return pa.Table.from_arrays(cols, schema=pa.schema(
        [f.with_type(t) for f, t in zip(table.schema, want)], metadata=table.schema.metadata))


def restore_array(col, t: pa.DataType):
    """A column computed on the equivalent type of ``t``, back in ``t``."""
    if col.type == t:
        return col
    if pa.types.is_dictionary(t):
        if pa.types.is_dictionary(col.type) and col.type.index_type == t.index_type:
            # Only the dictionary's values change type: the indices are kept as they are.
            def redo(c):
                return pa.DictionaryArray.from_arrays(c.indices,
                                                      restore_array(c.dictionary, t.value_type),
                                                      ordered=t.ordered)
            if isinstance(col, pa.ChunkedArray):
                return pa.chunked_array([redo(c) for c in col.chunks], t)
            return redo(col)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        enc = restore_array(col, t.value_type).dictionary_encode()
        return enc.cast(t) if enc.type != t else enc
    return col.cast(t)


def take(table: pa.Table, indices) -> pa.Table:
    """``table.take(indices)`` for tables of any type."""
    if not _needs(table.schema):
        return table.take(indices)
    return restore(to_compute(table).take(indices), table.schema)


def take_column(col, indices):
    """``col.take(indices)`` for columns of any type."""
    t = compute_type(col.type)
    if t == col.type:
        return col.take(indices)
    return col.cast(t).take(indices).cast(col.type)


def filter_table(table: pa.Table, mask) -> pa.Table:
    """``table.filter(mask)`` for tables of any type."""
    if not _needs(table.schema):
        return table.filter(mask)
    return restore(to_compute(table).filter(mask), table.schema)


def cast(col, t: pa.DataType):
    """``col.cast(t)``, also from a dictionary of views (decoded first: pyarrow has no cast out
    of those)."""
    if pa.types.is_dictionary(col.type) and not pa.types.is_dictionary(t):
        col = decode(col)
    return col if col.type == t else col.cast(t)


def unify_dictionaries(table: pa.Table) -> pa.Table:
    """``table`` with one dictionary per dictionary column (pyarrow's group_by and join refuse
    chunks with different dictionaries, as a table gathered from several ranks has)."""
    if not any(pa.types.is_dictionary(c.type) and c.num_chunks > 1 for c in table.columns):
        return table
    return table.unify_dictionaries()


# -- order- and equality-preserving equivalents ------------------------------------------------

def _decimal128(t: pa.DataType) -> pa.DataType:
    return pa.decimal128(t.precision, t.scale)


def _sortable_leaf(t: pa.DataType) -> pa.DataType:
    if t in _VIEWS:
        return _VIEWS[t]
    if t == pa.float16():
        return pa.float32()
    if isinstance(t, (pa.Decimal32Type, pa.Decimal64Type)):
        return _decimal128(t)
    return t


@lru_cache(maxsize=None)
def sort_type(t: pa.DataType) -> pa.DataType:
    """A type pyarrow sorts, with the same order of the same values as ``t``."""
    if pa.types.is_dictionary(t):
        return sort_type(t.value_type)
    return _sortable_leaf(compute_type(t))


def decode(col):
    """A dictionary column as its values (also when the values are views, which pyarrow
    cannot cast out of a dictionary); other columns as they are."""
    if not pa.types.is_dictionary(col.type):
        return col
    vt = compute_type(col.type.value_type)
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = [c.dictionary.cast(vt).take(c.indices) if c.dictionary.type != vt
           else c.dictionary.take(c.indices) for c in chunks]
    if isinstance(col, pa.ChunkedArray):
        return pa.chunked_array(out, vt)
    return out[0]


def sort_key(col):
    """``col`` as a column pyarrow can sort, in the same order (dictionaries by their values)."""
    col = decode(col)
    t = sort_type(col.type)
    return col if t == col.type else col.cast(t)


@lru_cache(maxsize=None)
def join_type(t: pa.DataType) -> pa.DataType:
    """The type Acero's hash join takes for a key or payload column of type ``t``."""
    if pa.types.is_dictionary(t):
        vt = join_type(t.value_type)
        return t if vt == t.value_type else pa.dictionary(t.index_type, vt)
    return compute_type(t)


def to_join(table: pa.Table) -> pa.Table:
    """``table`` with every column in its ``join_type`` (the same table if none differs)."""
    want = [join_type(t) for t in table.schema.types]
    return table if want == table.schema.types else _cast_columns(table, want)


# -- hash aggregations -------------------------------------------------------------------------

_ORDER_FUNCS = ("min", "max")
_POSITION_FUNCS = ("first", "last")
_SUPPORTED: dict[tuple[pa.DataType, str], bool] = {}


def _supported(t: pa.DataType, func: str) -> bool:
    """Whether pyarrow's hash aggregation ``func`` takes ``t`` (tried once on no rows)."""
    key = (t, func)
    ok = _SUPPORTED.get(key)
    if ok is None:
        try:
            pa.schema([("g", pa.int8()), ("v", t)]).empty_table() \
              .group_by("g", use_threads=False).aggregate([("v", func)])
            ok = True
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
            ok = False
        _SUPPORTED[key] = ok
    return ok


def _order_type(t: pa.DataType) -> pa.DataType:
    """A type with the same order as ``t`` (which min/max may take)."""
    s = sort_type(t)
    if pa.types.is_duration(s):
        s = pa.int64()
    return s


def prepare_aggregate(table: pa.Table, specs: Sequence[tuple[Any, ...]]
                      ) -> tuple[pa.Table, list[tuple[Any, ...]], Callable[[pa.Table, Sequence[str]], pa.Table]]:
    """Make pyarrow's hash aggregation ``specs`` [(out name, target, func[, options])] work for
    targets of types it lacks a kernel for; returns (table, specs, fix) where
    ``fix(result, names)`` turns the aggregated columns (named ``names``, in spec order, after
    the keys) back into the types pyarrow would give.

    min/max compute on an order-preserving equivalent (``_order_type``) and cast back;
    first/last aggregate the row number of each non-null value and gather the value (any type);
    distinct/count_distinct compute on the values of dictionaries and views' large variants.
    Dictionaries never reach pyarrow's hash "distinct" (it aborts the process on them).
    """
    table = unify_dictionaries(table)
    extra: dict[str, Any] = {}
    out_specs: list[tuple[Any, ...]] = []
    fixes: list[tuple[int, str, Any]] = []   # (spec index, how, what)
    for i, spec in enumerate(specs):
        name, target, func = spec[0], spec[1], spec[2]
        rest = tuple(spec[3:])
        if not isinstance(target, str) or func in ("count", "count_all", "list"):
            out_specs.append(spec)
            continue
        col = table.column(target)
        t = col.type
        dict_distinct = pa.types.is_dictionary(t) and func in ("distinct", "count_distinct")
        if not dict_distinct and _supported(t, func):
            out_specs.append(spec)
            continue
        tmp = f"__cylon_agg{i}"
        if func in _POSITION_FUNCS:
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            extra[tmp] = pa.array(np.arange(len(col), dtype=np.int64), mask=~valid)
            fixes.append((i, "take", target))
        elif func in _ORDER_FUNCS and _supported(ot := _order_type(t), func):
            extra[tmp] = sort_key(col) if pa.types.is_dictionary(t) else col
            extra[tmp] = extra[tmp].cast(ot) if extra[tmp].type != ot else extra[tmp]
            fixes.append((i, "cast", t))
        elif func in ("distinct", "count_distinct"):
            v = decode(col)
            ct = compute_type(v.type)
            extra[tmp] = v.cast(ct) if ct != v.type else v
        else:
            out_specs.append(spec)   # pyarrow raises its own error for it
            continue
        out_specs.append((name, tmp, func) + rest)
    if not extra:
        return table, list(specs), lambda res, names: res
    for n, c in extra.items():
        table = table.append_column(n, c)
    source = table

    def fix(res: pa.Table, names: Sequence[str]) -> pa.Table:
        for i, how, what in fixes:
            j = res.schema.get_field_index(names[i])
            col = res.column(j)
            if how == "take":
                col = take_column(source.column(what), col)
            else:
                col = restore_array(col, what)
            res = res.set_column(j, names[i], col)
        return res

    return table, out_specs, fix
