"""A pycylon program, ported by changing its import lines only (they were
``from pycylon import DataFrame, CylonEnv, read_csv_dist, read_parquet_dist, write_parquet_dist``
and ``from pycylon.net import MPIConfig``).  ``program(env, ...)`` is what tests/test_cylon_api.py
runs on thread ranks; run as a script (``mpirun -n 4 python pycylon_program.py CSV PARQUET OUT``)
it is the same program under MPI, writing its answers to OUT/<name>/ for the test to check."""

import sys

from cylon_store.cylon import DataFrame, CylonEnv, read_csv_dist, read_parquet_dist, write_parquet_dist  # noqa: F401
from cylon_store.cylon.net import MPIConfig


def program(env, csv_glob, parquet_dir):
    left = read_csv_dist(csv_glob, env=env)
    right = read_parquet_dist(parquet_dir, env=env)
    joined = left.merge(right=right, on=["k"], algorithm="sort", env=env)
    grouped = joined.groupby(by=0, env=env).agg({"v": "sum", "w": ["max", "count"]})
    ordered = joined.sort_values(by=["k", "v", "w"], ascending=[True, False, True], env=env)
    dedup = left.drop_duplicates(subset=["k"], env=env)
    small = DataFrame({"k": [1, 2, 3], "tag": ["a", "b", "c"]})
    small = small[0:3 if env.rank == 0 else 0]  # a distributed frame whose rows are on rank 0
    tagged = dedup.merge(small, how="left", on=["k"], env=env)
    env.barrier()
    return {"joined": joined, "grouped": grouped, "ordered": ordered, "dedup": dedup,
            "tagged": tagged}


if __name__ == "__main__":
    env = CylonEnv(config=MPIConfig())
    out = program(env, sys.argv[1], sys.argv[2])
    for name, df in out.items():
        write_parquet_dist(df, f"{sys.argv[3]}/{name}", env=env)
    print(f"rank {env.rank} of {env.world_size}: PROGRAM OK")
    env.finalize()
