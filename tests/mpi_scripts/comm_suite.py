"""The communicator suite on one rank of a direct transport (mpi:// or ucx://).

Runs the rank functions of tests/test_comm.py (every collective, skewed and empty partitions,
every Arrow type, schema mismatch) plus transport checks (allreduce over every numeric dtype
against the single-process oracle, None/empty inputs to every collective, small message limits
that force chunking).  Started once per rank:

    mpirun -n 4 python tests/mpi_scripts/comm_suite.py mpi://
    python tests/mpi_scripts/comm_suite.py 'ucx://?rendezvous=file:///tmp/rdv' --world 4 --job J  (x4)

Prints ``SUITE OK rank=R checks=K`` and exits 0, or prints the traceback and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: test_comm, datagen

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

import cylon_store as cs  # noqa: E402
from cylon_store.comm import reduce_values  # noqa: E402
from test_comm import (rank_collectives, rank_exchange, rank_large, rank_list_after,  # noqa: E402
                       rank_schema_mismatch, rows_plan)

NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"]


def value_of(rank: int, dtype: str, shape):
    """What ``rank`` contributes to an allreduce: small values, so sums and products fit."""
    base = np.arange(int(np.prod(shape)) or 1).reshape(shape) if shape else np.array(1)
    v = (base + rank) % 3 + (1 if dtype != "bool" else 0)
    if dtype.startswith("complex"):
        return (v + 1j * (rank % 2)).astype(dtype)
    return v.astype(dtype)


def check_allreduce_dtypes(comm):
    P = comm.world_size
    for dtype in NUMERIC:
        for shape in [(), (5,), (2, 3)]:
            for op in ["sum", "prod", "min", "max"]:
                if dtype.startswith("complex") and op in ("min", "max"):
                    continue  # numpy orders complex numbers lexicographically; fine but slow
                mine = value_of(comm.rank, dtype, shape)
                got = comm.allreduce(mine if shape else mine[()], op)
                want = reduce_values([value_of(r, dtype, shape) if shape else value_of(r, dtype, shape)[()]
                                      for r in range(P)], op)
                assert np.asarray(got).dtype == np.asarray(want).dtype, (dtype, op, got, want)
                assert np.shape(got) == np.shape(want), (dtype, shape, op)
                if dtype.startswith(("float", "complex")):
                    np.testing.assert_allclose(got, want, rtol=1e-3)
                else:
                    np.testing.assert_array_equal(got, want)
    # Python numbers stay Python numbers of the same kind.
    for value, op in [(comm.rank + 1, "sum"), (float(comm.rank), "max"), (comm.rank == 0, "sum"),
                      (complex(comm.rank, 1), "sum")]:
        got = comm.allreduce(value, op)
        assert type(got) is type(value), (value, got)
    assert comm.allreduce(comm.rank == 0, "prod") is (P == 1)
    # Mismatched shapes: a clear error on every rank, and the communicator stays usable.
    try:
        comm.allreduce(np.zeros(2 + (comm.rank == 0 and P > 1)), "sum")
        assert P == 1, "mismatched allreduce shapes were not detected"
    except cs.ConfigError as exc:
        assert "shape" in str(exc)
    assert comm.allreduce(1) == P


def check_none_and_empty(comm):
    me, P = comm.rank, comm.world_size
    schema_tbl = pa.table({"a": pa.array([], pa.int64()), "s": pa.array([], pa.string())})
    # allgather: some ranks pass None, one passes an empty table, others rows.
    mine = None if me % 3 == 1 else (schema_tbl if me % 3 == 2 else
                                     pa.table({"a": pa.array([me], pa.int64()), "s": [str(me)]}))
    out = comm.allgather(mine)
    has_schema = any(r % 3 != 1 for r in range(P))
    for s, t in enumerate(out):
        if has_schema:
            assert t.schema.equals(schema_tbl.schema), (s, t.schema)
        assert t.num_rows == (1 if s % 3 == 0 else 0)
    # gather to every root in turn, with None from odd ranks.
    for root in range(P):
        got = comm.gather(None if me % 2 else pa.table({"a": pa.array([me] * me, pa.int64())}), root=root)
        if me == root:
            assert [t.num_rows for t in got] == [0 if r % 2 else r for r in range(P)]
        else:
            assert got is None
    # bcast an empty table with a schema, and a zero-column table, from the last rank.
    b = comm.bcast(schema_tbl if me == P - 1 else None, root=P - 1)
    assert b.schema.equals(schema_tbl.schema) and b.num_rows == 0
    b = comm.bcast(pa.table({}) if me == 0 else None, root=0)
    assert b.num_columns == 0
    # exchange of zero-column tables, and of all-None parts.
    out = comm.exchange([pa.table({})] * P)
    assert all(t.num_columns == 0 for t in out)
    out = comm.exchange([None] * P)
    assert all(t.num_columns == 0 and t.num_rows == 0 for t in out)
    # a multi-chunk table travels as one table with the same content
    t = pa.concat_tables([pa.table({"a": pa.array([me, i], pa.int64()), "s": ["x", "y"]}) for i in range(5)])
    out = comm.exchange([t] * P)
    assert all(o.num_rows == 10 and o.column("a").to_pylist()[0] == s for s, o in enumerate(out))


def check_random_plans(comm, seeds=range(4)):
    P = comm.world_size
    for seed in seeds:
        rng = np.random.default_rng(seed)
        plan = rng.integers(0, 60, (P, P))
        plan[rng.random((P, P)) < 0.3] = 0
        rank_exchange(comm, plan.tolist(), typed=bool(seed % 2))


def check_big_batches(comm, mib):
    """Fewer, larger pieces than rank_large: one multi-MiB string column per part."""
    P = comm.world_size
    n = (mib << 20) // 64
    words = pa.array([f"{comm.rank:02d}" + "x" * 60] * n, pa.string())
    out = comm.exchange([pa.table({"w": words})] * P)
    assert [t.num_rows for t in out] == [n] * P
    assert all(t["w"][n - 1].as_py().startswith(f"{s:02d}") for s, t in enumerate(out))


def suite(comm, *, slow: bool, label: str) -> int:
    P = comm.world_size
    checks = 0

    def run(name, fn, *args):
        nonlocal checks
        t0 = time.monotonic()
        fn(comm, *args)
        checks += 1
        if comm.rank == 0:
            print(f"[{label}] {name}: {time.monotonic() - t0:.2f}s", flush=True)

    for skew in ["uniform", "one_sender", "one_receiver", "empty"]:
        run(f"exchange {skew} all types", rank_exchange, rows_plan(P, skew), True)
    run("exchange 3 rounds", rank_exchange, rows_plan(P, "uniform", scale=500), False, 3)
    run("collectives", rank_collectives)
    run("schema mismatch", lambda c: _assert_eq(rank_schema_mismatch(c), "mismatch"))
    run("repeated", rank_list_after, 3)
    run("random plans", check_random_plans)
    run("none and empty", check_none_and_empty)
    run("allreduce dtypes", check_allreduce_dtypes)
    if slow:
        run("large 96 MiB/rank", lambda c: _assert_eq(rank_large(c, 96)[0], (96 << 20) // 16 // P * P))
        run("big batches 64 MiB/rank", check_big_batches, 64)
    return checks


def _assert_eq(got, want):
    assert got == want, (got, want)


def variant_suite(comm, label: str) -> int:
    """The data-moving checks only, for a communicator with other options."""
    P = comm.world_size
    rank_exchange(comm, rows_plan(P, "uniform", scale=300), True)
    rank_exchange(comm, rows_plan(P, "one_receiver"), True)
    check_none_and_empty(comm)
    rank_collectives(comm)
    check_big_batches(comm, 1)
    if comm.rank == 0:
        print(f"[{label}] variant checks passed", flush=True)
    return 5


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--world", type=int, default=None)
    ap.add_argument("--job", default="suite")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--slow", action="store_true")
    ap.add_argument("--variants", default="",
                    help="comma-separated option sets to re-run the data checks with, "
                         "each 'k=v;k=v' (e.g. 'max_count=4096,exchange_method=alltoallv')")
    args = ap.parse_args()
    rank = "?"
    try:
        comm = cs.connect(args.url, job=args.job, world_size=args.world, timeout=args.timeout)
        rank = comm.rank
        with comm:
            checks = suite(comm, slow=args.slow, label=args.url.split("?")[0])
        for i, variant in enumerate(v for v in args.variants.split(",") if v):
            opts = dict(kv.split("=", 1) for kv in variant.split(";"))
            with cs.connect(args.url, job=f"{args.job}-v{i}", world_size=args.world,
                            timeout=args.timeout, **opts) as comm:
                checks += variant_suite(comm, variant)
        print(f"SUITE OK rank={rank} checks={checks}", flush=True)
        return 0
    except BaseException:
        print(f"SUITE FAILED rank={rank}\n{traceback.format_exc()}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
