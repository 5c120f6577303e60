"""Bad input raises the same error on every rank, before anything is exchanged, and the
communicator stays usable afterwards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import cylon_store as cs

from cylon_store import kernel as K
from kernel_helpers import run_ranks

WORLD = 3

T = pa.table({"k": pa.array([1, 2, 3, None], pa.int64()), "s": ["a", "b", None, "d"],
              "l": pa.array([[1], [], None, [2, 3]])})
U = pa.table({"k": ["1", "2"], "v": [1.0, 2.0]})


def _all_raise(store_url, call, error, match):
    """Every rank raises ``error`` with the same message; then a collective still works."""
    def fn(comm):
        try:
            call(comm)
        except Exception as exc:  # checked below
            outcome = (type(exc), str(exc))
        else:
            outcome = (None, None)
        after = comm.allreduce(comm.rank + 1, "sum")   # the communicator is still healthy
        return outcome, after

    out = run_ranks(fn, WORLD, store_url)
    kinds = {o[0][0] for o in out}
    messages = {o[0][1] for o in out}
    assert kinds == {error}, out
    assert len(messages) == 1, messages
    assert match in messages.pop()
    assert all(o[1] == WORLD * (WORLD + 1) // 2 for o in out)


@pytest.mark.parametrize("call,error,match", [
    (lambda c: K.join(c, T, T, on="nope"), K.ColumnNotFoundError, "unknown column 'nope'"),
    (lambda c: K.join(c, T, U, on="k"), K.KeyTypeError, "incompatible types"),
    (lambda c: K.join(c, T, T, on="k", how="sideways"), K.KernelError, "how must be one of"),
    (lambda c: K.join(c, T, T, on="l"), K.KeyTypeError, "cannot be a key"),
    (lambda c: K.groupby(c, T, "k", [("s", "sum")]), K.UnsupportedAggregationError, "sum"),
    (lambda c: K.groupby(c, T, "k", [("s", "median")]), K.UnsupportedAggregationError,
     "unknown or unsupported aggregation 'median'"),
    (lambda c: K.groupby(c, T, "k", {"zz": "sum"}), K.ColumnNotFoundError, "'zz'"),
    (lambda c: K.groupby(c, T, "l", [("k", "sum")]), K.KeyTypeError, "cannot be a key"),
    (lambda c: K.sort(c, T, [("k", "sideways")]), K.KernelError, "ascending"),
    (lambda c: K.sort(c, T, "l"), K.KeyTypeError, "cannot sort"),
    (lambda c: K.unique(c, T, on=["s", "s"]), K.KernelError, "named twice"),
    (lambda c: K.union(c, T.select(["k"]), U.select(["v"])), K.KernelError, "same columns"),
    (lambda c: K.repartition(c, T, rows_per_rank=[1, 2]), K.KernelError, "rows_per_rank"),
    (lambda c: K.shuffle(c, "not a table", "k"), K.KernelError, "pyarrow Table"),
])
def test_everyone_raises_the_same(store_url, call, error, match):
    _all_raise(store_url, call, error, match)


def test_error_on_one_rank_only(store_url):
    # Only rank 1 lacks the column: every rank still raises, and nobody waits in an exchange.
    _all_raise(store_url, lambda c: K.groupby(c, T if c.rank != 1 else T.drop_columns(["s"]), "k",
                                              [("s", "count")]),
               K.ColumnNotFoundError, "raised on rank 1")


def test_data_dependent_cast_failure_on_one_rank(store_url):
    big = pa.table({"k": pa.array([2**63 + 5], pa.uint64())})
    small = pa.table({"k": pa.array([1], pa.int8())})
    _all_raise(store_url, lambda c: K.join(c, big if c.rank == 2 else big.slice(0, 0), small,
                                           on="k"),
               K.KeyTypeError, "raised on rank 2")


def test_ranks_disagree(store_url):
    _all_raise(store_url, lambda c: K.sort(c, T, "k" if c.rank else "s"), K.RankMismatchError,
               "different arguments")
    _all_raise(store_url, lambda c: K.shuffle(c, T if c.rank else T.cast(
        pa.schema([("k", pa.int32()), ("s", pa.string()), ("l", pa.list_(pa.int64()))])), "k"),
               K.RankMismatchError, "different schemas")


def test_errors_are_value_errors_and_say_what(store_url):
    with cs.connect(store_url, job="single", world_size=1, rank=0) as comm:
        with pytest.raises(ValueError, match="unknown column 'x'"):
            K.sort(comm, T, "x")
        with pytest.raises(KeyError):
            K.shuffle(comm, T, ["k", "x"])
        with pytest.raises(TypeError):
            K.join(comm, T, U, on="k")
    out = run_ranks(lambda c: K.groupby(c, pa.table({"k": np.arange(3)}), "k", [("k", "sum")]),
                    1, store_url)
    assert out[0].column_names == ["k", "k_sum"]


def _rank_sort_nan_splitters(comm):
    from cylon_store import kernel as K
    if comm.rank == 0:
        t = pa.table({"x": pa.array([float("nan")] * 1000, pa.float64())})
    else:
        t = pa.table({"x": pa.array([float(i) for i in range(10)], pa.float64())})
    return K.sort(comm, t, by=[("x", "ascending")], null_placement="at_start")


def test_sort_with_nan_splitters_on_a_rank_without_nan():
    """A NaN splitter chosen from another rank's samples (null_placement='at_start') used to
    crash the numeric fast path on a rank that holds no NaN; every row arrives, in order."""
    out = run_ranks(_rank_sort_nan_splitters, 2, "memory://")
    assert sum(t.num_rows for t in out) == 1010
    values = pa.concat_tables(out)["x"].to_numpy(zero_copy_only=False)
    assert np.isnan(values[:1000]).all() and (np.diff(values[1000:]) >= 0).all()
