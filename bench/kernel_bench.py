"""Distributed join, groupby and sort on local ranks over each store, side by side with Dask's
P2P shuffle on a LocalCluster of as many workers, and with single-process DuckDB and Polars,
all on the same data in one run.

    python -m cylon_store.bench.kernel_bench            # --quick: reduced sizes, a few minutes
    python -m cylon_store.bench.kernel_bench --full     # the sizes of issue 7 (10M x 1M join, ...)

Work measured (wall time from a barrier before to a barrier after, result materialised as Arrow
on every rank / worker; data generation and startup excluded):

* join: left N rows (int64 key uniform in [0, 2M), float64), right M rows (keys 0..M-1 once
  each, float64); inner join on the key.  Ours twice: "join" with the default broadcast="auto"
  (M = N/10 on 4 ranks sits near the measured break-even; auto now shuffles there, as
  ``--sweep`` found the shuffle join slightly faster at that ratio)
  and "join_shuffle", the hash-shuffle join of both sides that Dask's P2P merge also does.
* groupby: N rows, key uniform in [0, G); sum, mean and count of a float64 column.
* sort: N rows (random int64 key, float64 payload) sorted by the key.

Every rank generates its own slice of the data from a seed; peers get the concatenation of the
same slices.  Reported: the best of ``--repeat`` runs (this is meant to run on shared machines,
where other processes only ever add time), and the ratios the issue sets as targets (Dask time /
ours, ours / DuckDB).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, Optional

import numpy as np
import pyarrow as pa

import cylon_store as cs

from . import require
from .servers import LocalRedis

QUICK = {"join_left": 2_000_000, "join_right": 200_000, "groupby_rows": 2_000_000,
         "groups": 200_000, "sort_rows": 2_000_000}
FULL = {"join_left": 10_000_000, "join_right": 1_000_000, "groupby_rows": 10_000_000,
        "groups": 1_000_000, "sort_rows": 10_000_000}
OPS = ("join", "join_shuffle", "groupby", "sort")


def _base(op: str) -> str:
    """The peers' operation for one of ours (both joins compare with the peers' join)."""
    return "join" if op.startswith("join") else op


# -- data: rank r's slice, identical wherever it is generated -----------------------------------

def _slice(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def make_data(op: str, sizes: dict, rank: int, world: int, seed: int = 7) -> tuple:
    rng = np.random.default_rng([seed, rank])
    if op.startswith("join"):
        lo, hi = _slice(sizes["join_left"], rank, world)
        n = hi - lo
        left = pa.table({"k": rng.integers(0, 2 * sizes["join_right"], n),
                         "v": rng.random(n)})
        perm = np.random.default_rng(seed).permutation(sizes["join_right"])
        rlo, rhi = _slice(sizes["join_right"], rank, world)
        right = pa.table({"k": perm[rlo:rhi].astype(np.int64), "w": rng.random(rhi - rlo)})
        return left, right
    if op == "groupby":
        lo, hi = _slice(sizes["groupby_rows"], rank, world)
        return (pa.table({"k": rng.integers(0, sizes["groups"], hi - lo),
                          "v": rng.random(hi - lo)}),)
    if op == "sort":
        lo, hi = _slice(sizes["sort_rows"], rank, world)
        return (pa.table({"k": rng.integers(0, 1 << 62, hi - lo), "v": rng.random(hi - lo)}),)
    raise ValueError(op)


def full_data(op: str, sizes: dict, world: int) -> tuple:
    parts = [make_data(op, sizes, r, world) for r in range(world)]
    return tuple(pa.concat_tables([p[i] for p in parts]).combine_chunks()
                 for i in range(len(parts[0])))


GROUP_AGGS = [("v", "sum"), ("v", "mean"), ("v", "count")]


def sweep_rank(comm, left_rows: int, ratios: list, repeat: int):
    """Broadcast vs shuffle join for right sides of ``ratio * left_rows`` rows (every rank)."""
    from cylon_store import kernel as K
    pa.set_cpu_count(max(1, (os.cpu_count() or 1) // comm.world_size))
    out = []
    for ratio in ratios:
        sizes = {"join_left": left_rows, "join_right": max(1, int(left_rows * ratio))}
        left, right = make_data("join", sizes, comm.rank, comm.world_size)
        row = {"ratio": ratio, "right_mb": comm.allreduce(right.nbytes, "sum") / 2**20}
        for mode in (True, False):
            K.join(comm, left.slice(0, 1000), right.slice(0, 1000), on="k", broadcast=mode)
            times = []
            for _ in range(repeat):
                comm.barrier()
                t0 = time.perf_counter()
                K.join(comm, left, right, on="k", broadcast=mode)
                comm.barrier()
                times.append(time.perf_counter() - t0)
            row["broadcast" if mode else "shuffle"] = min(times)
        out.append(row)
    return out


def sweep_groupby_rank(comm, rows: int, groups_list: list, repeat: int):
    """Groupby with and without pre-aggregation over numbers of groups (every rank)."""
    from cylon_store import kernel as K
    pa.set_cpu_count(max(1, (os.cpu_count() or 1) // comm.world_size))
    out = []
    for groups in groups_list:
        data = make_data("groupby", {"groupby_rows": rows, "groups": groups}, comm.rank,
                         comm.world_size)[0]
        row: dict[str | bool, Any] = {"groups": groups}
        for mode in (True, False, "auto"):
            K.groupby(comm, data.slice(0, 1000), "k", GROUP_AGGS, pre_aggregate=mode)
            times = []
            for _ in range(repeat):
                comm.barrier()
                t0 = time.perf_counter()
                K.groupby(comm, data, "k", GROUP_AGGS, pre_aggregate=mode)
                comm.barrier()
                times.append(time.perf_counter() - t0)
            row[mode] = min(times)
        out.append(row)
    return out


def run_kernel(comm, op: str, data: tuple) -> pa.Table:
    from cylon_store import kernel as K
    if op == "join":
        return K.join(comm, data[0], data[1], on="k")
    if op == "join_shuffle":
        return K.join(comm, data[0], data[1], on="k", broadcast=False)
    if op == "groupby":
        return K.groupby(comm, data[0], "k", GROUP_AGGS)
    if op == "sort":
        return K.sort(comm, data[0], "k")
    raise ValueError(op)


def bench_rank(comm, op: str, sizes: dict, repeat: int):
    """Runs on every rank (a process started by cs.launch)."""
    # One rank per core share, as Cylon runs one thread per rank: Arrow's pool would otherwise
    # start a thread per core in every rank.
    pa.set_cpu_count(max(1, (os.cpu_count() or 1) // comm.world_size))
    data = make_data(op, sizes, comm.rank, comm.world_size)
    run_kernel(comm, op, tuple(t.slice(0, 1000) for t in data))   # warm up imports and pools
    times, rows = [], 0
    for _ in range(repeat):
        comm.barrier()
        t0 = time.perf_counter()
        out = run_kernel(comm, op, data)
        comm.barrier()
        times.append(time.perf_counter() - t0)
        rows = out.num_rows
        del out
    total = comm.allreduce(rows, "sum")
    return times, total


# -- our runs -----------------------------------------------------------------------------------

def run_ours(store: str, url: str, op: str, sizes: dict, ranks: int, repeat: int,
             launcher: str = "local", client: Any = None):
    extra = {"client": client} if client is not None else {}
    results = cs.launch(bench_rank, ranks, store=url, launcher=launcher,
                        args=(op, sizes, repeat), job=f"kb-{op.replace('_', '-')}-{uuid.uuid4().hex[:6]}",
                        comm_timeout=600, **extra)
    times, rows = results[0]
    return min(times), rows


class Launchers:
    """The clusters that ``--launcher ray,dask`` runs our ranks on, started for the run: a local
    Ray instance of ``ranks`` CPUs (one bundle per rank) and a Dask LocalCluster of ``ranks``
    single-threaded worker processes (one rank per process, as the local launcher runs them)."""

    def __init__(self, names: list, ranks: int):
        self.names = names
        self.client: Any = None
        self.cluster: Any = None
        self.ray: Any = None
        if "ray" in names:
            require("ray", extra="ray", why="--launcher ray")
            import logging

            import ray
            ray.init(address="local", num_cpus=ranks, include_dashboard=False,
                     logging_level=logging.ERROR)
            self.ray = ray
        if "dask" in names:
            require("distributed", extra="dask", why="--launcher dask")
            import logging

            from distributed import Client, LocalCluster
            self.cluster = LocalCluster(n_workers=ranks, threads_per_worker=1, processes=True,
                                        dashboard_address=":0", memory_limit=0,
                                        silence_logs=logging.ERROR)
            self.client = Client(self.cluster)

    @staticmethod
    def column(store: str, launcher: str) -> str:
        return store if launcher == "local" else f"{store}@{launcher}"

    def run(self, launcher: str, store: str, url: str, op: str, sizes: dict, ranks: int,
            repeat: int) -> tuple:
        """(best kernel seconds, result rows, wall seconds of the whole launch)."""
        t0 = time.perf_counter()
        t, n = run_ours(store, url, op, sizes, ranks, repeat, launcher,
                        self.client if launcher == "dask" else None)
        return t, n, time.perf_counter() - t0

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.cluster.close()
        if self.ray is not None:
            self.ray.shutdown()


# -- peers --------------------------------------------------------------------------------------

def run_duckdb(op: str, data: tuple, repeat: int):
    import duckdb
    con = duckdb.connect()
    for name, t in zip(("a", "b"), data):
        con.register(name, t)
    sql = {"join": "SELECT a.k, a.v, b.w FROM a JOIN b ON a.k = b.k",
           "groupby": "SELECT k, sum(v) AS v_sum, avg(v) AS v_mean, count(v) AS v_count "
                      "FROM a GROUP BY k",
           "sort": "SELECT * FROM a ORDER BY k"}[op]
    return _timed(lambda: con.sql(sql).to_arrow_table(), repeat)


def run_polars(op: str, data: tuple, repeat: int):
    import polars as pl
    frames = []
    for t in data:
        frame = pl.from_arrow(t)
        assert isinstance(frame, pl.DataFrame)  # a Table converts to a DataFrame
        frames.append(frame)
    if op == "join":
        fn = lambda: frames[0].join(frames[1], on="k", how="inner")  # noqa: E731
    elif op == "groupby":
        fn = lambda: frames[0].group_by("k").agg(  # noqa: E731
            pl.col("v").sum().alias("v_sum"), pl.col("v").mean().alias("v_mean"),
            pl.col("v").count().alias("v_count"))
    else:
        fn = lambda: frames[0].sort("k")  # noqa: E731
    return _timed(fn, repeat)


def _timed(fn, repeat):
    fn()   # warm-up
    times, rows = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        rows = len(out) if not isinstance(out, pa.Table) else out.num_rows
        del out
    return min(times), rows, times


class DaskPeer:
    """Dask DataFrame on a LocalCluster of ``workers`` single-threaded worker processes, every
    shuffle through the P2P extension."""

    def __init__(self, workers: int):
        import logging
        import warnings

        import dask
        from dask.distributed import Client, LocalCluster
        warnings.filterwarnings("ignore", message="Sending large graph")
        logging.getLogger("distributed").setLevel(logging.ERROR)
        dask.config.set({"dataframe.shuffle.method": "p2p",
                         "distributed.worker.daemon": False})
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None, memory_limit=0,
                                    silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.workers = workers

    def run(self, op: str, data: tuple, repeat: int):
        import dask.dataframe as dd
        from dask.distributed import wait
        P = self.workers
        frames = []
        for t in data:
            ddf = dd.from_pandas(t.to_pandas(), npartitions=P).persist()
            wait(ddf)
            frames.append(ddf)
        times, rows = [], 0
        for i in range(repeat + 1):   # the first run warms up the workers
            t0 = time.perf_counter()
            if op == "join":
                res = frames[0].merge(frames[1], on="k", how="inner", shuffle_method="p2p",
                                      broadcast=False)
            elif op == "groupby":
                res = frames[0].groupby("k").agg({"v": ["sum", "mean", "count"]}, split_out=P,
                                                  shuffle_method="p2p")
            else:
                res = frames[0].sort_values("k", shuffle_method="p2p")
            res = res.persist()
            wait(res)
            if i:
                times.append(time.perf_counter() - t0)
            rows = int(res.map_partitions(len).compute().sum())
            # Forget the result before the next run: the same expression has the same keys, and
            # a result still held would be handed back without any work.
            self.client.cancel(res)
            del res
            time.sleep(0.5)
        self.client.cancel(frames)
        self.client.run(lambda: __import__("gc").collect())
        return min(times), rows, times

    def shuffle(self, data: pa.Table, repeat: int) -> list:
        """Seconds of each of ``repeat`` P2P shuffles of ``data`` by column ``k`` (after one
        warm-up): the all-to-all the exchange workload measures, as Dask does it."""
        import dask.dataframe as dd
        from dask.distributed import wait
        ddf = dd.from_pandas(data.to_pandas(), npartitions=self.workers).persist()
        wait(ddf)
        times = []
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            res = ddf.shuffle("k", npartitions=self.workers, shuffle_method="p2p").persist()
            wait(res)
            if i:
                times.append(time.perf_counter() - t0)
            self.client.cancel(res)
            del res
            time.sleep(0.2)
        self.client.cancel(ddf)
        return times

    def close(self):
        self.client.close()
        self.cluster.close()


# -- driver -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced sizes (default)")
    size.add_argument("--full", action="store_true", help="the sizes of issue 7")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--stores", default="memory,file,redis")
    ap.add_argument("--peers", default="dask,duckdb,polars")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement (best of)")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    ap.add_argument("--launcher", default="local",
                    help="comma-separated launchers of our ranks, side by side: local, ray (a "
                         "local Ray instance), dask (a Dask LocalCluster of --ranks workers)")
    ap.add_argument("--sweep", action="store_true",
                    help="only measure the two choices made by measurement: broadcast vs "
                         "shuffle join by right-side size, and groupby with vs without "
                         "pre-aggregation by number of groups (memory store)")
    args = ap.parse_args(argv)
    if args.sweep:
        return sweep(args)

    sizes = FULL if args.full else QUICK
    repeat = args.repeat or (3 if args.full else 5)
    stores = [s for s in args.stores.split(",") if s]
    peers = [p for p in args.peers.split(",") if p]
    ops = [o for o in args.ops.split(",") if o]
    launchers = [x for x in args.launcher.split(",") if x]
    unknown = sorted(set(launchers) - {"local", "ray", "dask"})
    if unknown:
        ap.error(f"--launcher: unknown {', '.join(unknown)} (choose from local, ray, dask)")
    P = args.ranks
    peer_modules = {"dask": ["dask", "distributed", "pandas"], "duckdb": ["duckdb"], "polars": ["polars"]}
    require(*[m for p in peers for m in peer_modules.get(p, [])],
            *(["redis"] if "redis" in stores else []), why="the peers and stores asked for")
    print(f"# kernel benchmark: {'full' if args.full else 'quick'} sizes {sizes}, {P} ranks, "
          f"best of {repeat}; {platform.node()} {os.cpu_count()} cpus, python "
          f"{platform.python_version()}, pyarrow {pa.__version__}", flush=True)

    redis_server: Optional[LocalRedis] = None
    tmp = tempfile.mkdtemp(prefix="kbench-file-")
    urls = {}
    for s in stores:
        if s == "memory":
            urls[s] = f"memory://kbench-{uuid.uuid4().hex[:8]}"
        elif s == "file":
            urls[s] = f"file://{tmp}?fsync=false"
        elif s == "redis":
            if args.redis_url:
                urls[s] = args.redis_url
            else:
                try:
                    redis_server = LocalRedis()
                    urls[s] = redis_server.url
                except RuntimeError as exc:
                    print(f"(redis skipped: {exc})", flush=True)
        else:
            urls[s] = s  # any other store URL
    rows_out: list[dict] = []
    peer_ops = list(dict.fromkeys(_base(op) for op in ops))
    clusters = Launchers(launchers, P)
    try:
        # Ours and the single-process peers first; the Dask cluster only afterwards, since its
        # idle worker processes alone take a visible share of a small machine's CPUs.
        for op in ops:
            row = {"op": op}
            for s, url in urls.items():
                for launcher in launchers:
                    t, n, wall = clusters.run(launcher, s, url, op, sizes, P, repeat)
                    col = Launchers.column(s, launcher)
                    row[f"cylon-{col}"] = t
                    row["rows"] = n
                    print(f"{op:14s} cylon/{col:7s} {t:8.3f}s  rows={n}  (launch wall "
                          f"{wall:.2f}s)", flush=True)
            rows_out.append(row)
        peer_times: dict = {}
        for op in peer_ops:
            data = full_data(op, sizes, P)
            for name, fn in (("duckdb", run_duckdb), ("polars", run_polars)):
                if name in peers:
                    t, n, _ = fn(op, data, repeat)
                    peer_times[(op, name)] = t
                    print(f"{op:14s} {name:14s} {t:8.3f}s  rows={n}", flush=True)
            del data
        if "dask" in peers:
            dask_peer = DaskPeer(P)
            try:
                for op in peer_ops:
                    data = full_data(op, sizes, P)
                    t, n, _ = dask_peer.run(op, data, repeat)
                    peer_times[(op, "dask-p2p")] = t
                    print(f"{op:14s} dask-p2p       {t:8.3f}s  rows={n}", flush=True)
                    del data
            finally:
                dask_peer.close()
        for row in rows_out:
            for (op, name), t in peer_times.items():
                if op == _base(row["op"]):
                    row[name] = t
    finally:
        clusters.close()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(render(rows_out, [Launchers.column(s, x) for s in urls for x in launchers], peers))
    return 0


def sweep(args) -> int:
    left = (FULL if args.full else QUICK)["join_left"]
    ratios = [0.01, 0.03, 0.1, 0.2, 0.33, 0.5, 1.0]
    repeat = args.repeat or (3 if args.full else 5)
    rows = cs.launch(sweep_rank, args.ranks, store=f"memory://kbench-{uuid.uuid4().hex[:8]}",
                     launcher="local", args=(left, ratios, repeat), comm_timeout=600)[0]
    print(f"# broadcast vs shuffle join: left {left} rows, {args.ranks} ranks, memory store, "
          f"best of {repeat}")
    print("| right / left | right side MiB | broadcast | shuffle | shuffle / broadcast |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']} | {r['right_mb']:.1f} | {r['broadcast']:.3f} s | "
              f"{r['shuffle']:.3f} s | {r['shuffle'] / r['broadcast']:.2f}x |")
    grows = (FULL if args.full else QUICK)["groupby_rows"]
    groups = [grows * f // 1000 for f in (1, 10, 40, 120, 300, 1000)]
    rows = cs.launch(sweep_groupby_rank, args.ranks, store=f"memory://kbench-{uuid.uuid4().hex[:8]}",
                     launcher="local", args=(grows, groups, repeat), comm_timeout=600)[0]
    print()
    print(f"# groupby with / without pre-aggregation: {grows} rows, {args.ranks} ranks, memory "
          f"store, best of {repeat}")
    print("| groups | groups per row on a rank | pre-aggregate | rows first | auto |")
    print("|---|---|---|---|---|")
    for r in rows:
        per_rank = r["groups"] * (1 - np.exp(-grows / args.ranks / r["groups"])) / (grows / args.ranks)
        print(f"| {r['groups']} | {per_rank:.3f} | {r[True]:.3f} s | {r[False]:.3f} s | "
              f"{r['auto']:.3f} s |")
    return 0


def render(rows: list[dict], stores: list[str], peers: list[str]) -> str:
    cols = [f"cylon-{s}" for s in stores] + [p if p != "dask" else "dask-p2p" for p in peers]
    head = "| operation | result rows | " + " | ".join(cols) + \
           " | dask / cylon-memory | cylon-memory / duckdb |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for r in rows:
        ref = r
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.3f} s" if isinstance(v, float) else "-")
        ours = r.get("cylon-memory")
        dask_t = ref.get("dask-p2p") if ref else None
        duck = ref.get("duckdb") if ref else None
        r1 = f"{dask_t / ours:.2f}x" if ours and dask_t else "-"
        r2 = f"{ours / duck:.2f}x" if ours and duck else "-"
        lines.append(f"| {r['op']} | {r.get('rows', '-')} | " + " | ".join(cells) +
                     f" | {r1} | {r2} |")
    return "\n".join(lines)


# -- store requests of a rank (the suite and the pipeline benchmark count them) ------------

def _stats(comm) -> Optional[dict]:
    store = getattr(comm, "store", None)
    if store is None:
        return None
    s = store.stats()
    return {"requests": dict(s.get("requests", {})), "bytes_out": s.get("bytes_out", 0),
            "bytes_in": s.get("bytes_in", 0), **{k: v for k, v in s.items() if k.startswith("dynamodb.")}}


def _diff(before: Optional[dict], after: Optional[dict]) -> dict:
    if before is None or after is None:
        return {}
    req = {k: after["requests"].get(k, 0) - before["requests"].get(k, 0) for k in after["requests"]}
    out = {"requests": {k: v for k, v in req.items() if v}}
    for k, v in after.items():
        if k != "requests":
            out[k] = v - before.get(k, 0)
    return out

if __name__ == "__main__":
    sys.exit(main())
