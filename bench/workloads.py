"""The workloads of ``cylon-store bench``: what every rank runs, and the single-process peers.

A *cell* is one measurement: ``{"workload", "name", "size", "repeat", ...}``.  All cells of one
(backend, ranks) pair run inside one launch (``run_cells`` on every rank), so that process
start-up and connection set-up are paid once per pair, not per cell.  Each rank returns, per
cell, its own seconds of every repeat (the driver keeps the slowest rank's), its store requests
and bytes, its peak RSS, and a small answer that the driver checks against DuckDB.

Workloads:

* ``latency``: barrier, a tiny exchange (one 1-row table to every rank) and an allgather of
  one int, ``repeat`` rounds each (one op at a time, every rank entering from a barrier);
* ``exchange``: an all-to-all of ``size`` bytes in total (int64 key, float64 value; each rank
  sends ``size / ranks``, split evenly over the ranks), and with ``raw`` the same parts moved
  by the backend's raw client where there is one (plain files, redis-py, boto3, mpi4py
  Alltoallv, or a memcpy of the IPC bytes for memory://);
* ``operators``: the kernel benchmark's join, groupby and sort (``bench.kernel_bench``);
* ``bdb``: the Big Data Benchmark's three queries (selection, aggregation by a sourceIP
  prefix, the join query) on rankings/uservisits generated at ``size`` uservisits rows;
* ``pipeline``: ``bench.pipeline_bench``'s star-schema pipeline (filter, three joins, groupby,
  top 20) on ``size`` sales rows, with per-stage seconds, collectives and store requests.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .exchange import _hwm_mib, _reset_peak, _rss_mib, rank_parts
from .kernel_bench import _diff, _stats, make_data, run_kernel

LATENCY_OPS = ("barrier", "tiny_exchange", "allgather")
OPERATORS = ("join", "groupby", "sort")
BDB_QUERIES = ("selection", "aggregation", "join")
PIPELINES = ("star-top20",)
#: BDB query 1's threshold (pageRank > X; the benchmark's 1a uses 1000 over ranks up to ~10^4)
#: and query 2's sourceIP prefix length (2a: 8 characters), query 3's date range (3a: one year
#: of ten).
SELECT_RANK = 900
PREFIX = 8
DATE_RANGE = (1000, 1365)


# -- BDB data ----------------------------------------------------------------------------------

def _strings(prefix: str, ints) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ints), pa.string()), "")


def bdb_tables(rank: int, world: int, rows: int) -> tuple[pa.Table, pa.Table]:
    """Rank ``rank``'s share of rankings (``rows // 10`` pages) and uservisits (``rows``
    visits) with the Big Data Benchmark's columns; vectorised (no per-row Python)."""
    pages = max(1, rows // 10)
    rng = np.random.default_rng([1000, rank])
    lo, hi = rank * pages // world, (rank + 1) * pages // world
    rankings = pa.table({"pageURL": _strings("url", np.arange(lo, hi)),
                         "pageRank": pa.array(rng.integers(1, 1000, hi - lo), pa.int32()),
                         "avgDuration": pa.array(rng.integers(1, 100, hi - lo), pa.int32())})
    vlo, vhi = rank * rows // world, (rank + 1) * rows // world
    n = vhi - vlo
    ip = pc.binary_join_element_wise(
        *[pc.cast(pa.array(rng.integers(lo_, hi_, n)), pa.string()) for lo_, hi_ in
          ((1, 224), (0, 256), (0, 256), (1, 255))], ".")
    uservisits = pa.table({
        "sourceIP": ip,
        "destURL": _strings("url", rng.integers(0, pages, n)),
        "visitDate": pa.array(rng.integers(0, 3650, n), pa.int32()),
        "adRevenue": rng.random(n) * 10,
        "countryCode": _strings("c", rng.integers(0, 200, n)),
        "duration": pa.array(rng.integers(1, 100, n), pa.int32()),
    })
    return rankings, uservisits


def bdb_local(query: str, rankings: pa.Table, uservisits: pa.Table):
    """The per-rank part of each query before any exchange (filters, derived keys)."""
    if query == "selection":
        return rankings.filter(pc.greater(rankings["pageRank"], SELECT_RANK)) \
            .select(["pageURL", "pageRank"])
    if query == "aggregation":
        return pa.table({"prefix": pc.utf8_slice_codeunits(uservisits["sourceIP"], 0, PREFIX),
                         "adRevenue": uservisits["adRevenue"]})
    visits = uservisits.filter(pc.and_(pc.greater_equal(uservisits["visitDate"], DATE_RANGE[0]),
                                       pc.less(uservisits["visitDate"], DATE_RANGE[1])))
    return rankings, visits.select(["sourceIP", "destURL", "adRevenue"])


def bdb_rank_query(comm, query: str, data) -> dict:
    """One BDB query on this rank's share; returns the (small) answer every rank agrees on."""
    from cylon_store import kernel as K
    if query == "selection":
        # Query 1: a scan and filter; the result is delivered to rank 0 (the driver).
        out = bdb_local(query, *data)
        comm.gather(out, root=0)
        return {"rows": comm.allreduce(out.num_rows, "sum")}
    if query == "aggregation":
        # Query 2: SUM(adRevenue) GROUP BY SUBSTR(sourceIP, 1, 8).
        out = K.groupby(comm, bdb_local(query, *data), "prefix", [("adRevenue", "sum")])
        groups = comm.allreduce(out.num_rows, "sum")
        total = comm.allreduce(float(pc.sum(out["adRevenue_sum"]).as_py() or 0.0), "sum")
        return {"rows": groups, "revenue": round(total, 3)}
    # Query 3: visits in a date range JOIN rankings ON destURL = pageURL, revenue and mean
    # pageRank by sourceIP, the top source.
    rankings, visits = bdb_local(query, *data)
    joined = K.join(comm, rankings, visits, left_on="pageURL", right_on="destURL")
    per_ip = K.groupby(comm, joined, "sourceIP", [("adRevenue", "sum"), ("pageRank", "mean")])
    top = per_ip.sort_by([("adRevenue_sum", "descending")]).slice(0, 1)
    best = pa.concat_tables(comm.allgather(top)).sort_by([("adRevenue_sum", "descending")])
    rows = comm.allreduce(per_ip.num_rows, "sum")
    ip = best["sourceIP"][0].as_py() if best.num_rows else None
    return {"rows": rows, "top": ip}


BDB_SQL = {
    "selection": f"SELECT count(*) FROM rankings WHERE pageRank > {SELECT_RANK}",
    "aggregation": (f"SELECT count(*), round(sum(r), 3) FROM (SELECT sum(adRevenue) AS r FROM "
                    f"uservisits GROUP BY substr(sourceIP, 1, {PREFIX}))"),
    "join": (f"SELECT sourceIP, count(*) OVER () FROM (SELECT sourceIP, sum(adRevenue) AS rev, "
             f"avg(pageRank) FROM rankings JOIN uservisits ON pageURL = destURL "
             f"WHERE visitDate >= {DATE_RANGE[0]} AND visitDate < {DATE_RANGE[1]} "
             f"GROUP BY sourceIP) ORDER BY rev DESC LIMIT 1"),
}
#: The same queries as DuckDB runs them for timing (whole answers materialised as Arrow).
BDB_SQL_TIMED = {
    "selection": f"SELECT pageURL, pageRank FROM rankings WHERE pageRank > {SELECT_RANK}",
    "aggregation": (f"SELECT substr(sourceIP, 1, {PREFIX}) AS prefix, sum(adRevenue) FROM "
                    f"uservisits GROUP BY prefix"),
    "join": (f"SELECT sourceIP, sum(adRevenue) AS rev, avg(pageRank) FROM rankings JOIN uservisits "
             f"ON pageURL = destURL WHERE visitDate >= {DATE_RANGE[0]} AND visitDate < "
             f"{DATE_RANGE[1]} GROUP BY sourceIP ORDER BY rev DESC LIMIT 1"),
}


def bdb_full(rows: int, world: int) -> tuple[pa.Table, pa.Table]:
    parts = [bdb_tables(r, world, rows) for r in range(world)]
    return (pa.concat_tables([p[0] for p in parts]).combine_chunks(),
            pa.concat_tables([p[1] for p in parts]).combine_chunks())


def bdb_expected(rows: int, world: int) -> dict:
    """DuckDB's answers for the data the ranks generate: the check of every backend's run."""
    import duckdb
    rankings, uservisits = bdb_full(rows, world)
    con = duckdb.connect()
    con.register("rankings", rankings)
    con.register("uservisits", uservisits)
    out = {}

    def one(sql):
        rows = con.sql(sql).fetchall()
        return rows[0] if rows else None
    n = one(BDB_SQL["selection"])
    out["selection"] = {"rows": n[0] if n else 0}
    agg = one(BDB_SQL["aggregation"])
    out["aggregation"] = {"rows": agg[0] if agg else 0, "revenue": float(agg[1] or 0.0) if agg else 0.0}
    top = one(BDB_SQL["join"])
    out["join"] = {"rows": top[1] if top else 0, "top": top[0] if top else None}
    return out


# -- what every rank runs ----------------------------------------------------------------------

def _timed(comm, fn, repeat: int) -> tuple[list, object]:
    times, answer = [], None
    for _ in range(repeat):
        comm.barrier()
        t0 = time.perf_counter()
        answer = fn()
        times.append(time.perf_counter() - t0)
    return times, answer


def _tiny_parts(comm) -> list:
    return [pa.table({"k": pa.array([comm.rank], pa.int64())}) for _ in range(comm.world_size)]


def _latency(comm, cell: dict, backend: str = "") -> dict:
    parts = _tiny_parts(comm)
    op = cell["name"]
    fn = {"barrier": comm.barrier, "tiny_exchange": lambda: comm.exchange(parts),
          "allgather": lambda: comm.allgather(parts[0])}[op]
    fn()  # warm-up: connections, pools, first notifications
    times, _ = _timed(comm, fn, cell["repeat"])
    res: dict = {"times": times}
    if cell.get("raw") and backend == "mpi":
        # Raw mpi4py doing the same: MPI_Barrier, and alltoall / allgather of the same Arrow
        # tables as Python objects (pickled: Arrow IPC underneath).
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        raw = {"barrier": world.Barrier, "tiny_exchange": lambda: world.alltoall(parts),
               "allgather": lambda: world.allgather(parts[0])}[op]
        raw()
        res["raw_times"], _ = _timed(comm, raw, cell["repeat"])
    return res


def _ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


class _Raw:
    """The backend's own client moving the same IPC bytes: put every outgoing part under its
    key, a barrier, get every incoming part.  No checksums, no atomic commit, no notification:
    the least a store-based exchange has to do."""

    def __init__(self, comm, backend: str, url: str, tag: str):
        self.comm, self.backend = comm, backend
        self.prefix = f"raw-{comm.job}-{tag}"
        from urllib.parse import parse_qs, urlsplit
        u = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        if backend == "file":
            self.dir = os.path.join(u.path, self.prefix)
            os.makedirs(self.dir, exist_ok=True)
        elif backend == "redis":
            import redis
            self.r = redis.Redis.from_url(url.split("?", 1)[0])
        elif backend == "s3":
            import boto3
            self.bucket, self.key_prefix = u.netloc, u.path.strip("/")
            self.s3 = boto3.session.Session().client(
                "s3", endpoint_url=q.get("endpoint_url"), region_name=q.get("region", "us-east-1"))

    def _key(self, src: int, dst: int) -> str:
        return f"{self.prefix}/{src}-{dst}"

    def put(self, key: str, data: pa.Buffer) -> None:
        if self.backend == "file":
            with open(os.path.join(self.dir, key.rsplit("/", 1)[1]), "wb") as f:
                f.write(data)
        elif self.backend == "redis":
            self.r.set(key, memoryview(data))
        else:
            self.s3.put_object(Bucket=self.bucket, Key=f"{self.key_prefix}/{key}", Body=data.to_pybytes())

    def get(self, key: str):
        if self.backend == "file":
            with pa.OSFile(os.path.join(self.dir, key.rsplit("/", 1)[1])) as f:
                return f.read_buffer()
        if self.backend == "redis":
            return pa.py_buffer(self.r.get(key))
        return pa.py_buffer(self.s3.get_object(Bucket=self.bucket,
                                               Key=f"{self.key_prefix}/{key}")["Body"].read())

    def delete(self, keys: list) -> None:
        if self.backend == "file":
            for k in keys:
                os.unlink(os.path.join(self.dir, k.rsplit("/", 1)[1]))
        elif self.backend == "redis":
            self.r.delete(*keys)
        else:
            self.s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": f"{self.key_prefix}/{k}"} for k in keys]})

    def exchange(self, parts: list) -> list:
        comm, me, P = self.comm, self.comm.rank, self.comm.world_size
        for d in range(P):
            if d != me:
                self.put(self._key(me, d), _ipc(parts[d]))
        comm.barrier()
        out = [parts[me] if s == me else pa.ipc.open_stream(self.get(self._key(s, me))).read_all()
               for s in range(P)]
        return out

    def cleanup(self) -> None:
        me, P = self.comm.rank, self.comm.world_size
        self.delete([self._key(s, me) for s in range(P) if s != me])
        self.comm.barrier()

    def close(self) -> None:
        if self.backend == "file" and self.comm.rank == 0:
            os.rmdir(self.dir)


def _mpi_raw(comm, parts: list):
    """Raw mpi4py: ``MPI_Alltoallv`` of the parts' IPC bytes into a preallocated buffer."""
    from mpi4py import MPI
    P = comm.world_size
    blobs = [_ipc(t) for t in parts]
    counts = [b.size for b in blobs]
    send = np.frombuffer(b"".join(blobs), np.uint8)
    rcounts = np.zeros(P, np.int64)
    MPI.COMM_WORLD.Alltoall(np.array(counts, np.int64), rcounts)
    recv = np.empty(int(rcounts.sum()), np.uint8)
    sd = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    rd = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).tolist()

    def run():
        MPI.COMM_WORLD.Alltoallv([send, (counts, sd), MPI.BYTE], [recv, (rcounts.tolist(), rd), MPI.BYTE])
        return [pa.ipc.open_stream(pa.py_buffer(recv[rd[s]:rd[s] + int(rcounts[s])])).read_all()
                for s in range(P)]
    return run


def _memcpy_raw(comm, parts: list):
    """memory://'s floor: serialise each outgoing part and copy its bytes once."""
    me = comm.rank

    def run():
        out = []
        for d, t in enumerate(parts):
            if d != me:
                b = _ipc(t)
                out.append(pa.py_buffer(bytearray(memoryview(b))))
        return out
    return run


RAW_BACKENDS = ("memory", "file", "redis", "s3", "mpi")


def _exchange(comm, cell: dict, backend: str, url: str) -> dict:
    total = int(cell["size"])
    parts = rank_parts(comm, total)
    me = comm.rank
    sent_rows = sum(p.num_rows for p in parts)
    sent_bytes = sum(p.nbytes for d, p in enumerate(parts) if d != me)
    comm.exchange([p.slice(0, 1) for p in parts])  # warm-up
    rss0 = _rss_mib()
    _reset_peak()
    before = _stats(comm)
    got_rows = 0

    def run():
        nonlocal got_rows
        out = comm.exchange(parts)
        got_rows = sum(t.num_rows for t in out)
        return None
    times, _ = _timed(comm, run, cell["repeat"])
    after = _stats(comm)
    peak = _hwm_mib()
    rows_ok = comm.allreduce(got_rows, "sum") == comm.allreduce(sent_rows, "sum")
    res = {"times": times, "rss_mib": peak, "rss_growth_mib": max(0.0, peak - rss0),
           "bytes": sent_bytes, "stats": _diff(before, after), "rows_ok": rows_ok}
    closers: list = []
    if cell.get("raw") and backend in RAW_BACKENDS:
        if backend == "mpi":
            fn = _mpi_raw(comm, parts)
            cleanup = None
        elif backend == "memory":
            fn = _memcpy_raw(comm, parts)
            cleanup = None
        else:
            raw = _Raw(comm, backend, url, str(total))
            fn, cleanup = (lambda: raw.exchange(parts)), raw.cleanup
            closers.append(raw.close)
        fn()
        if cleanup:
            cleanup()
        raw_times = []
        for _ in range(cell["repeat"]):
            t, _ = _timed(comm, fn, 1)
            raw_times += t
            if cleanup:
                cleanup()
        res["raw_times"] = raw_times
        for close in closers:
            close()
    return res


def _operator(comm, cell: dict) -> dict:
    op = cell["name"]
    rows = int(cell["size"])
    sizes = {"join_left": rows, "join_right": max(1, rows // 10), "groupby_rows": rows,
             "groups": max(1, rows // 10), "sort_rows": rows}
    data = make_data(op, sizes, comm.rank, comm.world_size)
    run_kernel(comm, op, tuple(t.slice(0, 1000) for t in data))  # warm-up
    before, seq0 = _stats(comm), comm._seq
    n = [0]

    def run():
        out = run_kernel(comm, op, data)
        n[0] = out.num_rows
    times, _ = _timed(comm, run, cell["repeat"])
    after = _stats(comm)
    # Collectives per run (the timing's barrier before each run not counted).
    rounds = (comm._seq - seq0 - cell["repeat"]) / cell["repeat"]
    return {"times": times, "stats": _diff(before, after), "rounds": rounds,
            "answer": {"rows": comm.allreduce(n[0], "sum")}}


def _bdb(comm, cell: dict) -> dict:
    query = cell["name"]
    tables = bdb_tables(comm.rank, comm.world_size, int(cell["size"]))
    before, seq0 = _stats(comm), comm._seq
    times, answer = _timed(comm, lambda: bdb_rank_query(comm, query, tables), cell["repeat"])
    after = _stats(comm)
    rounds = (comm._seq - seq0 - cell["repeat"]) / cell["repeat"]
    return {"times": times, "stats": _diff(before, after), "answer": answer, "rounds": rounds}


def _pipeline(comm, cell: dict) -> dict:
    from .pipeline_bench import pipeline_rank
    return pipeline_rank(comm, int(cell["size"]), cell["repeat"])


def run_cells(comm, cells: list, backend: str, url: str) -> list:
    """Every rank: run each cell, return one result (or error text) per cell."""
    # One rank per core share, as Cylon runs one thread per rank.
    pa.set_cpu_count(max(1, (os.cpu_count() or 1) // comm.world_size))
    out = []
    for cell in cells:
        kind = cell["workload"]
        if kind == "latency":
            res = _latency(comm, cell, backend)
        elif kind == "exchange":
            res = _exchange(comm, cell, backend, url)
        elif kind == "operators":
            res = _operator(comm, cell)
        elif kind == "bdb":
            res = _bdb(comm, cell)
        elif kind == "pipeline":
            res = _pipeline(comm, cell)
        else:
            raise ValueError(f"unknown workload {kind!r}")
        out.append(res)
    return out


# -- single-process and Dask peers on the same data --------------------------------------------

def operator_data(op: str, rows: int, world: int) -> tuple:
    from .kernel_bench import full_data
    sizes = {"join_left": rows, "join_right": max(1, rows // 10), "groupby_rows": rows,
             "groups": max(1, rows // 10), "sort_rows": rows}
    return full_data(op, sizes, world)


def _best(fn, repeat: int) -> list:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def duckdb_bdb(query: str, rows: int, world: int, repeat: int) -> list:
    import duckdb
    rankings, uservisits = bdb_full(rows, world)
    con = duckdb.connect()
    con.register("rankings", rankings)
    con.register("uservisits", uservisits)
    return _best(lambda: con.sql(BDB_SQL_TIMED[query]).to_arrow_table(), repeat)


def polars_bdb(query: str, rows: int, world: int, repeat: int) -> list:
    import polars as pl
    rankings, uservisits = bdb_full(rows, world)
    r, v = pl.from_arrow(rankings), pl.from_arrow(uservisits)
    assert isinstance(r, pl.DataFrame) and isinstance(v, pl.DataFrame)
    if query == "selection":
        fn = lambda: r.filter(pl.col("pageRank") > SELECT_RANK).select("pageURL", "pageRank")  # noqa: E731
    elif query == "aggregation":
        fn = lambda: v.group_by(pl.col("sourceIP").str.slice(0, PREFIX).alias("prefix")).agg(  # noqa: E731
            pl.col("adRevenue").sum())
    else:
        def fn():
            w = v.filter((pl.col("visitDate") >= DATE_RANGE[0]) & (pl.col("visitDate") < DATE_RANGE[1]))
            j = r.join(w, left_on="pageURL", right_on="destURL")
            return j.group_by("sourceIP").agg(pl.col("adRevenue").sum().alias("rev"),
                                              pl.col("pageRank").mean()).sort("rev", descending=True).head(1)
    return _best(fn, repeat)


def duckdb_operator(op: str, rows: int, world: int, repeat: int) -> list:
    from .kernel_bench import run_duckdb
    return run_duckdb(op, operator_data(op, rows, world), repeat)[2]


def polars_operator(op: str, rows: int, world: int, repeat: int) -> list:
    from .kernel_bench import run_polars
    return run_polars(op, operator_data(op, rows, world), repeat)[2]


def dask_operator(peer, op: str, rows: int, world: int, repeat: int) -> list:
    return peer.run(op, operator_data(op, rows, world), repeat)[2]


def dask_shuffle(peer, total_bytes: int, world: int, repeat: int) -> list:
    """Dask's P2P shuffle of the exchange workload's data (every rank's parts, concatenated)."""
    from types import SimpleNamespace
    tables = [pa.concat_tables(rank_parts(SimpleNamespace(rank=r, world_size=world), total_bytes))
              for r in range(world)]
    return peer.shuffle(pa.concat_tables(tables).combine_chunks(), repeat)


def duckdb_pipeline(name: str, rows: int, world: int, repeat: int) -> list:
    from .pipeline_bench import duckdb_run, full_tables
    return duckdb_run(full_tables(rows, world), repeat)[0]


def polars_pipeline(name: str, rows: int, world: int, repeat: int) -> list:
    from .pipeline_bench import full_tables, polars_run
    return polars_run(full_tables(rows, world), repeat)[0]


def dask_pipeline(peer, name: str, rows: int, world: int, repeat: int) -> list:
    from .pipeline_bench import dask_run, full_tables
    return dask_run(peer, full_tables(rows, world), repeat)[0]


@functools.lru_cache(maxsize=4)
def pipeline_expected(rows: int, world: int) -> list:
    """DuckDB's top-k rows for the data the ranks generate (once per size and rank count)."""
    from .pipeline_bench import duckdb_answer, full_tables
    return duckdb_answer(full_tables(rows, world))


def pipeline_check(answer, rows: int, world: int) -> str:
    """"ok" when a pipeline cell's top-k rows equal DuckDB's on the same data."""
    from .pipeline_bench import compare
    diff = compare(answer or [], pipeline_expected(rows, world))
    return "ok" if diff is None else f"MISMATCH: {diff}"
