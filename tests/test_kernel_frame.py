"""The pycylon-style DataFrame wrapper: same answers as the kernel functions it calls."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

import cylon_store as cs
from cylon_store.kernel.join import local_join
from kernel_helpers import assert_same_rows, concat, random_table, run_ranks, split_rows


def test_dataframe_methods(store_url):
    left = random_table(200, seed=60, key_kinds=("int64",), cardinality=15)
    right = random_table(120, seed=61, key_kinds=("int64",), cardinality=15)
    lp, rp = split_rows(left, 3), split_rows(right, 3)

    def fn(comm):
        df = cs.DataFrame(comm, lp[comm.rank])
        other = cs.DataFrame(comm, rp[comm.rank])
        merged = df.merge(other, on="k0", how="left")
        grouped = df.groupby("k0").agg({"v": ["sum", "mean"], "x": "std"})
        ordered = df.sort_values(["k0", "v"], ascending=[False, True])
        dedup = df.drop_duplicates(subset=["k0"])
        both = cs.DataFrame(comm, lp[comm.rank].select(["k0"])).intersect(
            cs.DataFrame(comm, rp[comm.rank].select(["k0"])))
        return (merged.to_table(), grouped.to_table(), ordered.to_table(), dedup.to_table(),
                both.to_table(), df.num_rows(), len(df.repartition()))

    out = run_ranks(fn, 3, store_url)
    assert_same_rows(concat([o[0] for o in out]),
                     local_join(left, right, ["k0"], ["k0"], "left", ("_x", "_y")))
    grouped = concat([o[1] for o in out])
    assert grouped.column_names == ["k0", "sum_v", "mean_v", "std_x"]  # pycylon names: {op}_{column}
    assert grouped.num_rows == pc.count_distinct(left.column("k0"), mode="all").as_py()
    expected = left.take(pc.sort_indices(left, sort_keys=[("k0", "descending"), ("v", "ascending")]))
    assert_same_rows(concat([o[2] for o in out]), expected, ordered=True)
    assert concat([o[3] for o in out]).num_rows == grouped.num_rows
    assert all(o[5] == 200 for o in out)
    assert [o[6] for o in out] == [67, 67, 66]
    assert "DataFrame(rank=" in repr(cs.DataFrame(type("C", (), {"rank": 0, "world_size": 1})(),
                                                  pa.table({"a": [1]})))
