"""Rounds per operator: the agreement travels with the data, so a join, groupby, shuffle, unique
or set operation is one exchange (sort: samples + exchange; repartition: counts + exchange), and
ranks whose own sizes lead them to different choices still get the exact answer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cylon_store import kernel as K
from cylon_store.kernel.join import local_join
from kernel_helpers import assert_same_rows, concat, random_table, run_ranks

WORLD = 4
URL = "memory://"


def _rounds(op, parts, **kwargs):
    """(result of every rank, collectives each rank ran for ``op``)."""
    def fn(comm, parts):
        comm.barrier()
        before = comm._seq
        out = op(comm, *[p[comm.rank] for p in parts], **kwargs)
        return out, comm._seq - before
    got = run_ranks(fn, WORLD, URL, parts)
    return [g[0] for g in got], {g[1] for g in got}


def _split(t: pa.Table, sizes) -> list[pa.Table]:
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [t.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(len(sizes))]


T = random_table(4000, seed=7, key_kinds=("int64", "string"), cardinality=30)
EVEN = _split(T, [1000] * WORLD)
DIM = random_table(40, seed=8, key_kinds=("int64",), cardinality=30)


@pytest.mark.parametrize("name, op, parts, kwargs, rounds", [
    ("shuffle", K.shuffle, [EVEN], {"on": "k0"}, 1),
    ("unique", K.unique, [EVEN], {"on": ["k0", "k1"]}, 1),
    ("union", K.union, [EVEN, EVEN], {}, 1),
    ("groupby auto", K.groupby, [EVEN], {"by": "k0", "aggs": [("v", "sum")]}, 1),
    ("groupby rows", K.groupby, [EVEN], {"by": "k0", "aggs": [("v", "sum")],
                                        "pre_aggregate": False}, 1),
    ("groupby global", K.groupby, [EVEN], {"by": [], "aggs": [("v", "sum")]}, 1),
    ("join shuffle", K.join, [EVEN, EVEN], {"on": "k0", "broadcast": False}, 1),
    ("join auto, large x large", K.join, [EVEN, EVEN], {"on": "k0"}, 1),
    ("join auto, large x small", K.join, [EVEN, _split(DIM, [10] * WORLD)],
     {"on": "k0"}, 1),
    ("join broadcast=True", K.join, [EVEN, _split(DIM, [10] * WORLD)],
     {"on": "k0", "broadcast": True}, 2),
    ("sort", K.sort, [EVEN], {"by": "k0"}, 2),
    ("repartition", K.repartition, [_split(T, [4000, 0, 0, 0])], {}, 2),
])
def test_collectives_per_operator(name, op, parts, kwargs, rounds):
    _, seen = _rounds(op, parts, **kwargs)
    assert seen == {rounds}, (name, seen)


@pytest.mark.parametrize("how", ["inner", "left", "right", "semi", "anti"])
def test_join_with_ranks_choosing_differently(how):
    """Rank 0 holds a big left side and a tiny right one (it broadcasts its right side), rank 1
    the reverse (it broadcasts its left side where allowed), ranks 2-3 even sizes (shuffle): the
    second exchange completes a shuffle join, and the result is exact."""
    left = random_table(3000, seed=11, key_kinds=("int64",), cardinality=50, null_fraction=0.2)
    right = random_table(3000, seed=12, key_kinds=("int64",), cardinality=50, null_fraction=0.2,
                         prefix="k")
    lp = _split(left, [2000, 10, 495, 495])
    rp = _split(right, [10, 2000, 495, 495])
    got, seen = _rounds(K.join, [lp, rp], on="k0", how=how)
    expected = local_join(left, right, ["k0"], ["k0"], how, ("", "_right"))
    assert_same_rows(concat(got), expected)
    assert seen == {2}, seen   # the choices differed: one more exchange


def test_groupby_with_ranks_choosing_differently():
    """Rank 0's rows have few groups (it pre-aggregates), the others' are all distinct (they
    send rows): one exchange carries both kinds, the answer is exact."""
    few = random_table(2000, seed=21, key_kinds=("int64",), cardinality=5)
    many = random_table(3000, seed=22, key_kinds=("int64",), cardinality=5)
    many = many.set_column(0, "k0", pa.array(np.arange(100, 3100)))
    t = pa.concat_tables([few, many])
    aggs = [("v", "sum"), ("x", "mean"), ("s", "count"), ([], "count_all")]
    got, seen = _rounds(K.groupby, [[few] + _split(many, [1000] * 3)], by="k0", aggs=aggs)
    assert seen == {1}
    expected = t.group_by("k0").aggregate(aggs)
    assert_same_rows(concat(got), expected.select(concat(got).column_names), by=["k0"])
