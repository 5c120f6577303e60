"""The kernel on the direct transports: the same operator code under mpirun (mpi://) and over
UCX endpoints (ucx://, bootstrapped through a file rendezvous), checked on the root rank against
the single-process pyarrow result."""

from __future__ import annotations

from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc

import cylon_store as cs
from cylon_store import kernel as K
from cylon_store.kernel.join import local_join

from kernel_helpers import assert_same_rows, random_table, split_rows

AGGS = [("v", "sum"), ("x", "mean"), ("x", "std"), ("v", "count"), ("s", "count_distinct")]


def kernel_checks(comm):
    """Every operator on this rank's slice; root compares the gathered result with pyarrow."""
    P, me = comm.world_size, comm.rank
    left = random_table(400, seed=1, key_kinds=("int64", "string"), cardinality=12)
    right = random_table(300, seed=2, key_kinds=("int64", "string"), cardinality=12)
    t = random_table(500, seed=3, key_kinds=("string", "int64"), cardinality=8, skew=0.3)
    mine = lambda table, seed: split_rows(table, P, seed=seed)[me]  # noqa: E731
    checked = []

    def at_root(name, local, expected, **kw):
        parts = comm.gather(local, root=0)
        if me == 0:
            assert_same_rows(pa.concat_tables(parts), expected, **kw)
        checked.append(name)

    at_root("shuffle", K.shuffle(comm, mine(t, 4), on=["k0"]), t)
    for how in ("inner", "left", "outer", "semi", "anti"):
        got = K.join(comm, mine(left, 5), mine(right, 6), on=["k0", "k1"], how=how)
        at_root(f"join-{how}", got, local_join(left, right, ["k0", "k1"], ["k0", "k1"], how))
    got = K.groupby(comm, mine(t, 7), by=["k0"], aggs=AGGS)
    spec = [(c, {"std": "stddev"}.get(f, f), *([pc.VarianceOptions(ddof=1)] if f == "std" else []))
            for c, f in AGGS]
    exp = t.group_by(["k0"], use_threads=False).aggregate(spec)
    exp = exp.select(["k0"] + [n for n in exp.column_names if n != "k0"])
    exp = exp.rename_columns(["k0"] + [f"{c}_{f}" for c, f in AGGS])
    at_root("groupby", got, exp, by=["k0"])
    keys = [("k0", "descending"), ("k1", "ascending"), ("x", "descending")]
    got = K.sort(comm, mine(t, 8), by=keys)
    parts = comm.gather(got, root=0)
    if me == 0:
        expected = t.take(pc.sort_indices(t, sort_keys=[(k, o, "at_end") for k, o in keys]))
        assert pa.concat_tables(parts).equals(expected), "sort"
    checked.append("sort")
    u = t.select(["k0", "k1"])
    at_root("unique", K.unique(comm, mine(u, 9)),
            u.group_by(["k0", "k1"], use_threads=False).aggregate([]))
    got = K.repartition(comm, mine(t, 10))
    assert abs(got.num_rows - t.num_rows // P) <= 1
    parts = comm.gather(got, root=0)
    if me == 0:
        assert pa.concat_tables(parts).equals(t), "repartition keeps order"
    checked.append("repartition")
    return checked


EXPECTED = ["shuffle"] + [f"join-{h}" for h in ("inner", "left", "outer", "semi", "anti")] + \
    ["groupby", "sort", "unique", "repartition"]


def test_kernel_on_mpi():
    assert cs.launch(kernel_checks, 3, store="mpi://", launcher="mpi", timeout=300,
                     comm_timeout=120) == [EXPECTED] * 3


def test_kernel_on_ucx(tmp_path):
    rdv = f"file://{tmp_path}/rdv?fsync=false"
    url = f"ucx://?rendezvous={quote(rdv, safe='')}"
    assert cs.launch(kernel_checks, 3, store=url, launcher="local", timeout=300,
                     comm_timeout=120) == [EXPECTED] * 3
