"""Every Arrow type pyarrow reads from Parquet or IPC, through every kernel operator, as key and
as payload, against a single-process pyarrow answer.

The references compute on plain equivalents (views as their large variants, dictionaries
decoded, float16 as float32, decimal32/64 as decimal128: written out here, independently of
``kernel.types``) and gather whole rows by a row id, so nested payloads need no pyarrow kernel.
Results must come back in the input's types.  3 thread ranks over memory:// for the matrix; the
whole-table test also runs over file:// so every type crosses a real IPC encode/decode.
"""

from __future__ import annotations

import decimal
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cylon_store import kernel as K
from kernel_helpers import run_ranks

W = 3
HOWS = ["inner", "left", "right", "outer", "semi", "anti"]
VIEWS = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}


# -- data ----------------------------------------------------------------------------------------

def scalar_column(kind: str, codes: np.ndarray, mask: np.ndarray) -> pa.Array:
    """A column of type ``kind`` whose values are a function of the integer ``codes``."""
    c = codes.astype(np.int64)
    words = [f"w{i}-" + "z" * (i % 17) for i in range(int(c.max(initial=0)) + 1)]
    strs = [None if m else words[i] for i, m in zip(c.tolist(), mask.tolist())]
    raw = [None if s is None else s.encode() for s in strs]
    ints = pa.array(c * 7 - 40, pa.int64(), mask=mask)
    if kind in ("string", "large_string", "string_view"):
        return pa.array(strs, getattr(pa, kind)())
    if kind in ("large_binary", "binary_view"):
        return pa.array(raw, getattr(pa, kind)())
    if kind == "fixed_size_binary":
        return pa.array([None if m else int(i).to_bytes(6, "little")
                         for i, m in zip(c.tolist(), mask.tolist())], pa.binary(6))
    if kind == "dict_string":
        return pa.array(strs, pa.string()).dictionary_encode()
    if kind == "dict_int":
        return ints.dictionary_encode()
    if kind == "dict_string_view":
        return pa.DictionaryArray.from_arrays(pa.array(c.astype(np.int32), mask=mask),
                                              pa.array(words, pa.string_view()))
    if kind.startswith("decimal"):
        t = {"32": pa.decimal32(9, 2), "64": pa.decimal64(18, 2), "128": pa.decimal128(30, 2),
             "256": pa.decimal256(60, 2)}[kind[7:]]
        return pa.array([None if m else decimal.Decimal(int(i) * 37 - 500).scaleb(-2)
                         for i, m in zip(c.tolist(), mask.tolist())], t)
    if kind == "date32":
        return pa.array(c.astype(np.int32) - 30, pa.int32(), mask=mask).cast(pa.date32())
    if kind == "date64":
        return pa.array((c - 30) * 86400000, pa.int64(), mask=mask).cast(pa.date64())
    if kind.startswith("time32_"):
        return pa.array(c.astype(np.int32) * 13, pa.int32(), mask=mask).cast(pa.time32(kind[7:]))
    if kind.startswith("time64_"):
        return pa.array(c * 1000003, pa.int64(), mask=mask).cast(pa.time64(kind[7:]))
    if kind.startswith("ts_tz_"):
        return pa.array(c * 10**6 + 17, pa.int64(), mask=mask).cast(
            pa.timestamp(kind[6:], tz="America/New_York"))
    if kind.startswith("ts_"):
        return pa.array(c * 10**6 - 17, pa.int64(), mask=mask).cast(pa.timestamp(kind[3:]))
    if kind.startswith("dur_"):
        return pa.array(c * 1001 - 50, pa.int64(), mask=mask).cast(pa.duration(kind[4:]))
    if kind == "bool":
        return pa.array(c % 2 == 1, pa.bool_(), mask=mask)
    if kind == "float16":
        return pa.array((c * 0.5 - 3).astype(np.float16), pa.float16(), mask=mask)
    if kind == "float32":
        return pa.array((c * 0.25 - 3).astype(np.float32), pa.float32(), mask=mask)
    if kind == "float64":
        return pa.array(c * 0.125 - 3, pa.float64(), mask=mask)
    if kind == "int8":
        return pa.array((c % 100 - 50).astype(np.int8), pa.int8(), mask=mask)
    if kind == "uint64":
        return pa.array(c.astype(np.uint64) * np.uint64(2**40), pa.uint64(), mask=mask)
    if kind == "interval":
        return pa.array([None if m else pa.MonthDayNano([int(i) % 3, int(i) % 5, int(i) * 1000])
                         for i, m in zip(c.tolist(), mask.tolist())], pa.month_day_nano_interval())
    raise ValueError(kind)


KEY_KINDS = ["string_view", "binary_view", "large_string", "large_binary", "fixed_size_binary",
             "dict_string", "dict_int", "dict_string_view", "decimal32", "decimal64",
             "decimal128", "decimal256", "date32", "date64", "time32_s", "time32_ms",
             "time64_us", "time64_ns", "ts_s", "ts_ms", "ts_us", "ts_ns", "ts_tz_s", "ts_tz_ns",
             "dur_s", "dur_ns", "bool", "float16", "float32", "float64", "int8", "uint64",
             "string"]
NESTED = ["p_null", "p_interval", "p_list", "p_large_list", "p_list_view", "p_large_list_view",
          "p_fsl", "p_struct", "p_map", "p_list_struct"]


def nested_columns(rng, n: int, nf: float) -> dict:
    def mask():
        return pa.array(rng.random(n) < nf)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 4, n))]).astype(np.int32)
    m = int(offsets[-1])
    values = pa.array(rng.integers(-5, 5, m), pa.int32(), mask=rng.random(m) < 0.2)
    lists = pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask())
    child = pa.StructArray.from_arrays(
        [pa.array(rng.integers(0, 9, m)), pa.array([f"s{i % 7}" for i in range(m)], pa.string_view())],
        names=["a", "b"])
    return {
        "p_null": pa.nulls(n),
        "p_interval": scalar_column("interval", rng.integers(0, 50, n), rng.random(n) < nf),
        "p_list": lists,
        "p_large_list": lists.cast(pa.large_list(pa.int32())),
        "p_list_view": pa.ListViewArray.from_arrays(pa.array(offsets[:-1]), pa.array(np.diff(offsets)),
                                                    values, mask=mask()),
        "p_large_list_view": pa.LargeListViewArray.from_arrays(
            pa.array(offsets[:-1].astype(np.int64)), pa.array(np.diff(offsets).astype(np.int64)),
            values, mask=mask()),
        "p_fsl": pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, 9, 2 * n), pa.int16()), 2,
                                                   mask=mask()),
        "p_struct": pa.StructArray.from_arrays(
            [pa.array(rng.integers(0, 9, n)),
             scalar_column("string_view", rng.integers(0, 20, n), rng.random(n) < nf)],
            names=["n", "s"], mask=mask()),
        "p_map": pa.MapArray.from_arrays(pa.array(offsets), pa.array([f"k{i}" for i in range(m)]),
                                         values, mask=mask()),
        "p_list_struct": pa.ListArray.from_arrays(pa.array(offsets), child, mask=mask()),
    }


def types_table(n: int, seed: int = 0, null_fraction: float = 0.3, card: int = 12,
                skew: float = 0.3, nested: bool = True, kinds=KEY_KINDS) -> pa.Table:
    """``rid`` (row id), ``k`` (skewed int64 key with nulls), a column of every scalar kind
    (20-50% nulls) and, with ``nested``, every payload-only type."""
    rng = np.random.default_rng(seed)
    key = rng.integers(0, card, n)
    key[rng.random(n) < skew] = 3
    cols = {"rid": pa.array(np.arange(n, dtype=np.int64)),
            "k": pa.array(key, pa.int64(), mask=rng.random(n) < 0.1)}
    for i, kind in enumerate(kinds):
        nf = null_fraction if i % 2 else max(0.2, null_fraction - 0.1) + 0.2
        cols[kind] = scalar_column(kind, rng.integers(0, card, n), rng.random(n) < nf)
    if nested:
        cols.update(nested_columns(rng, n, null_fraction))
    return pa.table(cols)


def split(table: pa.Table, seed: int) -> list[pa.Table]:
    """Rank parts in row order, rank 1 empty (rank 0's part a sliced, chunked table)."""
    n = table.num_rows
    cut = int(np.random.default_rng(seed).integers(n // 4, 3 * n // 4 + 1))
    first = pa.concat_tables([table.slice(0, cut // 2), table.slice(cut // 2, cut - cut // 2)])
    return [first, table.slice(cut, 0), table.slice(cut)][:W]


def on_ranks(fn, url: str, *tables):
    """``fn(comm, part_0, part_1, ...)`` on W ranks; each table split with ``split``."""
    parts = [split(t, seed=i) for i, t in enumerate(tables)]
    return run_ranks(lambda comm, ps: fn(comm, *[p[comm.rank] for p in ps]), W, url, parts)


def memory_url() -> str:
    return f"memory://t-{uuid.uuid4().hex[:12]}"


# -- the single-process reference, on plain equivalents ------------------------------------

def plain_type(t: pa.DataType, sortable: bool = False) -> pa.DataType:
    """A type pyarrow computes with, holding the same values (views as large variants, also
    nested; with ``sortable``, dictionaries decoded, float16/decimal32/64 widened)."""
    if t in VIEWS:
        return VIEWS[t]
    if pa.types.is_dictionary(t):
        return plain_type(t.value_type, True) if sortable else t
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(plain_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(plain_type(t.value_type)))
    if sortable and t == pa.float16():
        return pa.float32()
    if sortable and isinstance(t, (pa.Decimal32Type, pa.Decimal64Type)):
        return pa.decimal128(t.precision, t.scale)
    return t


def plain(col, sortable: bool = False):
    t = plain_type(col.type, sortable)
    if t == col.type:
        return col
    if pa.types.is_dictionary(col.type):
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        col = col.dictionary.cast(plain_type(col.type.value_type)).take(col.indices)
    return col.cast(t)


def plain_table(t: pa.Table, sortable: bool = False) -> pa.Table:
    return pa.Table.from_arrays([plain(c, sortable) for c in t.columns], names=t.column_names)


def back(col, t: pa.DataType):
    """A plain column in type ``t`` again."""
    if col.type == t:
        return col
    if pa.types.is_dictionary(t):
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        return back(col, t.value_type).dictionary_encode().cast(t)
    return col.cast(t)


def gather(table: pa.Table, ids) -> pa.Table:
    """Rows ``ids`` (nulls give null rows) of ``table``, in its own types."""
    p = plain_table(table)
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return pa.Table.from_arrays([back(c.take(ids), t) for c, t in zip(p.columns, table.schema.types)],
                                names=table.column_names)


def order_by(table: pa.Table, keys) -> pa.Table:
    """Rows sorted by ``keys`` [(name, order)] on their plain sortable values (stable)."""
    kt = pa.table({f"k{i}": plain(table.column(n), True) for i, (n, _) in enumerate(keys)})
    idx = pc.sort_indices(kt, sort_keys=[(f"k{i}", o) for i, (_, o) in enumerate(keys)])
    return gather(table, idx)


def assert_equal(got: pa.Table, expected: pa.Table, by=None):
    """Same schema (types included) and rows; in order unless ``by`` names row-identifying
    columns to sort both by first."""
    assert got.schema.equals(expected.schema, check_metadata=False), (got.schema, expected.schema)
    if by is not None:
        got, expected = order_by(got, [(b, "ascending") for b in by]), order_by(expected, [(b, "ascending") for b in by])
    assert got.num_rows == expected.num_rows
    for name in got.column_names:
        a, b = got.column(name), expected.column(name)
        if pa.types.is_dictionary(a.type):
            a, b = plain(a, True), plain(b, True)
        assert a.equals(b), f"{name}:\n{a.to_pylist()[:12]}\n{b.to_pylist()[:12]}"


def ref_join(left, right, lk, rk, how):
    """Kernel join semantics on row ids (pyarrow), whole rows gathered afterwards."""
    li = pa.table({"__k": plain(left.column(lk), True), "__l": left.column("rid")})
    ri = pa.table({"__k2": plain(right.column(rk), True), "__r": right.column("rid")})
    j = li.join(ri, "__k", right_keys="__k2", join_type={
        "inner": "inner", "left": "left outer", "right": "right outer", "outer": "full outer",
        "semi": "left semi", "anti": "left anti"}[how], coalesce_keys=False)
    lrows = gather(left, pc.index_in(j.column("__l"), left.column("rid")))
    if how in ("semi", "anti"):
        return lrows
    rnames = [n for n in right.column_names if not (n == rk and lk == rk)]
    rrows = gather(right.select(rnames), pc.index_in(j.column("__r"), right.column("rid")))
    if lk == rk and how in ("right", "outer"):
        rk_full = gather(right.select([rk]), pc.index_in(j.column("__r"), right.column("rid")))
        i = lrows.schema.get_field_index(lk)
        merged = pc.coalesce(plain(lrows.column(i), True), plain(rk_full.column(0), True))
        lrows = lrows.set_column(i, lk, back(merged, left.schema.field(lk).type))
    out = lrows
    for n in rrows.column_names:
        out = out.append_column(n + ("_right" if n in left.column_names else ""), rrows.column(n))
    return out


def ref_first_rows(table: pa.Table, cols, keep="first") -> pa.Table:
    g = plain_table(table.select(cols)).append_column("__r", table.column("rid")) \
        .group_by(cols, use_threads=False).aggregate([("__r", "min" if keep == "first" else "max")])
    ids = g.column(1).take(pc.sort_indices(g.column(1)))   # in row order
    return gather(table, pc.index_in(ids, table.column("rid")))


# -- payload of every type -----------------------------------------------------------------

def _payload_ops(comm, t, r, how_list):
    out = {"shuffle": K.shuffle(comm, t, "k"), "repartition": K.repartition(comm, t),
           "sort": K.sort(comm, t, [("k", "descending"), ("rid", "ascending")]),
           "unique": K.unique(comm, t, on="k", keep="last")}
    for how in how_list:
        out[f"join-{how}"] = K.join(comm, t, r, on="k", how=how, broadcast=False)
    out["join-bcast"] = K.join(comm, t, r, on="k", how="left", broadcast=True)
    aggs = _payload_aggs(t)
    out["groupby-pre"] = K.groupby(comm, t, "k", aggs, pre_aggregate=True)
    out["groupby-rows"] = K.groupby(comm, t, "k", aggs, pre_aggregate=False)
    return out


def _payload_aggs(t: pa.Table):
    """first/last/count of every column, min/max of every orderable one, count_distinct of every
    scalar one."""
    scalar = [c for c in t.column_names if c not in ("k", "rid")]
    aggs = [(c, f) for c in scalar for f in ("first", "last", "count")]
    aggs += [(c, f) for c in scalar if c not in NESTED or c == "p_null" for f in ("min", "max")]
    aggs += [(c, "count_distinct") for c in scalar if c not in NESTED]
    return aggs


def _ref_groupby(t: pa.Table, aggs) -> pa.Table:
    """Single-process answer: min/max/count/count_distinct by pyarrow on plain sortable
    values; first/last as the first/last valid row of the group."""
    p = plain_table(t, True)
    keys = p.group_by("k", use_threads=False).aggregate([]).column("k")
    cols, names = [keys], ["k"]
    for c, f in aggs:
        col = t.column(c)
        if f in ("first", "last"):
            rid = pa.array(t.column("rid").to_numpy(), mask=col.is_null().to_numpy(zero_copy_only=False))
            g = pa.table({"k": p.column("k"), "r": rid}).group_by("k", use_threads=False) \
                .aggregate([("r", "min" if f == "first" else "max")])
            ids = g.column(1).take(pc.index_in(keys, g.column(0)))
            val = gather(t.select([c]), pc.index_in(ids, t.column("rid"))).column(0)
        else:
            v = p.column(c)
            if pa.types.is_duration(v.type) and f in ("min", "max"):   # pyarrow: no kernel
                v = v.cast(pa.int64())
            g = pa.table({"k": p.column("k"), c: v}).group_by("k", use_threads=False) \
                .aggregate([(c, f)])
            val = g.column(1).take(pc.index_in(keys, g.column(0)))
            if f in ("min", "max"):
                val = back(val, col.type)
        cols.append(val)
        names.append(f"{c}_{f}")
    return pa.Table.from_arrays(cols, names=names)


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_every_type_as_payload(backend, tmp_path):
    url = memory_url() if backend == "memory" else f"file://{tmp_path}/s?fsync=false"
    t = types_table(240, seed=1)
    r = types_table(90, seed=2, nested=False, kinds=["string_view", "dict_string", "decimal32"])
    r = r.rename_columns([n if n in ("k", "rid") else "r_" + n for n in r.column_names])
    hows = HOWS if backend == "memory" else ["outer"]
    res = on_ranks(lambda comm, a, b: _payload_ops(comm, a, b, hows), url, t, r)
    got = {op: pa.concat_tables([x[op] for x in res]) for op in res[0]}

    assert_equal(got["repartition"], t)
    assert [x["repartition"].num_rows for x in res] == [80, 80, 80]
    assert_equal(got["sort"], order_by(t, [("k", "descending"), ("rid", "ascending")]))
    assert_equal(got["shuffle"], t, by=["rid"])
    assert_equal(got["unique"], ref_first_rows(t, ["k"], keep="last"), by=["rid"])
    for how in hows:
        assert_equal(got[f"join-{how}"], ref_join(t, r, "k", "k", how), by=["rid", "rid_right"]
                     if how not in ("semi", "anti") else ["rid"])
    assert_equal(got["join-bcast"], ref_join(t, r, "k", "k", "left"), by=["rid", "rid_right"])
    expected = _ref_groupby(t, _payload_aggs(t))
    for op in ("groupby-pre", "groupby-rows"):
        assert_equal(got[op], expected, by=["k"])


# -- every key type --------------------------------------------------------------------------

def _key_ops(comm, t, r, kind):
    return {
        "shuffle": K.shuffle(comm, t, kind),
        "join-inner": K.join(comm, t, r, on=kind, how="inner", broadcast=False),
        "join-outer": K.join(comm, t, r, on=kind, how="outer", broadcast=False),
        "join-bcast": K.join(comm, t, r, on=kind, how="semi", broadcast=True),
        "groupby": K.groupby(comm, t, kind, [("string_view", "first"), ([], "count_all"),
                                             ("string_view", "max")]),
        "groupby-multi": K.groupby(comm, t, [kind, "k"], [("rid", "min")], pre_aggregate=False),
        "sort": K.sort(comm, t, [(kind, "descending"), ("rid", "ascending")],
                       null_placement="at_start"),
        "sort-asc": K.sort(comm, t, kind, samples_per_rank=2),
        "unique": K.unique(comm, t, on=[kind]),
        "union": K.union(comm, t.select([kind, "k"]), r.select([kind, "k"])),
        "intersect": K.intersect(comm, t.select([kind, "k"]), r.select([kind, "k"])),
        "difference": K.difference(comm, t.select([kind, "k"]), r.select([kind, "k"])),
    }


def _ref_setop(a: pa.Table, b: pa.Table, op: str) -> pa.Table:
    both = pa.concat_tables([a.append_column("side", pa.array(np.zeros(a.num_rows, np.int8))),
                             b.append_column("side", pa.array(np.ones(b.num_rows, np.int8)))])
    both = both.append_column("rid", pa.array(np.arange(both.num_rows)))
    cols = a.column_names
    g = plain_table(both, True).group_by(cols, use_threads=False).aggregate(
        [("side", "min"), ("side", "max"), ("rid", "min")])
    smin, smax = g.column("side_min").to_numpy(), g.column("side_max").to_numpy()
    keep = {"union": np.ones(len(smin), bool), "intersect": (smin == 0) & (smax == 1),
            "difference": smax == 0}[op]
    rows = np.sort(g.column("rid_min").to_numpy()[keep])
    return gather(both.select(cols), pa.array(rows))


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_every_key_type(kind):
    t = types_table(150, seed=3, nested=False, kinds=[kind, "string_view"], card=9)
    r = types_table(60, seed=4, nested=False, kinds=[kind], card=9, skew=0.0)
    r = r.rename_columns(["rid", "k", kind]).append_column("tag", pa.array(np.arange(60) % 5))
    r = r.set_column(1, "k", pc.cast(pc.modulo(r.column("rid"), 3), pa.int64()))
    t = t.set_column(1, "k", pc.cast(pc.modulo(t.column("rid"), 3), pa.int64()))
    res = on_ranks(lambda comm, a, b: _key_ops(comm, a, b, kind), memory_url(), t, r)
    got = {op: pa.concat_tables([x[op] for x in res]) for op in res[0]}

    assert_equal(got["shuffle"], t, by=["rid"])
    for part in res:   # equal keys meet on one rank
        keys = [set(plain(p["shuffle"].column(kind), True).to_pylist()) - {None} for p in [part]]
        others = set().union(*[set(plain(q["shuffle"].column(kind), True).to_pylist())
                               for q in res if q is not part]) - {None}
        assert not (keys[0] & others)
    for how in ("inner", "outer"):
        assert_equal(got[f"join-{how}"], ref_join(t, r, kind, kind, how), by=["rid", "rid_right"])
    assert_equal(got["join-bcast"], ref_join(t, r, kind, kind, "semi"), by=["rid"])

    p = plain_table(t, True)
    exp_keys = p.group_by(kind, use_threads=False).aggregate([]).column(0)
    g = got["groupby"]
    assert g.schema.field(kind).type == t.schema.field(kind).type
    assert g.schema.field("string_view_first").type == pa.string_view()
    assert g.num_rows == len(exp_keys)
    counts = dict(zip(*[c.to_pylist() for c in p.group_by(kind, use_threads=False)
                        .aggregate([([], "count_all")]).columns]))
    assert dict(zip(plain(g.column(kind), True).to_pylist(),
                    g.column("count_all").to_pylist())) == counts
    first = p.append_column("__valid", pc.is_valid(p.column("string_view"))).filter(
        pc.field("__valid")).group_by(kind, use_threads=False).aggregate([("string_view", "first"),
                                                                          ("string_view", "max")])
    exp_first = dict(zip(first.column(0).to_pylist(), first.column(1).to_pylist()))
    exp_max = dict(zip(first.column(0).to_pylist(), first.column(2).to_pylist()))
    for k, f, m in zip(plain(g.column(kind), True).to_pylist(), g.column("string_view_first").to_pylist(),
                       g.column("string_view_max").to_pylist()):
        assert exp_first.get(k) == f and exp_max.get(k) == m, (k, f, m)
    multi = p.group_by([kind, "k"], use_threads=False).aggregate([("rid", "min")])
    gm = got["groupby-multi"]
    assert gm.schema.field(kind).type == t.schema.field(kind).type
    assert sorted(multi.column("rid_min").to_pylist()) == sorted(gm.column("rid_min").to_pylist())

    assert_equal(got["sort"], _ref_sort(t, kind))
    assert_equal(got["sort-asc"], _ref_sort(t, kind, "ascending", "at_end"))
    assert_equal(got["unique"], ref_first_rows(t, [kind]), by=["rid"])
    for op in ("union", "intersect", "difference"):
        exp = _ref_setop(t.select([kind, "k"]), r.select([kind, "k"]), op)
        assert_equal(got[op], exp, by=[kind, "k"])


def _ref_sort(t, kind, order="descending", placement="at_start"):
    kt = pa.table({"a": plain(t.column(kind), True), "b": t.column("rid")})
    idx = pc.sort_indices(kt, sort_keys=[("a", order, placement), ("b", "ascending", "at_end")])
    return gather(t, idx)


# -- keys of different physical types for the same values ------------------------------------

def large_keys(t: pa.Table) -> pa.Table:
    return t.set_column(2, "s", plain(t.column("s"), True).cast(pa.large_string()))


@pytest.mark.parametrize("right_kind", ["string", "large_string", "dict_string", "dict_string_view"])
def test_join_string_key_across_types(right_kind):
    t = types_table(120, seed=5, nested=False, kinds=["string_view"], card=10)
    r = types_table(70, seed=6, nested=False, kinds=[right_kind], card=10, skew=0.0)
    r = r.rename_columns(["rid_r", "k_r", "s"])
    t = t.rename_columns(["rid", "k", "s"])

    def fn(comm, a, b):
        return [K.join(comm, a, b, on="s", how=how, broadcast=False) for how in ("inner", "outer")] \
            + [K.shuffle(comm, a, "s"), K.shuffle(comm, b, "s")]
    res = on_ranks(fn, memory_url(), t, r)
    for i, how in enumerate(("inner", "outer")):
        got = pa.concat_tables([x[i] for x in res])
        ref = large_keys(t).join(large_keys(r), "s", join_type={
            "inner": "inner", "outer": "full outer"}[how])
        assert got.num_rows == ref.num_rows > 0
        pairs = [sorted(zip(x.column("rid").to_pylist(), x.column("rid_r").to_pylist()), key=str)
                 for x in (got, ref)]
        assert pairs[0] == pairs[1]
        # the keys' common type: string_view if both hold string_view values
        assert got.schema.field("s").type == (pa.string_view() if right_kind == "dict_string_view"
                                              else pa.large_string())
        assert sorted(got.column("s").to_pylist(), key=str) == sorted(ref.column("s").to_pylist(), key=str)
    # equal values of the two physical types go to the same rank
    seen = [[set(plain(x[j].column("s"), True).cast(pa.large_string()).to_pylist()) - {None}
             for j in (2, 3)] for x in res]
    for rank in range(W):
        for other in range(W):
            if other != rank:
                assert not (seen[rank][0] & seen[other][1])


def test_nested_keys_are_a_clear_key_type_error():
    t = types_table(20, seed=7, kinds=["string"])

    def fn(comm, a):
        out = []
        for col in ("p_list", "p_map", "p_list_view", "p_interval"):
            for op in (lambda: K.shuffle(comm, a, col), lambda: K.groupby(comm, a, col, [([], "count_all")]),
                       lambda: K.sort(comm, a, col), lambda: K.unique(comm, a, on=col)):
                try:
                    op()
                    out.append(None)
                except K.KeyTypeError as exc:
                    out.append(type(exc).__name__)
        return out
    res = on_ranks(fn, memory_url(), t)
    assert all(x == "KeyTypeError" for per_rank in res for x in per_rank), res[0]


def test_dataframe_with_view_types():
    import cylon_store as cs
    t = types_table(90, seed=8, kinds=["string_view", "binary_view", "dict_string"])

    def fn(comm, a):
        df = cs.DataFrame(comm, a)
        return (df.sort_values(["string_view", "rid"]).to_table(),
                df.drop_duplicates(subset=["binary_view"]).to_table(),
                df.groupby("string_view").agg({"binary_view": ["min", "first"]}).to_table(),
                df.merge(df, on="string_view", suffixes=("", "_y")).to_table())
    res = on_ranks(fn, memory_url(), t)
    assert_equal(pa.concat_tables([x[0] for x in res]),
                 gather(t, pc.sort_indices(plain_table(t.select(["string_view", "rid"]), True),
                                           sort_keys=[("string_view", "ascending"), ("rid", "ascending")])))
    assert_equal(pa.concat_tables([x[1] for x in res]), ref_first_rows(t, ["binary_view"]), by=["rid"])
    g = pa.concat_tables([x[2] for x in res])
    assert g.schema.types == [pa.string_view(), pa.binary_view(), pa.binary_view()]
    j = pa.concat_tables([x[3] for x in res])
    assert j.schema.field("p_list_struct_y").type == t.schema.field("p_list_struct").type
    assert j.num_rows == plain_table(t.select(["string_view", "rid"])).join(
        plain_table(t.select(["string_view", "rid"])).rename_columns(["string_view", "r2"]),
        "string_view", join_type="inner").num_rows
