"""A multi-operator pipeline on a star schema: filter, three joins, a groupby and a top-k with
the kernel on P local ranks over each store, side by side with DuckDB, Dask (P2P shuffle on a
LocalCluster of as many single-threaded workers as ranks) and Polars, all on the same data in
one run.

    python -m cylon_store.bench.pipeline_bench                  # --quick: 10,000,000 rows, ~1-2 min
    python -m cylon_store.bench.pipeline_bench --rows 40000000 --ranks 4 \\
        --backends memory,redis,file,mpi --repeat 3 --json out.json

Data (vectorised numpy, deterministic from ``--seed``): a fact table ``sales`` of ``--rows``
rows (order_id, customer_id, product_id, store_id int64; date date32 over 2015-2024; quantity
int32 in -2..10; price, discount float64; about 2% nulls in quantity, price and discount) and
three dimensions, ``customer`` (rows/50: segment, country), ``product`` (rows/200: category,
brand) and ``store`` (200: region).  Every rank generates its own slice of ``sales`` and holds
1/P of every dimension, as a job reading its share of Parquet files would; the peers get the
concatenation of the same slices.

The pipeline (``SQL`` is the same query as DuckDB runs it):

    filter     date in [2018-01-01, 2021-01-01) and quantity > 0; revenue = price * quantity
               * (1 - discount) (local pyarrow.compute on every rank, only needed columns kept)
    join       with customer, product and store on their keys (kernel join, broadcast="auto")
    groupby    country, category, region: sum(revenue), count(*), mean(discount)
    topk       by revenue descending (ties by the keys), k = 20: each rank's own top k, one
               allgather, the top k of those (one round; sorting everything first takes more
               rounds for the same answer, see ``--topk sort``)

Measured: wall time from a barrier before to a barrier after (the slowest rank), best of
``--repeat`` after one warm-up run; per stage for ours: seconds (the slowest rank's stage end
minus the slowest rank's previous stage end, in the best run), the collectives it used (rounds;
an allreduce is one allgather) and the store requests of all ranks by kind.  Ours is checked
against DuckDB (the same 20 rows, sums within 1e-6 relative); a mismatch exits 1.  Printed: a
table of every backend and peer with the ratios Dask / ours and ours / DuckDB, and a table of
stages; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
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
import pyarrow.compute as pc

from .kernel_bench import _diff, _slice, _stats

QUICK_ROWS = 10_000_000
K_TOP = 20
STAGES = ("filter", "join_customer", "join_product", "join_store", "groupby", "topk")
KEYS = ("country", "category", "region")
#: the filter: a date range (3 of the 10 years) and quantity > 0
DATE_LO, DATE_HI = np.datetime64("2018-01-01"), np.datetime64("2021-01-01")
DAY0 = np.datetime64("2015-01-01")
DAYS = 3653
NULL_SHARE = 0.02
_LO, _HI = (pa.scalar(d.astype(object), pa.date32()) for d in (DATE_LO, DATE_HI))

SEGMENTS = [f"segment_{i}" for i in range(5)]
COUNTRIES = [f"country_{i:02d}" for i in range(25)]
CATEGORIES = [f"category_{i:02d}" for i in range(12)]
BRANDS = [f"brand_{i:03d}" for i in range(100)]
REGIONS = [f"region_{i}" for i in range(6)]

SQL = f"""
SELECT c.country, p.category, s.region,
       sum(f.price * f.quantity * (1 - f.discount)) AS revenue,
       count(*) AS orders,
       avg(f.discount) AS avg_discount
FROM sales f
JOIN customer c ON f.customer_id = c.customer_id
JOIN product p ON f.product_id = p.product_id
JOIN store s ON f.store_id = s.store_id
WHERE f.date >= DATE '{DATE_LO}' AND f.date < DATE '{DATE_HI}' AND f.quantity > 0
GROUP BY c.country, p.category, s.region
ORDER BY revenue DESC NULLS LAST, c.country, p.category, s.region
LIMIT {{k}}
"""
RESULT_COLUMNS = ("country", "category", "region", "revenue", "orders", "avg_discount")


# -- data ---------------------------------------------------------------------------------------

def dim_sizes(rows: int) -> dict:
    return {"customer": max(50, rows // 50), "product": max(20, rows // 200), "store": 200}


def _with_nulls(values: np.ndarray, rng: np.random.Generator, dtype: pa.DataType) -> pa.Array:
    return pa.array(values, dtype, mask=rng.random(len(values)) < NULL_SHARE)


def _pick(vocab: list, idx: np.ndarray) -> pa.Array:
    return pc.take(pa.array(vocab, pa.string()), pa.array(idx))


def _dimension(name: str, n: int, rank: int, world: int, seed: int) -> pa.Table:
    """Rank ``rank``'s rows of a dimension: the whole table is generated from the seed (it is
    small) and sliced, so it is the same whatever the number of ranks."""
    rng = np.random.default_rng([seed, {"customer": 1, "product": 2, "store": 3}[name]])
    key = rng.permutation(n).astype(np.int64)
    lo, hi = _slice(n, rank, world)
    if name == "customer":
        a, b = rng.integers(0, len(SEGMENTS), n), rng.integers(0, len(COUNTRIES), n)
        cols = {"segment": _pick(SEGMENTS, a[lo:hi]), "country": _pick(COUNTRIES, b[lo:hi])}
    elif name == "product":
        a, b = rng.integers(0, len(CATEGORIES), n), rng.integers(0, len(BRANDS), n)
        cols = {"category": _pick(CATEGORIES, a[lo:hi]), "brand": _pick(BRANDS, b[lo:hi])}
    else:
        a = rng.integers(0, len(REGIONS), n)
        cols = {"region": _pick(REGIONS, a[lo:hi])}
    return pa.table({f"{name}_id": key[lo:hi], **cols})


def make_tables(rows: int, rank: int, world: int, seed: int = 7) -> dict:
    """Rank ``rank``'s share of the four tables (``sales`` slice generated from [seed, rank])."""
    dims = dim_sizes(rows)
    lo, hi = _slice(rows, rank, world)
    n = hi - lo
    rng = np.random.default_rng([seed, 100, rank])
    sales = pa.table({
        "order_id": np.arange(lo, hi, dtype=np.int64),
        "customer_id": rng.integers(0, dims["customer"], n),
        "product_id": rng.integers(0, dims["product"], n),
        "store_id": rng.integers(0, dims["store"], n),
        "date": pa.array((DAY0 + rng.integers(0, DAYS, n)).astype("datetime64[D]"), pa.date32()),
        "quantity": _with_nulls(rng.integers(-2, 11, n).astype(np.int32), rng, pa.int32()),
        "price": _with_nulls(np.round(rng.random(n) * 100 + 1, 2), rng, pa.float64()),
        "discount": _with_nulls(np.round(rng.random(n) * 0.3, 2), rng, pa.float64()),
    })
    out = {"sales": sales}
    for name, size in dims.items():
        out[name] = _dimension(name, size, rank, world, seed)
    return out


def full_tables(rows: int, world: int, seed: int = 7) -> dict:
    """The concatenation of every rank's share: what the single-process peers read."""
    parts = [make_tables(rows, r, world, seed) for r in range(world)]
    return {name: pa.concat_tables([p[name] for p in parts]).combine_chunks() for name in parts[0]}


# -- ours ---------------------------------------------------------------------------------------

def local_filter(sales: pa.Table) -> pa.Table:
    """The filter and the computed column, on this rank's rows only (no exchange)."""
    keep = pc.and_(pc.and_(pc.greater_equal(sales["date"], _LO), pc.less(sales["date"], _HI)),
                   pc.greater(sales["quantity"], 0))
    f = sales.filter(keep)
    revenue = pc.multiply(pc.multiply(f["price"], pc.cast(f["quantity"], pa.float64())),
                          pc.subtract(1.0, f["discount"]))
    return pa.table({"customer_id": f["customer_id"], "product_id": f["product_id"],
                     "store_id": f["store_id"], "order_id": f["order_id"],
                     "revenue": revenue, "discount": f["discount"]})


_ORDER = [("revenue", "descending")] + [(k, "ascending") for k in KEYS]


def _local_top(t: pa.Table, k: int) -> pa.Table:
    return t.sort_by(_ORDER).slice(0, k)   # nulls last (the default)


def top_k(comm, table: pa.Table, k: int, method: str = "gather") -> pa.Table:
    """The first ``k`` rows of ``table`` (distributed) by revenue descending; on every rank.

    ``gather``: each rank's own top k, one allgather, the top k of those.  ``sort``: the
    kernel's distributed sort, then the first k rows of the ranks in order (an allgather of
    each rank's first k rows: the ranks' parts are in global order)."""
    from cylon_store import kernel as K
    if method == "gather":
        return _local_top(pa.concat_tables(comm.allgather(_local_top(table, k))), k)
    if method == "sort":
        s = K.sort(comm, table, _ORDER, null_placement="at_end")
        return pa.concat_tables(comm.allgather(s.slice(0, k))).slice(0, k)
    raise ValueError(f"top-k method must be gather or sort, got {method!r}")


class Probe:
    """Stage ends of one run on one rank: seconds since the start, collectives so far, store
    statistics."""

    def __init__(self, comm):
        self.comm = comm
        self.t0 = time.perf_counter()
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        self.marks.append((time.perf_counter() - self.t0, getattr(self.comm, "_seq", 0),
                           _stats(self.comm)))

    def stages(self) -> list:
        """Per stage: (end seconds since start, collectives, store requests)."""
        out = []
        for (_, s0, st0), (t1, s1, st1) in zip(self.marks, self.marks[1:]):
            out.append({"end": t1, "rounds": s1 - s0, "stats": _diff(st0, st1)})
        return out


def pipeline(comm, data: dict, k: int = K_TOP, topk: str = "gather",
             probe: Optional[Probe] = None) -> pa.Table:
    """The whole pipeline on this rank's share; returns the top ``k`` rows (on every rank)."""
    from cylon_store import kernel as K

    def mark():
        if probe is not None:
            probe.mark()
    t = local_filter(data["sales"])
    mark()
    t = K.join(comm, t, data["customer"].select(["customer_id", "country"]), on="customer_id")
    mark()
    t = K.join(comm, t, data["product"].select(["product_id", "category"]), on="product_id")
    mark()
    t = K.join(comm, t, data["store"].select(["store_id", "region"]), on="store_id")
    mark()
    g = K.groupby(comm, t, list(KEYS), [("revenue", "sum"), ("order_id", "count"),
                                        ("discount", "mean")])
    g = g.rename_columns({"revenue_sum": "revenue", "order_id_count": "orders",
                          "discount_mean": "avg_discount"})
    mark()
    top = top_k(comm, g.select(list(RESULT_COLUMNS)), k, topk)
    mark()
    return top


def pipeline_rank(comm, rows: int, repeat: int, k: int = K_TOP, topk: str = "gather",
                  seed: int = 7) -> dict:
    """Every rank (a process started by cs.launch): generate the share, warm up, ``repeat``
    timed runs.  Returns this rank's seconds per run, stage marks per run, store statistics of
    all runs, and (the same on every rank) the top-k rows."""
    # One rank per core share, as Cylon runs one thread per rank.
    pa.set_cpu_count(max(1, (os.cpu_count() or 1) // comm.world_size))
    data = make_tables(rows, comm.rank, comm.world_size, seed)
    warm = dict(data, sales=data["sales"].slice(0, 1000))
    pipeline(comm, warm, k, topk)   # imports, pools, connections
    before = _stats(comm)
    times, stages, answer = [], [], None
    for _ in range(repeat):
        comm.barrier()
        probe = Probe(comm)
        answer = pipeline(comm, data, k, topk, probe)
        comm.barrier()
        times.append(time.perf_counter() - probe.t0)
        stages.append(probe.stages())
    after = _stats(comm)
    return {"times": times, "stages": stages, "stats": _diff(before, after),
            "answer": answer.to_pylist() if answer is not None else []}


def summarise_stages(per_rank: list, best: int) -> list:
    """Per stage of run ``best``: seconds (slowest rank's end minus the slowest rank's previous
    end), rounds, store requests of all ranks by kind."""
    out, prev = [], 0.0
    for i, name in enumerate(STAGES):
        end = max(r["stages"][best][i]["end"] for r in per_rank)
        req: dict = {}
        for r in per_rank:
            for kind, v in r["stages"][best][i]["stats"].get("requests", {}).items():
                req[kind] = req.get(kind, 0) + v
        counted = any("requests" in r["stages"][best][i]["stats"] for r in per_rank)
        out.append({"stage": name, "seconds": max(0.0, end - prev),
                    "rounds": per_rank[0]["stages"][best][i]["rounds"],
                    "requests": req if counted else None})
        prev = max(prev, end)
    return out


def request_count(req: Optional[dict]) -> str:
    """Requests of one run: the backend's own kinds (s3.GET, redis.COMMANDS...) where it counts
    them, else the facade's operations (put, get, list...); "-" without a store (mpi://)."""
    if req is None:
        return "-"
    own = {kk: v for kk, v in req.items() if "." in kk}
    return f"{sum((own or req).values()):.0f}"


def run_ours(url: str, rows: int, ranks: int, repeat: int, k: int = K_TOP, topk: str = "gather",
             launcher: str = "local", seed: int = 7) -> dict:
    import cylon_store as cs
    per_rank = cs.launch(pipeline_rank, ranks, store=url, launcher=launcher,
                         args=(rows, repeat, k, topk, seed),
                         job=f"pipe-{uuid.uuid4().hex[:8]}", comm_timeout=600, timeout=1800)
    return summarise_run(per_rank)


def summarise_run(per_rank: list) -> dict:
    times = [max(r["times"][i] for r in per_rank) for i in range(len(per_rank[0]["times"]))]
    best = int(np.argmin(times))
    stages = summarise_stages(per_rank, best)
    req: dict = {}
    for r in per_rank:
        for kind, v in r.get("stats", {}).get("requests", {}).items():
            req[kind] = req.get(kind, 0) + v
    n = len(times)
    return {"best_s": times[best], "median_s": float(np.median(times)), "times_s": times,
            "stages": stages, "rounds": sum(s["rounds"] for s in stages),
            "requests_per_run": {kk: v / n for kk, v in req.items()},
            "answer": per_rank[0]["answer"]}


# -- the check ----------------------------------------------------------------------------------

def compare(got: list, want: list, rel: float = 1e-6) -> Optional[str]:
    """None when ``got`` (rows as dicts) equals ``want`` (keys and counts exactly, revenue and
    mean discount within ``rel``), else what differs."""
    if len(got) != len(want):
        return f"{len(got)} rows, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        for c in RESULT_COLUMNS:
            a, b = g.get(c), w.get(c)
            if a is None or b is None:
                if not (a is None and b is None):
                    return f"row {i} column {c}: {a!r}, expected {b!r}"
            elif isinstance(a, float) or isinstance(b, float):
                if abs(a - b) > rel * max(1.0, abs(b)):
                    return f"row {i} column {c}: {a!r}, expected {b!r}"
            elif a != b:
                return f"row {i} column {c}: {a!r}, expected {b!r}"
    return None


# -- peers --------------------------------------------------------------------------------------

def _best(fn, repeat: int) -> tuple[list, Any]:
    out = fn()   # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def duckdb_answer(data: dict, k: int = K_TOP) -> list:
    """DuckDB's top-k rows: the check of ours."""
    return duckdb_run(data, 0, k)[1]


def duckdb_run(data: dict, repeat: int, k: int = K_TOP) -> tuple[list, list]:
    import duckdb
    con = duckdb.connect()
    for name, t in data.items():
        con.register(name, t)
    sql = SQL.format(k=k)
    times, out = _best(lambda: con.sql(sql).to_arrow_table(), repeat)
    return times, out.to_pylist()


def polars_run(data: dict, repeat: int, k: int = K_TOP) -> tuple[list, list]:
    import polars as pl
    f = {}
    for name, t in data.items():
        frame = pl.from_arrow(t)
        assert isinstance(frame, pl.DataFrame)
        f[name] = frame

    def fn():
        s = f["sales"].lazy().filter(
            (pl.col("date") >= DATE_LO.astype(object)) & (pl.col("date") < DATE_HI.astype(object))
            & (pl.col("quantity") > 0))
        s = s.with_columns((pl.col("price") * pl.col("quantity") * (1 - pl.col("discount")))
                           .alias("revenue"))
        s = (s.join(f["customer"].lazy().select("customer_id", "country"), on="customer_id")
             .join(f["product"].lazy().select("product_id", "category"), on="product_id")
             .join(f["store"].lazy().select("store_id", "region"), on="store_id"))
        g = s.group_by(list(KEYS)).agg(pl.col("revenue").sum(), pl.len().alias("orders"),
                                       pl.col("discount").mean().alias("avg_discount"))
        return (g.sort(["revenue", *KEYS], descending=[True, False, False, False], nulls_last=True)
                .head(k).collect())
    times, out = _best(fn, repeat)
    return times, out.select(list(RESULT_COLUMNS)).to_dicts()


def dask_run(peer, data: dict, repeat: int, k: int = K_TOP) -> tuple[list, list]:
    """Dask DataFrame on ``peer``'s LocalCluster (bench.kernel_bench.DaskPeer): every merge with
    shuffle_method="p2p" (Dask decides whether to broadcast, as for a user), groupby().agg,
    nlargest; the inputs persisted in ``peer.workers`` partitions first, the result computed."""
    import dask.dataframe as dd
    from dask.distributed import wait
    P = peer.workers
    frames = {}
    for name, t in data.items():
        if name == "sales":   # pandas compares datetime64 columns, not date objects
            i = t.schema.get_field_index("date")
            t = t.set_column(i, "date", pc.cast(t["date"], pa.timestamp("ns")))
        ddf = dd.from_pandas(t.to_pandas(), npartitions=P).persist()
        wait(ddf)
        frames[name] = ddf
    lo, hi = DATE_LO.astype("datetime64[ns]"), DATE_HI.astype("datetime64[ns]")

    def fn():
        s = frames["sales"]
        s = s[(s["date"] >= lo) & (s["date"] < hi) & (s["quantity"] > 0)]
        s = s.assign(revenue=s["price"] * s["quantity"] * (1 - s["discount"]))
        s = s[["customer_id", "product_id", "store_id", "order_id", "revenue", "discount"]]
        for dim, key, col in (("customer", "customer_id", "country"),
                              ("product", "product_id", "category"), ("store", "store_id", "region")):
            s = s.merge(frames[dim][[key, col]], on=key, how="inner", shuffle_method="p2p")
        g = s.groupby(list(KEYS)).agg({"revenue": "sum", "order_id": "count", "discount": "mean"})
        g = g.rename(columns={"order_id": "orders", "discount": "avg_discount"})
        return g.nlargest(k, "revenue").compute()
    times, out = _best(fn, repeat)
    peer.client.cancel(list(frames.values()))
    out = out.reset_index()
    rows = [{c: (int(v) if c == "orders" else v) for c, v in zip(out.columns, r)}
            for r in out.itertuples(index=False)]
    rows.sort(key=lambda r: (-r["revenue"], *(r[kk] for kk in KEYS)))
    return times, [{c: r[c] for c in RESULT_COLUMNS} for r in rows]


# -- driver -------------------------------------------------------------------------------------

def _urls(names: list, tmp: str, stack) -> dict:
    from .servers import LocalRedis, missing
    urls = {}
    for s in names:
        why = missing(s) if s in ("redis", "mpi", "file", "memory") else None
        if why:
            print(f"(skip {why})", flush=True)
            continue
        if s == "memory":
            urls[s] = f"memory://pipe-{uuid.uuid4().hex[:8]}"
        elif s == "file":
            d = os.path.join(tmp, "file")
            os.makedirs(d, exist_ok=True)
            urls[s] = f"file://{d}?fsync=false"
        elif s == "redis":
            try:
                r = LocalRedis()
            except RuntimeError as exc:
                print(f"(skip redis: {exc})", flush=True)
                continue
            stack.append(r.stop)
            urls[s] = r.url
        elif s == "mpi":
            urls[s] = "mpi://"
        else:
            urls[s] = s   # any other store URL
    return urls


def _secs(s: Optional[float]) -> str:
    return "-" if s is None else (f"{s * 1000:.1f} ms" if s < 0.1 else f"{s:.3f} s")


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render(result: dict) -> str:
    ours, peers = result["ours"], result["peers"]
    duck = peers.get("duckdb", {}).get("best_s")
    dask_t = peers.get("dask-p2p", {}).get("best_s")
    lines = ["| run | best | median | rounds | store requests / run | dask / this | this / duckdb "
             "| answer |", "|---|---|---|---|---|---|---|---|"]
    for name, r in ours.items():
        req = request_count(r["requests_per_run"] or None)
        lines.append(f"| cylon-{name} | {_secs(r['best_s'])} | {_secs(r['median_s'])} | "
                     f"{r['rounds']} | {req} | "
                     f"{_ratio(dask_t, r['best_s'])} | {_ratio(r['best_s'], duck)} | "
                     f"{r.get('check', '-')} |")
    for name, p in peers.items():
        lines.append(f"| {name} | {_secs(p['best_s'])} | {_secs(p['median_s'])} | - | - | "
                     f"{_ratio(dask_t, p['best_s'])} | {_ratio(p['best_s'], duck)} | "
                     f"{p.get('check', '-')} |")
    if not ours:
        return "\n".join(lines)
    lines += ["", "| stage | rounds | " + " | ".join(f"cylon-{n} s (requests)" for n in ours) + " |",
              "|---|---|" + "---|" * len(ours)]
    for i, stage in enumerate(STAGES):
        first = next(iter(ours.values()), None)
        cells = []
        for r in ours.values():
            st = r["stages"][i]
            cells.append(f"{_secs(st['seconds'])} ({request_count(st['requests'])})")
        lines.append(f"| {stage} | {first['stages'][i]['rounds'] if first else '-'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows (the default)")
    ap.add_argument("--rows", type=int, default=None, help="rows of the fact table")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--backends", default="memory,redis,file,mpi",
                    help="comma-separated: memory, redis, file, mpi (or any store URL)")
    ap.add_argument("--peers", default="duckdb,dask,polars",
                    help="comma-separated from duckdb, dask, polars (DuckDB is also the check)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (best of), after a warm-up")
    ap.add_argument("-k", type=int, default=K_TOP, help="rows of the top-k")
    ap.add_argument("--topk", choices=("gather", "sort"), default="gather",
                    help="top-k: each rank's top k and one allgather (default), or the "
                         "distributed sort first")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", metavar="OUT.json", help="write every figure here")
    args = ap.parse_args(argv)
    from . import require
    peers = [p for p in args.peers.split(",") if p]
    backends = [b for b in args.backends.split(",") if b]
    mods = {"dask": ["dask", "distributed", "pandas"], "duckdb": ["duckdb"], "polars": ["polars"]}
    require("duckdb", *[m for p in peers for m in mods.get(p, [])],
            *(["redis"] if "redis" in backends else []), why="the check, peers and stores asked for")
    rows = args.rows or QUICK_ROWS
    P = args.ranks
    print(f"# pipeline benchmark: {rows:,} sales rows, {P} ranks, best of {args.repeat}, top "
          f"{args.k} by {args.topk}; {platform.node()} {os.cpu_count()} cpus, python "
          f"{platform.python_version()}, pyarrow {pa.__version__}, load "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    result: dict = {"rows": rows, "ranks": P, "repeat": args.repeat, "k": args.k,
                    "topk": args.topk, "seed": args.seed, "dims": dim_sizes(rows),
                    "load_before": os.getloadavg(), "ours": {}, "peers": {}, "errors": []}
    t_start = time.monotonic()
    data = full_tables(rows, P, args.seed)
    want = duckdb_answer(data, args.k)
    bad = 0
    tmp = tempfile.mkdtemp(prefix="pipe-bench-")
    stops: list = []
    try:
        urls = _urls(backends, tmp, stops)
        for name, url in urls.items():
            try:
                r = run_ours(url, rows, P, args.repeat, args.k, args.topk,
                             launcher="mpi" if name == "mpi" else "local", seed=args.seed)
            except Exception as exc:  # one backend failing: say so, go on with the others
                msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                print(f"cylon-{name:8s} ERROR {msg}", flush=True)
                result["errors"].append({"backend": name, "error": msg})
                bad += 1
                continue
            diff = compare(r["answer"], want)
            r["check"] = "ok" if diff is None else f"MISMATCH: {diff}"
            bad += diff is not None
            result["ours"][name] = r
            print(f"cylon-{name:8s} {r['best_s']:8.3f}s  rounds={r['rounds']}  {r['check']}",
                  flush=True)
        peer_fns = {"duckdb": duckdb_run, "polars": polars_run}
        for p in peers:
            if p in peer_fns:
                times, got = peer_fns[p](data, args.repeat, args.k)
                diff = compare(got, want)
                result["peers"][p] = {"best_s": min(times), "median_s": float(np.median(times)),
                                      "times_s": times,
                                      "check": "ok" if diff is None else f"MISMATCH: {diff}"}
                print(f"{p:14s} {min(times):8.3f}s  {result['peers'][p]['check']}", flush=True)
        if "dask" in peers:   # last: its idle workers alone take a share of a small machine
            from .kernel_bench import DaskPeer
            dask_peer = DaskPeer(P)
            try:
                times, got = dask_run(dask_peer, data, args.repeat, args.k)
            finally:
                dask_peer.close()
            diff = compare(got, want)
            result["peers"]["dask-p2p"] = {"best_s": min(times), "median_s": float(np.median(times)),
                                           "times_s": times,
                                           "check": "ok" if diff is None else f"MISMATCH: {diff}"}
            print(f"{'dask-p2p':14s} {min(times):8.3f}s  {result['peers']['dask-p2p']['check']}",
                  flush=True)
    finally:
        for stop in stops:
            stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    result["seconds"] = time.monotonic() - t_start
    result["expected"] = want
    print()
    print(render(result))
    print(f"\n(rounds: collectives per run, all ranks in step; requests: store requests of all "
          f"ranks per run; ratios > 1 in 'dask / this' mean this is faster than Dask; total "
          f"{result['seconds']:.0f} s, load {', '.join(f'{x:.2f}' for x in result['load_after'])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if bad:
        print(f"{bad} run(s) of ours failed or differ from DuckDB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
