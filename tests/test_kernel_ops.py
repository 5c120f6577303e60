"""Every kernel operator on every backend with 1-4 ranks, against a single-process result:
random data with nulls, empty inputs, all rows on one rank, heavy skew, all key types,
multi-column keys."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cylon_store import kernel as K
from cylon_store.kernel.join import local_join
from cylon_store.kernel.setops import local_unique
from kernel_helpers import (KEY_TYPES, assert_same_rows, concat, random_table, run_ranks,
                            split_rows)

WORLDS = [1, 2, 3, 4]
HOWS = ["inner", "left", "right", "outer", "semi", "anti"]


def _on_ranks(store_url, world, op, *tables, **kwargs):
    """Run ``op(comm, table_r, ...)`` where table_r is each table's part for the rank."""
    def fn(comm, parts):
        return op(comm, *[p[comm.rank] for p in parts], **kwargs)
    return run_ranks(fn, world, store_url, tables)


def _duck(sql, **tables):
    con = duckdb.connect()
    for name, t in tables.items():
        con.register(name, t)
    return con.sql(sql).to_arrow_table()


# -- join --------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("how", HOWS)
def test_join(store_url, world, how):
    left = random_table(300, seed=1, key_kinds=("int64", "string"), cardinality=15)
    right = random_table(200, seed=2, key_kinds=("int64", "string"), cardinality=15)
    got = _on_ranks(store_url, world, K.join, split_rows(left, world, seed=3),
                    split_rows(right, world, seed=4), on=["k0", "k1"], how=how, broadcast=False)
    expected = local_join(left, right, ["k0", "k1"], ["k0", "k1"], how)
    assert_same_rows(concat(got), expected)


@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_join_against_duckdb(store_url, how):
    left = random_table(250, seed=5, key_kinds=("int64",), cardinality=30, value_cols=False)
    left = left.append_column("a", pa.array(np.arange(250)))
    right = random_table(150, seed=6, key_kinds=("int64",), cardinality=30, value_cols=False)
    right = right.append_column("b", pa.array(np.arange(150)))
    got = concat(_on_ranks(store_url, 3, K.join, split_rows(left, 3), split_rows(right, 3),
                           on="k0", how=how))
    sql_how = {"inner": "INNER", "left": "LEFT", "right": "RIGHT", "outer": "FULL OUTER"}[how]
    expected = _duck(f"SELECT coalesce(l.k0, r.k0) AS k0, a, b FROM l {sql_how} JOIN r "
                     f"ON l.k0 = r.k0", l=left, r=right)
    if how in ("inner", "left"):
        expected = expected.set_column(0, "k0", pc.coalesce(expected.column("k0"),
                                                            expected.column("k0")))
    assert_same_rows(got, expected.cast(got.schema))


@pytest.mark.parametrize("how", ["inner", "left", "right", "semi", "anti"])
def test_broadcast_join(store_url, how):
    left = random_table(400, seed=7, key_kinds=("int64",), cardinality=40)
    right = random_table(30, seed=8, key_kinds=("int64",), cardinality=40)
    got = _on_ranks(store_url, 3, K.join, split_rows(left, 3), split_rows(right, 3, how="last"),
                    on="k0", how=how, broadcast=True)
    assert_same_rows(concat(got), local_join(left, right, ["k0"], ["k0"], how))
    tiny = right.slice(0, 5)   # auto broadcasts a side this small
    auto = _on_ranks(store_url, 3, K.join, split_rows(left, 3), split_rows(tiny, 3),
                     on="k0", how=how)
    assert_same_rows(concat(auto), local_join(left, tiny, ["k0"], ["k0"], how))


def test_broadcast_decision():
    from cylon_store.kernel.join import BROADCAST_RATIO, _choose_broadcast
    big, small = 1_000_000, int(1_000_000 * BROADCAST_RATIO / 3)
    assert _choose_broadcast("inner", big, small, 4, "auto", 1 << 40) == "right"
    assert _choose_broadcast("inner", small, big, 4, "auto", 1 << 40) == "left"
    assert _choose_broadcast("inner", big, 2 * small, 4, "auto", 1 << 40) is None
    assert _choose_broadcast("inner", big, small, 4, "auto", small - 1) is None  # too big to hold
    assert _choose_broadcast("left", small, big, 4, "auto", 1 << 40) is None     # left must stay
    assert _choose_broadcast("right", small, big, 4, "auto", 1 << 40) == "left"
    assert _choose_broadcast("outer", big, 1, 4, True, 1 << 40) is None
    assert _choose_broadcast("semi", big, big, 4, True, 1) == "right"


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_join_key_types(store_url, kind):
    left = random_table(200, seed=9, key_kinds=(kind,), cardinality=12)
    right = random_table(120, seed=10, key_kinds=(kind,), cardinality=12)
    if kind == "dictionary":   # each side its own dictionary
        right = right.set_column(0, "k0", right.column("k0").cast(pa.string()).dictionary_encode())
    got = _on_ranks(store_url, 3, K.join, split_rows(left, 3), split_rows(right, 3), on="k0",
                    how="outer", broadcast=False)
    L, R = left, right
    if kind == "dictionary":
        L = left.set_column(0, "k0", left.column("k0").cast(pa.string()))
        R = right.set_column(0, "k0", right.column("k0").cast(pa.string()))
    expected = local_join(L, R, ["k0"], ["k0"], "outer")
    assert_same_rows(concat(got), expected.cast(concat(got).schema))


def test_join_signed_zero_and_nan_keys(store_url):
    left = pa.table({"k": pa.array([0.0, -0.0, np.nan, 1.0, None] * 6), "a": np.arange(30)})
    right = pa.table({"k": pa.array([-0.0, np.nan, 0.0, None, 2.0] * 4), "b": np.arange(20)})
    got = _on_ranks(store_url, 4, K.join, split_rows(left, 4), split_rows(right, 4), on="k",
                    how="outer", broadcast=False)
    assert_same_rows(concat(got), local_join(left, right, ["k"], ["k"], "outer"))


def test_join_left_on_right_on_types_and_suffixes(store_url):
    rng = np.random.default_rng(11)
    left = pa.table({"id": pa.array(rng.integers(0, 20, 150), pa.int32()),
                     "v": rng.integers(0, 9, 150), "w": rng.random(150)})
    right = pa.table({"key": pa.array(rng.integers(0, 20, 90), pa.int64()),
                      "v": rng.integers(0, 9, 90), "id": rng.integers(0, 5, 90)})
    for how in ("inner", "outer"):
        got = concat(_on_ranks(store_url, 3, K.join, split_rows(left, 3), split_rows(right, 3),
                               left_on="id", right_on="key", how=how, suffixes=("_l", "_r"),
                               broadcast=False))
        assert got.column_names == ["id_l", "v_l", "w", "key", "v_r", "id_r"]
        assert got.schema.field("id_l").type == pa.int64()
        L = left.set_column(0, "id", left.column("id").cast(pa.int64()))
        expected = local_join(L, right, ["id"], ["key"], how, ("_l", "_r"))
        assert_same_rows(got, expected)
        raw = L.join(right.rename_columns(["key", "v_r", "id_r"]), keys="id", right_keys="key",
                     join_type="inner" if how == "inner" else "full outer", coalesce_keys=False)
        assert got.num_rows == raw.num_rows


@pytest.mark.parametrize("layout", ["first", "last", "empty", "skew"])
def test_join_layouts(store_url, layout):
    n = 0 if layout == "empty" else 300
    left = random_table(n, seed=12, key_kinds=("string",), cardinality=25,
                        skew=0.8 if layout == "skew" else 0.0)
    right = random_table(n // 2, seed=13, key_kinds=("string",), cardinality=25)
    how = "first" if layout in ("first", "empty") else "last"
    for jhow in ("inner", "outer"):
        got = _on_ranks(store_url, 4, K.join, split_rows(left, 4, how=how if layout != "skew"
                                                         else "random"),
                        split_rows(right, 4, how=how if layout != "skew" else "random"),
                        on="k0", how=jhow, broadcast=False)
        assert_same_rows(concat(got), local_join(left, right, ["k0"], ["k0"], jhow))


def test_join_with_nested_payload(store_url):
    left = pa.table({"k": [1, 2, 3, 1], "l": pa.array([[1], [2, 2], None, []]),
                     "st": pa.array([{"a": 1}, {"a": 2}, None, {"a": 4}])})
    right = pa.table({"k": [1, 3, 4], "m": pa.array([[9], [8], [7]])})
    got = concat(_on_ranks(store_url, 2, K.join, split_rows(left, 2), split_rows(right, 2),
                           on="k", how="outer", broadcast=False))
    assert got.column_names == ["k", "l", "st", "m"]
    exp = local_join(left, right, ["k"], ["k"], "outer")
    key = lambda t: sorted(zip(*[map(str, t.column(c).to_pylist()) for c in t.column_names]))  # noqa
    assert key(got) == key(exp)
    assert sorted(map(str, exp.column("m").to_pylist())) == sorted(["[9]", "[9]", "None", "[8]", "[7]"])


# -- groupby -----------------------------------------------------------------------------------

ALL_AGGS = [("v", "sum"), ("v", "min"), ("v", "max"), ("x", "mean"), ("x", "std"), ("x", "var"),
            ("v", "count"), ("s", "count_distinct"), ("s", "first"), ("s", "last"),
            ([], "count_all"), ("x", "stddev"), ("v", "mean"), ("x", "sum")]


def _pyarrow_groupby(table, by, aggs):
    """The single-process reference: pyarrow itself (std/var are its stddev/variance, ddof=1)."""
    spec, names = [], []
    for col, f, *opt in aggs:
        if f in ("std", "var"):
            spec.append((col, {"std": "stddev", "var": "variance"}[f], pc.VarianceOptions(ddof=1)))
        else:
            spec.append((col, f, *opt))
        names.append("count_all" if col == [] else f"{col}_{f}")
    return _keys_first(table.group_by(by, use_threads=False).aggregate(spec), by, names)


def _keys_first(out, by, names):
    """pyarrow's result with the keys first (its layout changed between versions)."""
    k = len(by)
    keys_first = out.column_names[:k] == list(by)
    cols = out.columns[:k] + out.columns[k:] if keys_first else out.columns[-k:] + out.columns[:-k]
    if not k:
        cols = out.columns
    return pa.Table.from_arrays(cols, names=list(by) + names)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("pre", [True, False])
def test_groupby(store_url, world, pre):
    t = random_table(400, seed=20, key_kinds=("int64", "string"), cardinality=6)
    got = concat(_on_ranks(store_url, world, K.groupby, split_rows(t, world, seed=world),
                           by=["k0", "k1"], aggs=ALL_AGGS, pre_aggregate=pre))
    expected = _pyarrow_groupby(t, ["k0", "k1"], ALL_AGGS)
    assert got.schema == expected.schema
    assert_same_rows(got, expected, by=["k0", "k1"])


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_groupby_key_types(store_url, kind):
    t = random_table(300, seed=21, key_kinds=(kind,), cardinality=10)
    aggs = [("v", "sum"), ("x", "mean"), ("v", "count"), ("x", "var")]
    got = concat(_on_ranks(store_url, 3, K.groupby, split_rows(t, 3), by="k0", aggs=aggs))
    expected = _pyarrow_groupby(t, ["k0"], aggs)
    assert_same_rows(got, expected, by=["k0"])


@pytest.mark.parametrize("layout", ["first", "empty", "skew", "none"])
def test_groupby_layouts(store_url, layout):
    n = 0 if layout == "empty" else 500
    t = random_table(n, seed=22, key_kinds=("int32",), cardinality=50,
                     skew=0.9 if layout == "skew" else 0.0)
    aggs = {"v": ["sum", "mean"], "x": "std", "s": "count_distinct"}
    by = [] if layout == "none" else ["k0"]
    got = _on_ranks(store_url, 4, K.groupby, split_rows(t, 4, how="first" if layout == "first"
                                                         else "random"), by=by, aggs=aggs)
    flat = [("v", "sum"), ("v", "mean"), ("x", "std"), ("s", "count_distinct")]
    expected = _pyarrow_groupby(t, by, flat)
    if layout == "none":
        assert [g.num_rows for g in got] == [1, 0, 0, 0]
        assert_same_rows(concat(got), expected)
    else:
        assert_same_rows(concat(got), expected, by=by)


def test_groupby_options(store_url):
    t = random_table(300, seed=23, key_kinds=("int64",), cardinality=30, null_fraction=0.3)
    t = t.set_column(1, "v", pc.if_else(pc.less(t.column("k0"), 50000), pa.nulls(300, pa.int64()),
                                        t.column("v")))
    aggs = [("v", "sum", pc.ScalarAggregateOptions(min_count=3)),
            ("v", "sum", pc.ScalarAggregateOptions(skip_nulls=False, min_count=0)),
            ("v", "min", pc.ScalarAggregateOptions(skip_nulls=False)),
            ("v", "mean", pc.ScalarAggregateOptions(skip_nulls=False)),
            ("v", "count", pc.CountOptions("only_null")),
            ("v", "count", pc.CountOptions("all")),
            ("s", "count_distinct", pc.CountOptions("all")),
            ("x", "variance", pc.VarianceOptions(ddof=0, min_count=4)),
            ("x", "stddev", pc.VarianceOptions(ddof=2)),
            ("v", "first", pc.ScalarAggregateOptions(skip_nulls=False)),
            ("v", "max")]
    ref = _keys_first(t.group_by("k0", use_threads=False).aggregate(aggs), ["k0"],
                      [f"c{i}" for i in range(len(aggs))])
    for pre in (True, False):
        got = concat(_on_ranks(store_url, 3, K.groupby, split_rows(t, 3), by="k0", aggs=aggs,
                               pre_aggregate=pre))
        assert_same_rows(got.rename_columns(ref.column_names), ref, by=["k0"])


def test_groupby_auto_chooses_by_group_count(store_url, monkeypatch):
    gb = __import__("sys").modules["cylon_store.kernel.groupby"]
    chosen = []
    real = gb._Plan.pre_aggregate
    monkeypatch.setattr(gb._Plan, "pre_aggregate",
                        lambda self, t: chosen.append(True) or real(self, t))
    few = random_table(2000, seed=26, key_kinds=("int64",), cardinality=20)
    many = few.set_column(0, "k0", pa.array(np.arange(2000)))
    for t, expect in ((few, True), (many, False)):
        chosen.clear()
        got = concat(_on_ranks(store_url, 2, K.groupby, split_rows(t, 2), by="k0",
                               aggs=[("v", "sum")]))
        assert bool(chosen) == expect
        assert_same_rows(got, _pyarrow_groupby(t, ["k0"], [("v", "sum")]), by=["k0"])


def test_distinct_estimate():
    gb = __import__("sys").modules["cylon_store.kernel.groupby"]
    from cylon_store.kernel.partition import hash_array
    rng = np.random.default_rng(27)
    for distinct in (10, 1000, 50_000, 400_000):
        keys = rng.integers(0, distinct, 500_000)
        true = len(np.unique(keys))
        est = gb._estimate_distinct(hash_array(pa.array(keys)))
        assert abs(est - true) < 0.12 * true, (distinct, est, true)


def test_groupby_variance_is_numerically_careful(store_url):
    rng = np.random.default_rng(24)
    n = 4000
    t = pa.table({"g": rng.integers(0, 4, n), "x": 1e9 + rng.standard_normal(n)})
    got = concat(_on_ranks(store_url, 4, K.groupby, split_rows(t, 4), by="g",
                           aggs=[("x", "var"), ("x", "mean")]))
    got = got.sort_by("g")
    for g, var in zip(got.column("g").to_pylist(), got.column("x_var").to_pylist()):
        xs = t.filter(pc.equal(t.column("g"), g)).column("x").to_numpy()
        exact = np.var(xs - xs.mean(), ddof=1)
        assert abs(var - exact) < 1e-6 * exact


def test_groupby_bool_and_decimal_values(store_url):
    t = random_table(200, seed=25, key_kinds=("int64",), cardinality=5)
    t = t.append_column("b", pc.greater(t.column("v"), 0))
    t = t.append_column("d", pc.cast(t.column("v"), pa.decimal128(22, 2)))
    aggs = [("b", "any"), ("b", "all"), ("b", "sum"), ("b", "mean"), ("d", "sum"), ("d", "min"),
            ("d", "std")]
    got = concat(_on_ranks(store_url, 2, K.groupby, split_rows(t, 2), by="k0", aggs=aggs))
    assert_same_rows(got, _pyarrow_groupby(t, ["k0"], aggs), by=["k0"])


# -- sort --------------------------------------------------------------------------------------

def _stable_sort(t, keys, null_placement="at_end"):
    return t.take(pc.sort_indices(t, sort_keys=[(k, o, null_placement) for k, o in keys]))


@pytest.mark.parametrize("world", WORLDS)
def test_sort(store_url, world):
    t = random_table(500, seed=30, key_kinds=("string", "int64"), cardinality=8)
    keys = [("k0", "descending"), ("k1", "ascending"), ("x", "descending")]
    got = _on_ranks(store_url, world, K.sort, split_rows(t, world, seed=world), by=keys)
    assert concat(got).equals(_stable_sort(t, keys))


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_sort_key_types(store_url, kind):
    t = random_table(300, seed=31, key_kinds=(kind,), cardinality=40)
    got = _on_ranks(store_url, 3, K.sort, split_rows(t, 3), by="k0")
    exp_keys = t.set_column(0, "k0", t.column("k0").cast(pa.string())) if kind == "dictionary" else t
    order = pc.sort_indices(exp_keys, sort_keys=[("k0", "ascending")])
    assert_same_rows(concat(got), t.take(order), ordered=True)


def test_sort_skew_is_spread(store_url):
    t = random_table(2000, seed=32, key_kinds=("int64",), cardinality=3, skew=0.97)
    got = _on_ranks(store_url, 4, K.sort, split_rows(t, 4, how="first"), by=["k0"])
    assert concat(got).equals(_stable_sort(t, [("k0", "ascending")]))
    sizes = [g.num_rows for g in got]
    assert max(sizes) < 0.4 * 2000, sizes
    same = pa.table({"a": np.zeros(1000, np.int64), "i": np.arange(1000)})
    got = _on_ranks(store_url, 4, K.sort, split_rows(same, 4, how="last"), by="a")
    assert concat(got).equals(same)
    assert min(g.num_rows for g in got) > 150, [g.num_rows for g in got]


@pytest.mark.parametrize("layout", ["empty", "last"])
def test_sort_layouts_and_null_placement(store_url, layout):
    n = 0 if layout == "empty" else 300
    t = random_table(n, seed=33, key_kinds=("float64",), cardinality=9, null_fraction=0.3)
    got = _on_ranks(store_url, 3, K.sort, split_rows(t, 3, how=layout if n else "first"),
                    by=[("k0", "descending")], null_placement="at_start")
    assert_same_rows(concat(got), _stable_sort(t, [("k0", "descending")], "at_start"),
                     ordered=True)


# -- unique and set operations -------------------------------------------------------------

@pytest.mark.parametrize("world", WORLDS)
def test_unique(store_url, world):
    t = random_table(400, seed=40, key_kinds=("int64", "string"), cardinality=6)
    got = concat(_on_ranks(store_url, world, K.unique, split_rows(t, world), on=["k0", "k1"]))
    assert_same_rows(got, local_unique(t, ["k0", "k1"]))
    keys = t.select(["k0", "k1"])
    got = concat(_on_ranks(store_url, world, K.unique, split_rows(keys, world)))
    assert_same_rows(got, _duck("SELECT DISTINCT * FROM t", t=keys))


def test_unique_keep_last_and_skew(store_url):
    t = random_table(500, seed=41, key_kinds=("float64",), cardinality=5, skew=0.9)
    got = concat(_on_ranks(store_url, 4, K.unique, split_rows(t, 4, how="first"), on="k0",
                           keep="last"))
    assert_same_rows(got, local_unique(t, ["k0"], keep="last"))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("op,sql", [("union", "UNION"), ("intersect", "INTERSECT"),
                                    ("difference", "EXCEPT")])
def test_set_operations(store_url, world, op, sql):
    a = random_table(300, seed=42, key_kinds=("int64", "string"), cardinality=8,
                     value_cols=False)
    b = random_table(200, seed=43, key_kinds=("int64", "string"), cardinality=8,
                     value_cols=False)
    got = concat(_on_ranks(store_url, world, getattr(K, op), split_rows(a, world),
                           split_rows(b, world, how="first")))
    expected = _duck(f"SELECT * FROM a {sql} SELECT * FROM b", a=a, b=b)
    assert_same_rows(got, expected.cast(a.schema))


def test_set_operations_types_and_empty(store_url):
    a = pa.table({"f": pa.array([1.5, np.nan, None, 1.5, 2.0], pa.float64()),
                  "d": pa.array([1, 2, None, 1, 3], pa.int32()).cast(pa.date32())})
    b = pa.table({"f": pa.array([np.nan, None, 7.0], pa.float32()),
                  "d": pa.array([2, None, 1], pa.int32()).cast(pa.date32())})
    for op, expect in (("union", 5), ("intersect", 2), ("difference", 2)):
        got = concat(_on_ranks(store_url, 3, getattr(K, op), split_rows(a, 3), split_rows(b, 3)))
        assert got.num_rows == expect, (op, got)
        assert got.schema.field("f").type == pa.float64()
    empty = a.slice(0, 0)
    got = concat(_on_ranks(store_url, 2, K.intersect, split_rows(empty, 2), split_rows(a, 2)))
    assert got.num_rows == 0 and got.column_names == ["f", "d"]


# -- shuffle and repartition -------------------------------------------------------------------

@pytest.mark.parametrize("world", WORLDS)
def test_shuffle(store_url, world):
    t = random_table(400, seed=50, key_kinds=("string", "int32"), cardinality=7)
    t = t.append_column("i", pa.array(np.arange(400)))
    got = _on_ranks(store_url, world, K.shuffle, split_rows(t, world), on=["k0", "k1"])
    assert_same_rows(concat(got), t)
    home = {}
    for r, part in enumerate(got):
        for key in zip(part.column("k0").to_pylist(), part.column("k1").to_pylist()):
            assert home.setdefault(key, r) == r
        assert (np.diff(part.column("i").to_numpy()) > 0).all()   # (rank, row) order kept


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", ["random", "first", "last"])
def test_repartition(store_url, world, layout):
    t = random_table(101, seed=51, key_kinds=("int64",))
    got = _on_ranks(store_url, world, K.repartition, split_rows(t, world, how=layout))
    assert concat(got).equals(t)
    sizes = [g.num_rows for g in got]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_repartition_to_given_counts_and_empty(store_url):
    t = random_table(40, seed=52, key_kinds=("int64",))
    got = _on_ranks(store_url, 3, K.repartition, split_rows(t, 3), rows_per_rank=[0, 30, 10])
    assert [g.num_rows for g in got] == [0, 30, 10] and concat(got).equals(t)
    empty = t.slice(0, 0)
    got = _on_ranks(store_url, 3, K.repartition, split_rows(empty, 3))
    assert all(g.num_rows == 0 and g.schema == t.schema for g in got)


def test_none_means_no_rows(store_url):
    t = random_table(100, seed=53, key_kinds=("int64",), cardinality=10)

    def fn(comm):
        mine = t if comm.rank == 1 else None
        return (K.groupby(comm, mine, "k0", [("v", "sum")]),
                K.sort(comm, mine, "k0"),
                K.join(comm, mine, t if comm.rank == 0 else None, on="k0", broadcast=False))
    out = run_ranks(fn, 3, store_url)
    assert_same_rows(concat([o[0] for o in out]), _pyarrow_groupby(t, ["k0"], [("v", "sum")]),
                     by=["k0"])
    assert concat([o[1] for o in out]).equals(_stable_sort(t, [("k0", "ascending")]))
    assert_same_rows(concat([o[2] for o in out]), local_join(t, t, ["k0"], ["k0"], "inner",
                                                             ("", "_right")))


def test_sort_numeric_fast_path(store_url):
    # One numeric key without nulls takes numpy's stable sort; ties, NaN, -0.0 and both
    # directions must give exactly Arrow's order.
    rng = np.random.default_rng(34)
    n = 900
    f = rng.integers(-3, 4, n).astype(np.float64)
    f[rng.random(n) < 0.1] = np.nan
    f[rng.random(n) < 0.1] = -0.0
    t = pa.table({"i": pa.array(rng.integers(-5, 5, n), pa.int16()), "f": f,
                  "ts": pa.array(rng.integers(0, 50, n)).cast(pa.timestamp("ms")),
                  "u": pa.array(rng.integers(0, 2**64 - 1, n, dtype=np.uint64)),
                  "row": np.arange(n)})
    cases = [(c, o, p) for c in ("i", "f", "ts", "u") for o in ("ascending", "descending")
             for p in ("at_end", "at_start")]

    def fn(comm, parts):
        return [K.sort(comm, parts[comm.rank], [(c, o)], null_placement=p) for c, o, p in cases]
    out = run_ranks(fn, 3, store_url, split_rows(t, 3))
    for k, (c, o, p) in enumerate(cases):
        got = concat([r[k] for r in out])
        assert_same_rows(got, _stable_sort(t, [(c, o)], p), ordered=True)


class _OneRank:
    rank, world_size = 0, 1


@pytest.mark.parametrize("aggs", [
    [("v", "sum"), ("v", "mean"), ("v", "count")],
    [("x", "mean"), ("x", "sum"), ("x", "min")],
    [("v", "sum", pc.ScalarAggregateOptions(min_count=3)),
     ("v", "mean", pc.ScalarAggregateOptions(min_count=3)), ("v", "count")],
    [("v", "mean", pc.ScalarAggregateOptions(skip_nulls=False)),
     ("v", "sum", pc.ScalarAggregateOptions(skip_nulls=False)), ("v", "count", pc.CountOptions("all"))],
    [("x", "first"), ("x", "last"), ("x", "mean"), ("x", "sum"), ([], "count_all")],
])
def test_groupby_rows_with_shared_partial_states_match_pyarrow_exactly(aggs):
    # Whole rows sharing partial states (sum and count serve mean) are aggregated once and
    # finished like combined partials: values, types and group order must be pyarrow's own.
    t = random_table(3000, seed=40, key_kinds=("int64", "string"), cardinality=40,
                     null_fraction=0.2)
    t = t.set_column(t.schema.get_field_index("x"), "x", t.column("x").cast(pa.float32()))
    got = K.groupby(_OneRank(), t, ["k0", "k1"], aggs)
    assert got.equals(_pyarrow_groupby(t, ["k0", "k1"], aggs))


def test_exchange_many_packing_round_trips_every_layout():
    # The join moves both sides in one exchange, each as a list<struct> column of a one-row
    # table: slices, chunked and empty parts, nulls, dictionaries and nested types must survive
    # the trip through Arrow IPC unchanged.
    from cylon_store.kernel._common import _nest, _unnest
    t = pa.table({"k": pa.array([1, 2, None, 4, 5], pa.int64()),
                  "s": pa.array(["a", None, "c", "d", "e"]),
                  "d": pa.array(["x", "y", "x", None, "y"]).dictionary_encode(),
                  "l": pa.array([[1], [2, 3], None, [], [4]]),
                  "st": pa.array([{"a": 1}, None, {"a": 3}, {"a": 4}, {"a": 5}]),
                  "n": pa.nulls(5)})
    other = pa.table({"k": pa.array([7.5, None, 1.0])})
    layouts = [t, t.slice(1, 3), t.slice(0, 0), pa.concat_tables([t.slice(0, 2), t.slice(3)]),
               t.schema.empty_table()]
    for part in layouts:
        packed = _nest([part, other.slice(1)])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, packed.schema) as w:
            w.write_table(packed)
        back = pa.ipc.open_stream(sink.getvalue()).read_all()
        got = _unnest(back, 0, t.schema)
        assert (pa.concat_tables(got) if got else t.schema.empty_table()).equals(part)
        assert pa.concat_tables(_unnest(back, 1, other.schema)).equals(other.slice(1))


# -- every exchange strategy ---------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["direct", "combined", "twolevel"])
def test_operators_over_every_exchange_strategy(tmp_path, strategy):
    """Join, groupby, sort and unique through each store exchange (5 ranks: a two-level grid
    with a short last row), against the single-process results."""
    url = f"file://{tmp_path}/store?fsync=false"
    world = 5
    left = random_table(400, seed=60, key_kinds=("int64", "string"), cardinality=25)
    right = random_table(300, seed=61, key_kinds=("int64", "string"), cardinality=25)
    lp, rp = split_rows(left, world, seed=62), split_rows(right, world, how="first")
    aggs = [("v", "sum"), ("x", "mean"), ("v", "count")]
    sort_keys = [("k1", "ascending"), ("k0", "descending"), ("x", "ascending")]

    def fn(comm):
        me = comm.rank
        return (K.join(comm, lp[me], rp[me], on=["k0", "k1"], how="outer", broadcast=False),
                K.groupby(comm, lp[me], by="k1", aggs=aggs),
                K.sort(comm, lp[me], by=sort_keys),
                K.unique(comm, lp[me], on=["k0"]), comm.strategy)

    out = run_ranks(fn, world, url, exchange=strategy)
    assert {o[4] for o in out} == {strategy}
    assert_same_rows(concat([o[0] for o in out]), local_join(left, right, ["k0", "k1"],
                                                             ["k0", "k1"], "outer"))
    assert_same_rows(concat([o[1] for o in out]), _pyarrow_groupby(left, ["k1"], aggs), by=["k1"])
    assert concat([o[2] for o in out]).equals(_stable_sort(left, sort_keys))
    assert_same_rows(concat([o[3] for o in out]), local_unique(left, ["k0"]))
