"""Distributed I/O (cylon_store.io): reads balanced by bytes (files and Parquet row groups),
globs, directories and Hive partitions; writes with the _SUCCESS commit, modes and Hive
output, read back equal; s3:// on moto's server; an fsspec filesystem; errors that name what is
wrong and leave nothing written."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import cylon_store as cs
import moto_server
from cylon_store.cylon import CylonEnv
from cylon_store.errors import AlreadyExistsError, ConfigError, NotFoundError, SchemaMismatchError
from cylon_store.io import PENDING, SUCCESS, IncompleteDatasetError, assign_by_bytes

BUCKET = "cylon-io-tests"


def on_ranks(fn, n=3):
    return cs.launch(fn, n, store="memory://", launcher="threads", job=f"io-{uuid.uuid4().hex[:10]}",
                     timeout=120, comm_timeout=30)


def outcome(fn):
    """Run fn(env) on 3 ranks; per rank the value or the exception's (type name, message)."""
    def rank(comm):
        try:
            return ("ok", fn(CylonEnv(comm)))
        except Exception as exc:
            return (type(exc).__name__, str(exc))
    return on_ranks(rank)


def table(n, seed=0, start=0):
    rng = np.random.default_rng(seed)
    return pa.table({"id": np.arange(start, start + n), "x": rng.integers(0, 1000, n),
                     "s": pa.array([f"v{i % 13}" for i in range(n)], pa.string())})


def sorted_rows(t):
    return t.sort_by([(c, "ascending") for c in t.column_names])


def test_assign_by_bytes():
    assert assign_by_bytes([], 3) == [(0, 0)] * 3
    assert assign_by_bytes([100, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    sizes = np.random.default_rng(1).integers(1, 50, 200)
    runs = assign_by_bytes(sizes, 7)
    assert runs[0][0] == 0 and runs[-1][1] == 200
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    share = sizes.sum() / 7
    assert all(abs(sizes[a:b].sum() - share) <= sizes.max() for a, b in runs)


def test_parquet_read_balanced_by_bytes_not_files(tmp_path):
    """One big file of many row groups and a few small files: every rank reads about a third of
    the bytes (row groups of the big file are spread), and the union is the dataset."""
    d = tmp_path / "ds"
    d.mkdir()
    parts = [table(2400, 1, 0), table(100, 2, 2400), table(50, 3, 2500), table(150, 4, 2550)]
    for i, t in enumerate(parts):
        pq.write_table(t, d / f"f{i}.parquet", row_group_size=200)
    res = on_ranks(lambda comm: cs.read_parquet_dist(str(d), env=comm).to_arrow())
    got = pa.concat_tables(res)
    assert sorted_rows(got).equals(sorted_rows(pa.concat_tables(parts)))
    counts = [t.num_rows for t in res]
    assert max(counts) - min(counts) <= 2 * 200, counts   # within a row group or so of even
    # globs and lists name the same dataset
    res2 = on_ranks(lambda comm: cs.read_parquet_dist([str(d / "f0.parquet"), str(d / "f[1-3]*")],
                                                      env=comm, columns=["id"]).to_arrow())
    assert sorted(pa.concat_tables(res2).column("id").to_pylist()) == list(range(2700))


def test_csv_read_balanced_by_bytes_and_types_unified(tmp_path):
    sizes = [1500, 40, 40, 40, 700, 700, 20]
    for i, n in enumerate(sizes):
        pacsv.write_csv(table(n, i, sum(sizes[:i])), tmp_path / f"p{i}.csv")
    pacsv.write_csv(pa.table({"id": [99999], "x": [0.5], "s": ["f"]}), tmp_path / "z.csv")  # x: double
    res = on_ranks(lambda comm: cs.read_csv_dist(str(tmp_path / "*.csv"), env=comm).to_arrow())
    got = pa.concat_tables(res)
    assert got.num_rows == sum(sizes) + 1 and got.schema.field("x").type == pa.float64()
    file_bytes = sorted(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    share = sum(file_bytes) / 3
    rank_bytes = [t.num_rows / got.num_rows * sum(file_bytes) for t in res]
    assert all(abs(b - share) <= file_bytes[-1] for b in rank_bytes), rank_bytes


def test_write_commit_and_hive_partitions_read_back(tmp_path):
    src = [table(300, 5, 0), table(10, 6, 300), table(0, 7, 310)]
    out = tmp_path / "out"

    def rank(comm):
        env = CylonEnv(comm)
        df = cs.DataFrame(src[env.rank])
        files = cs.write_parquet_dist(df, str(out / "plain"), env=env)
        hive = cs.write_parquet_dist(df, str(out / "hive"), env=env, partition_cols=["s"])
        cs.write_csv_dist(df, str(out / "csv"), env=env)
        cs.write_json_dist(df, str(out / "json"), env=env, partition_cols=["s"])
        back = [cs.read_parquet_dist(str(out / "plain"), env=env).to_arrow(),
                cs.read_parquet_dist(str(out / "hive"), env=env, require_success=True).to_arrow(),
                cs.read_csv_dist(str(out / "csv"), env=env).to_arrow(),
                cs.read_json_dist(str(out / "json"), env=env).to_arrow()]
        return files, hive, back
    res = on_ranks(rank)
    assert [os.path.basename(r[0]) for r in res] == ["part-00000.parquet", "part-00001.parquet",
                                                     "part-00002.parquet"]
    assert res[2][1] == [] and all("/s=v" in f for f in res[0][1])
    whole = sorted_rows(pa.concat_tables(src))
    for i in range(4):
        got = pa.concat_tables([r[2][i] for r in res])
        got = got.select(whole.column_names).cast(whole.schema)
        assert sorted_rows(got).equals(whole), i
    for name in ("plain", "hive", "csv", "json"):
        assert (out / name / SUCCESS).exists() and not (out / name / PENDING).exists()
    assert sorted(os.listdir(out / "hive")) == sorted([SUCCESS] + [f"s=v{i}" for i in range(13)])
    assert "s" not in pq.read_table(out / "hive" / "s=v0" / "part-00000.parquet").column_names


def test_write_modes_and_uncommitted_directories(tmp_path):
    d = str(tmp_path / "ds")
    r = outcome(lambda env: cs.write_parquet_dist(cs.DataFrame(table(5)), d, env=env))
    assert all(x[0] == "ok" for x in r)
    r = outcome(lambda env: cs.write_parquet_dist(cs.DataFrame(table(5)), d, env=env))
    assert {x[0] for x in r} == {"AlreadyExistsError"} and "mode='overwrite'" in r[0][1]
    r = outcome(lambda env: cs.write_parquet_dist(cs.DataFrame(table(2)), d, env=env, mode="overwrite"))
    assert all(x[0] == "ok" for x in r)
    assert len(cs.read_parquet_dist(d)) == 6
    r = outcome(lambda env: cs.write_parquet_dist(cs.DataFrame(table(2)), str(tmp_path / "new"),
                                                  env=env, mode="append"))
    assert {x[0] for x in r} == {"ConfigError"} and "mode must be one of" in r[0][1]
    assert not (tmp_path / "new").exists()
    # a write that never committed is refused; a plain directory is read unless required
    os.remove(os.path.join(d, SUCCESS))
    open(os.path.join(d, PENDING), "w").close()
    with pytest.raises(IncompleteDatasetError, match="uncommitted write"):
        cs.read_parquet_dist(d)
    os.remove(os.path.join(d, PENDING))
    assert len(cs.read_parquet_dist(d)) == 6
    with pytest.raises(IncompleteDatasetError, match="no _SUCCESS"):
        cs.read_parquet_dist(d, require_success=True)


def test_bad_input_errors_and_nothing_written(tmp_path):
    with pytest.raises(NotFoundError, match="no such file or directory"):
        cs.read_parquet_dist(str(tmp_path / "missing"))
    with pytest.raises(NotFoundError, match="no file matches"):
        cs.read_csv_dist(str(tmp_path / "*.csv"))
    pq.write_table(pa.table({"a": [1], "b": [1]}), tmp_path / "one.parquet")
    pq.write_table(pa.table({"a": [1], "c": [1]}), tmp_path / "two.parquet")
    r = outcome(lambda env: cs.read_parquet_dist(str(tmp_path), env=env))
    assert {x[0] for x in r} == {"SchemaMismatchError"}
    assert "one.parquet" in r[0][1] and "two.parquet" in r[0][1] and "extra ['c']" in r[0][1]
    pq.write_table(pa.table({"a": ["x"], "b": [1]}), tmp_path / "two.parquet")
    with pytest.raises(SchemaMismatchError, match="incompatible types for column 'a'"):
        cs.read_parquet_dist(str(tmp_path))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="bad.parquet.*not a readable Parquet file"):
        cs.read_parquet_dist(str(tmp_path / "bad.parquet"))
    # ranks whose frames disagree, an unknown partition column, a write failing on a rank
    out = tmp_path / "w"
    r = outcome(lambda env: cs.write_parquet_dist(
        cs.DataFrame(table(3) if env.rank else table(3).drop_columns(["s"])), str(out), env=env))
    assert {x[0] for x in r} == {"SchemaMismatchError"} and "different schemas" in r[0][1]
    r = outcome(lambda env: cs.write_parquet_dist(cs.DataFrame(table(3)), str(out), env=env,
                                                  partition_cols=["nope"]))
    assert {x[0] for x in r} == {"ConfigError"} and "'nope' is not a column" in r[0][1]
    assert not out.exists()
    nested = pa.table({"id": [1], "l": pa.array([[1, 2]])})   # CSV cannot hold a list column
    r = outcome(lambda env: cs.write_csv_dist(cs.DataFrame(nested), str(out), env=env))
    assert {x[0] for x in r} == {"ConfigError"} and "nothing was kept" in r[0][1]
    assert out.exists() and os.listdir(out) == []


@pytest.fixture(scope="module")
def s3_endpoint():
    url = moto_server.acquire()
    moto_server.client("s3").create_bucket(Bucket=BUCKET)
    yield url
    moto_server.release()


def test_s3_round_trip_on_moto(s3_endpoint):
    base = f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}"
    q = f"?endpoint_url={s3_endpoint}&region=us-east-1"
    src = [table(120, 1, 0), table(30, 2, 120), table(75, 3, 150)]

    def rank(comm):
        env = CylonEnv(comm)
        cs.write_parquet_dist(cs.DataFrame(src[env.rank]), f"{base}/pq{q}", env=env, partition_cols=["s"])
        cs.write_csv_dist(cs.DataFrame(src[env.rank]), f"{base}/csv", env=env,
                          storage_options={"endpoint_url": s3_endpoint, "region": "us-east-1"})
        a = cs.read_parquet_dist(f"{base}/pq{q}", env=env, require_success=True).to_arrow()
        b = cs.read_csv_dist(f"{base}/csv/*.csv{q}", env=env).to_arrow()
        return a, b
    res = on_ranks(rank)
    whole = sorted_rows(pa.concat_tables(src))
    for i in range(2):
        got = pa.concat_tables([r[i] for r in res]).select(whole.column_names).cast(whole.schema)
        assert sorted_rows(got).equals(whole)
    keys = {o["Key"] for o in moto_server.client("s3").list_objects_v2(
        Bucket=BUCKET, Prefix=base.split(BUCKET + "/")[1])["Contents"]}
    assert any(k.endswith("pq/_SUCCESS") for k in keys) and not any(k.endswith(PENDING) for k in keys)


def test_fsspec_filesystem():
    pytest.importorskip("fsspec")
    base = f"memory://cylon-io-{uuid.uuid4().hex[:8]}"

    def rank(comm):
        cs.write_parquet_dist(cs.DataFrame(table(40, comm.rank, 40 * comm.rank)), base, env=comm)
        return cs.read_parquet_dist(base, env=comm).to_arrow()
    got = pa.concat_tables(on_ranks(rank))
    assert sorted(got.column("id").to_pylist()) == list(range(120))
    with pytest.raises(ConfigError, match="no filesystem for"):
        cs.read_parquet_dist("nosuchproto://x/y")
    with pytest.raises(AlreadyExistsError):
        cs.write_parquet_dist(cs.DataFrame(table(1)), base)
