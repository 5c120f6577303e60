"""The pycylon-compatible front end (cylon_store.cylon): a pycylon program with only its import
lines changed (tests/mpi_scripts/pycylon_program.py) on thread ranks and under mpirun, checked
against DuckDB; the DataFrame's constructor forms, selection, element-wise operators, local
(no env) behaviour, equals/repartition/evenly_partition; CylonEnv from a config."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import cylon_store as cs
from cylon_store.cylon import CylonEnv, DataFrame, StoreConfig, concat
from cylon_store.errors import ConfigError, NotSupportedError

SCRIPTS = Path(__file__).parent / "mpi_scripts"
sys.path.insert(0, str(SCRIPTS))
import pycylon_program  # noqa: E402


def on_ranks(fn, n=3, store="memory://"):
    return cs.launch(fn, n, store=store, launcher="threads", job=f"c-{uuid.uuid4().hex[:10]}",
                     timeout=120, comm_timeout=30)


def rows(t: pa.Table) -> list:
    def norm(v):
        return round(v, 9) if isinstance(v, float) else v
    return sorted(tuple(norm(v) for v in r.values()) for r in t.to_pylist())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """CSV files of different sizes (k first) and a Parquet directory with several row groups."""
    d = tmp_path_factory.mktemp("pycylon-in")
    rng = np.random.default_rng(7)
    (d / "csv").mkdir()
    for i, n in enumerate([40, 5, 120, 17, 0, 60]):
        t = pa.table({"k": rng.integers(0, 25, n), "v": rng.integers(-50, 50, n),
                      "name": [f"n{x}" for x in rng.integers(0, 9, n)]})
        pacsv.write_csv(t, d / "csv" / f"left-{i}.csv")
    (d / "pq").mkdir()
    for i, n in enumerate([90, 30]):
        t = pa.table({"k": rng.integers(0, 30, n), "w": rng.normal(size=n).round(3)})
        pq.write_table(t, d / "pq" / f"right-{i}.parquet", row_group_size=25)
    return d


def duck_answers(d: Path) -> dict:
    con = duckdb.connect()
    con.sql(f"create view l as select * from read_csv_auto('{d}/csv/*.csv', header=true)")
    con.sql(f"create view r as select * from read_parquet('{d}/pq/*.parquet')")
    return {
        "joined": con.sql("select l.k, l.v, l.name, r.w from l join r using (k)").to_arrow_table(),
        "grouped": con.sql("select l.k, sum(l.v) as sum_v, max(r.w) as max_w, count(r.w) as count_w "
                               "from l join r using (k) group by l.k").to_arrow_table(),
        "keys": con.sql("select distinct k from l").to_arrow_table(),
        "left": con.sql("select k, v, name from l").to_arrow_table(),
    }


def check_program(out: dict, d: Path) -> None:
    """``out``: name -> the ranks' parts (pyarrow tables) in rank order."""
    want = duck_answers(d)
    joined = pa.concat_tables(out["joined"])
    assert joined.column_names == ["k", "v", "name", "w"]
    assert rows(joined) == rows(want["joined"])
    grouped = pa.concat_tables(out["grouped"])
    assert grouped.column_names == ["k", "sum_v", "max_w", "count_w"]  # pycylon's {op}_{column}
    assert rows(grouped) == rows(want["grouped"].cast(grouped.schema))
    ordered = pa.concat_tables(out["ordered"])
    assert rows(ordered) == rows(want["joined"])
    keys = [(r["k"], -r["v"], r["w"]) for r in ordered.to_pylist()]
    assert keys == sorted(keys)                       # the global order over ranks in rank order
    dedup = pa.concat_tables(out["dedup"])
    assert sorted(dedup.column("k").to_pylist()) == sorted(want["keys"].column("k").to_pylist())
    assert set(rows(dedup)) <= set(rows(want["left"]))
    tagged = pa.concat_tables(out["tagged"])
    assert tagged.num_rows == dedup.num_rows
    assert {r["k"]: r["tag"] for r in tagged.to_pylist() if r["tag"]} == {
        k: t for k, t in {1: "a", 2: "b", 3: "c"}.items() if k in set(dedup.column("k").to_pylist())}


def test_pycylon_program_on_thread_ranks(inputs):
    def rank(comm):
        env = CylonEnv(comm)
        out = pycylon_program.program(env, str(inputs / "csv" / "*.csv"), str(inputs / "pq"))
        env.finalize()  # not ours to close: a no-op
        return {k: v.to_arrow() for k, v in out.items()}
    res = on_ranks(rank, 4)
    check_program({k: [r[k] for r in res] for k in res[0]}, inputs)


def test_pycylon_program_under_mpirun(inputs, tmp_path):
    from cylon_store.launch import find_mpirun, mpi_env
    try:
        mpirun = find_mpirun()
    except Exception as exc:  # pragma: no cover - the [mpi] extra is installed by the test command
        pytest.skip(f"no mpirun: {exc}")
    env = {**os.environ, **mpi_env()}
    for k in [k for k in env if k.startswith("CYLON_STORE_")]:
        env.pop(k)
    cmd = [mpirun, "-n", "3", "--oversubscribe", sys.executable, str(SCRIPTS / "pycylon_program.py"),
           str(inputs / "csv" / "*.csv"), str(inputs / "pq"), str(tmp_path / "out")]
    for _ in range(2):  # mpirun's own startup can fail on a loaded machine (see test_mpi.py)
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, timeout=120)
        if p.returncode == 0 or "listener thread failed to start" not in p.stdout:
            break
    assert p.returncode == 0, p.stdout
    assert p.stdout.count("PROGRAM OK") == 3, p.stdout
    out = {}
    for name in ("joined", "grouped", "ordered", "dedup", "tagged"):
        assert (tmp_path / "out" / name / "_SUCCESS").exists()
        out[name] = [pq.read_table(tmp_path / "out" / name / f"part-{r:05d}.parquet") for r in range(3)]
    check_program(out, inputs)


# -- the DataFrame, locally ----------------------------------------------------------------------

def test_constructor_forms():
    pd = pytest.importorskip("pandas")
    assert DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_dict() == {"a": [1, 2], "b": ["x", "y"]}
    assert DataFrame([[1, 2], [3, 4]]).to_dict() == {"0": [1, 2], "1": [3, 4]}
    assert DataFrame([[1, 2], [3, 4]], columns=["p", "q"]).columns == ["p", "q"]
    assert DataFrame([5, 6, 7]).shape == (3, 1)
    assert DataFrame([np.arange(3), np.ones(3)]).to_dict() == {"0": [0, 1, 2], "1": [1.0, 1.0, 1.0]}
    assert DataFrame(np.arange(6).reshape(3, 2)).to_dict() == {"0": [0, 2, 4], "1": [1, 3, 5]}
    assert DataFrame(pd.DataFrame({"a": [1, 2]})).to_dict() == {"a": [1, 2]}
    assert DataFrame(pa.table({"a": [1]})).to_arrow().equals(pa.table({"a": [1]}))
    assert len(DataFrame()) == 0
    with pytest.raises(ConfigError, match="2 column\\(s\\) but 3 column name"):
        DataFrame([[1], [2]], columns=["a", "b", "c"])
    with pytest.raises(ConfigError, match="one length"):
        DataFrame([[1, 2], [3]])
    with pytest.raises(ConfigError, match="cannot build a table from"):
        DataFrame(object())
    with pytest.raises(NotSupportedError, match="no index"):
        DataFrame({"a": [1]}, index=[0])


def test_selection_and_elementwise():
    df = DataFrame({"a": [1, 2, 3, 4], "b": [10, 20, 30, 40]})
    assert df["a"].columns == ["a"] and df[["b", "a"]].columns == ["b", "a"] and df[[1]].columns == ["b"]
    assert df[df["a"] > 2].to_dict() == {"a": [3, 4], "b": [30, 40]}
    assert df[1:3].to_dict() == {"a": [2, 3], "b": [20, 30]}
    assert (df + 1).to_dict() == {"a": [2, 3, 4, 5], "b": [11, 21, 31, 41]}
    assert (df * df).to_dict()["a"] == [1, 4, 9, 16]
    assert (df / 2).to_dict()["a"] == [0.5, 1.0, 1.5, 2.0]
    assert ((df["a"] > 1) & (df["a"] < 4)).to_dict() == {"a": [False, True, True, False]}
    assert (~(df["a"] == 2)).to_dict() == {"a": [True, False, True, True]}
    assert (-df["a"]).to_dict() == {"a": [-1, -2, -3, -4]}
    assert df[df > 2].to_dict() == {"a": [None, None, 3, 4], "b": [10, 20, 30, 40]}
    df["c"] = df["a"] + df["b"]
    assert df.to_dict()["c"] == [11, 22, 33, 44] and df.shape == (4, 3)
    assert df.to_numpy().shape == (4, 3)
    assert df.drop(["c"]).columns == ["a", "b"]
    assert df.rename({"a": "x"}).columns == ["x", "b", "c"]
    assert DataFrame({"a": [1, None]}).fillna(0).to_dict() == {"a": [1, 0]}
    assert DataFrame({"a": [1, None]}).isnull().to_dict() == {"a": [False, True]}
    assert concat([df, df]).shape == (8, 3)
    assert concat([df["a"], df["b"]], axis=1).columns == ["a", "b"]
    with pytest.raises(KeyError, match="no column 'zz'"):
        df["zz"]


def test_local_operations_without_env():
    """Without env the methods run on this process alone, as pycylon's do."""
    df = DataFrame([[0, 0, 1, 1], [1, 10, 1, 5], [10, 20, 30, 40]])
    assert df.groupby(by=0).agg({"1": "sum", "2": "min"}).to_dict() == {
        "0": [0, 1], "sum_1": [11, 6], "min_2": [10, 30]}
    assert df.groupby(by=[0, 1]).max().to_dict() == {"0": [0, 0, 1, 1], "1": [1, 10, 1, 5],
                                                     "max_2": [10, 20, 30, 40]}
    assert df.sort_values(by=[1], ascending=False).to_dict()["1"] == [10, 5, 1, 1]
    assert df.drop_duplicates(subset=[0]).to_dict() == {"0": [0, 1], "1": [1, 1], "2": [10, 30]}
    other = DataFrame({"0": [1], "z": ["q"]})
    assert df.merge(other, on=["0"]).to_dict() == {"0": [1, 1], "1": [1, 5], "2": [30, 40],
                                                   "z": ["q", "q"]}
    assert df.set_index("0").join(other.set_index("0"), how="inner").shape == (2, 4)
    assert df.equals(df.sort_values(by=[2], ascending=False), ordered=False)
    assert not df.equals(df.sort_values(by=[2], ascending=False))
    with pytest.raises(ConfigError, match="columns to merge on are not given"):
        df.merge(other)
    with pytest.raises(ConfigError, match="algorithm"):
        df.merge(other, on="0", algorithm="nested")
    env = CylonEnv()
    assert (env.rank, env.world_size, env.is_distributed) == (0, 1, False)
    assert env.context.get_world_size() == 1
    env.barrier()
    env.finalize()
    env.finalize()


def test_net_module_and_configs():
    from cylon_store.cylon.net import MPIConfig, UCXConfig
    assert MPIConfig().url == "mpi://" and UCXConfig().url == "ucx://"
    assert StoreConfig("memory://", job="x").job == "x"
    with pytest.raises(ConfigError, match="config must be"):
        CylonEnv(config=42)


# -- distributed ------------------------------------------------------------------------------------

def test_equals_repartition_evenly_partition():
    parts = [list(range(0, 5)), list(range(5, 6)), list(range(6, 20))]

    def rank(comm):
        env = CylonEnv(comm)
        df = DataFrame({"a": parts[env.rank], "b": [x * 2 for x in parts[env.rank]]})
        shuffled = df.sort_values(by=["a"], ascending=False, env=env)
        even = df.evenly_partition(env=env)
        custom = df.repartition([2, 8, 10], env=env)
        return (df.equals(shuffled, ordered=False, env=env), df.equals(shuffled, env=env),
                df.equals(df, env=env), df.equals(df[["a"]], env=env), len(even), len(custom),
                even.to_dict()["a"], df.num_rows(env))
    res = on_ranks(rank, 3)
    assert all(r[:4] == (True, False, True, False) for r in res)
    assert [r[4] for r in res] == [7, 7, 6] and [r[5] for r in res] == [2, 8, 10]
    assert sum((r[6] for r in res), []) == list(range(20))
    assert all(r[7] == 20 for r in res)


def test_bound_frame_defaults_to_its_comm_and_env_from_store_config(tmp_path):
    """cs.DataFrame(comm, table) is the same class: methods default to its comm; an env built
    from StoreConfig joins the ranks through a file:// store."""
    job = f"sc-{uuid.uuid4().hex[:8]}"

    def rank(comm):
        df = cs.DataFrame(comm, pa.table({"k": [comm.rank, 7], "v": [1.0, 2.0]}))
        g = df.groupby("k").agg({"v": "sum"})
        with CylonEnv(config=StoreConfig(f"file://{tmp_path}", job=job, rank=comm.rank,
                                         world_size=comm.world_size)) as env:
            assert env.is_distributed and env.world_size == 2
            total = DataFrame({"x": [1, 2, 3]}).num_rows(env=env)
        return g.to_dict(), total, type(g) is DataFrame
    res = on_ranks(rank, 2)
    merged = {}
    for d, total, same in res:
        assert total == 6 and same
        merged.update(dict(zip(d["k"], d["sum_v"])))
    assert merged == {0: 1.0, 1: 1.0, 7: 4.0}
    assert not math.isnan(merged[7])
