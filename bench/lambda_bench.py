"""Serverless runs on the local Lambda service: start-up and the per-job cost of a join query.

    python -m cylon_store.bench.lambda_bench [--ranks 4,16,64] [--cost-ranks 4,16]
        [--stores s3,dynamodb,redis] [--rows 1000000] [--out FILE]

1. **Start-up.** ``cs.launch(fn, P, launcher="lambda")`` against the local Lambda service (every
   invocation in AWS's runtime interface client, one environment per rank): per rank cold and
   warm start (the service's init and queue times), and the time from ``launch`` to every rank
   connected (each rank's clock after ``connect`` returned), cold and then warm — beside the same
   figure for ``launcher="local"`` (plain rank processes) measured in the same run, the baseline.
2. **Cost.** The Big Data Benchmark's join query (query 3: rankings JOIN uservisits on URL, a
   visit-date filter, revenue summed by source IP, the top source) on synthetic data, through
   S3 and DynamoDB (moto's server on loopback) and Redis (redis-server on loopback): each run's
   report — Lambda GB-seconds, invocations, store requests — priced at AWS list prices
   (``cylon_store.pricing``). Seconds are this machine's (2 cores shared by every rank); the
   request counts and GB-seconds are what AWS would bill for the same work at 1,769 MB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc

import cylon_store as cs

from . import require
from .workloads import bdb_tables

MEMORY_MB = 1769  # one full vCPU on Lambda


def rank_connected(comm, t0):
    """Seconds from the driver's launch to this rank's communicator being ready."""
    ready = time.time() - t0
    comm.barrier()
    return ready


# -- the BDB join query (query 3) ----------------------------------------------------------------

def rank_bdb_join(comm, rows):
    from cylon_store import kernel as K
    rankings, visits = bdb_tables(comm.rank, comm.world_size, rows)
    visits = visits.filter(pc.and_(pc.greater_equal(visits["visitDate"], 1000),
                                   pc.less(visits["visitDate"], 2000)))
    joined = K.join(comm, rankings, visits, left_on="pageURL", right_on="destURL")
    per_ip = K.groupby(comm, joined, "sourceIP", [("adRevenue", "sum"), ("pageRank", "mean")])
    top = per_ip.sort_by([("adRevenue_sum", "descending")]).slice(0, 1)
    best = pa.concat_tables(comm.allgather(top))
    return best.sort_by([("adRevenue_sum", "descending")]).slice(0, 1).to_pylist()


# -- driver ---------------------------------------------------------------------------------------

def startup(service, ranks: list, store_url: str) -> list:
    rows = []
    for P in ranks:
        for phase in ("cold", "warm"):
            before = len(service.invocations())
            t0 = time.time()
            ready = cs.launch(rank_connected, P, store=store_url, launcher="lambda",
                              function=service.function, args=(t0,), timeout=900, comm_timeout=600)
            wall = time.time() - t0
            recs = service.invocations()[before:]
            init = [r["init_ms"] for r in recs if r["cold"]]
            rows.append({"ranks": P, "phase": phase, "connected_s": max(ready), "wall_s": wall,
                         "cold": sum(1 for r in recs if r["cold"]),
                         "init_ms_median": statistics.median(init) if init else 0.0,
                         "queued_ms_max": max((r["queued_ms"] for r in recs), default=0.0)})
        t0 = time.time()
        ready = cs.launch(rank_connected, P, store=store_url, launcher="local", args=(t0,),
                          timeout=900, comm_timeout=600)
        rows.append({"ranks": P, "phase": "local processes", "connected_s": max(ready),
                     "wall_s": time.time() - t0, "cold": P, "init_ms_median": 0.0, "queued_ms_max": 0.0})
        service.stop_idle()
    return rows


def costs(service, ranks: list, stores: dict, rows: int) -> list:
    out = []
    answers = set()
    for P in ranks:
        # Warm P environments first, so that every store's run is billed the same way (warm).
        cs.launch(rank_connected, P, store=next(iter(stores.values())), launcher="lambda",
                  function=service.function, args=(time.time(),), timeout=900, comm_timeout=600)
        for name, url in stores.items():
            values, report = cs.launch(rank_bdb_join, P, store=url, launcher="lambda",
                                       function=service.function, args=(rows,), timeout=900,
                                       comm_timeout=600, report=True)
            top = values[0][0]
            answers.add((top["sourceIP"], round(top["adRevenue_sum"], 6)))
            out.append({"store": name, "ranks": P, "report": report})
    if len(answers) != len(ranks):  # the same answer on every store (per world size: same data)
        raise AssertionError(f"stores disagree on the query's answer: {answers}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="4,16,64", help="world sizes for the start-up part")
    ap.add_argument("--cost-ranks", default="4,16", help="world sizes for the cost part")
    ap.add_argument("--stores", default="s3,dynamodb,redis")
    ap.add_argument("--rows", type=int, default=1_000_000, help="uservisits rows (rankings: rows/10)")
    ap.add_argument("--skip", choices=("startup", "cost"), action="append", default=[])
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args(argv)
    stores = [s for s in args.stores.split(",") if s]
    require("boto3", "awslambdaric", *(["moto"] if {"s3", "dynamodb"} & set(stores) else []),
            *(["redis"] if "redis" in stores else []), extra="bench,lambda")
    from cylon_store.serverless.local import LocalLambda

    from .servers import LocalMoto, LocalRedis

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    started: list[LocalMoto | LocalRedis] = []
    lines = [f"# Lambda benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})", ""]
    try:
        urls = {}
        if {"s3", "dynamodb"} & set(stores):
            moto = LocalMoto()
            started.append(moto)
            import boto3
            boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket="cylon-bench")
            if "s3" in stores:
                urls["s3"] = f"s3://cylon-bench/run-{uuid.uuid4().hex[:8]}?endpoint_url={moto.url}&region=us-east-1"
            if "dynamodb" in stores:
                urls["dynamodb"] = (f"dynamodb://cylon-bench-{uuid.uuid4().hex[:8]}?endpoint_url={moto.url}"
                                    f"&region=us-east-1")
        if "redis" in stores:
            redis = LocalRedis()
            started.append(redis)
            urls["redis"] = redis.url
        ranks = [int(r) for r in args.ranks.split(",") if r]
        with LocalLambda(function="cylon-bench", memory_mb=MEMORY_MB, timeout_s=900,
                         concurrency=max(ranks + [int(r) for r in args.cost_ranks.split(",")]),
                         log=open(os.devnull, "w")) as service:
            os.environ["AWS_ENDPOINT_URL_LAMBDA"] = service.url  # the driver's path on AWS, here
            if "startup" not in args.skip:
                start_url = urls.get("redis") or next(iter(urls.values()))
                lines += ["## Start-up: launch to every rank connected", "",
                          f"Store {start_url.split('://')[0]}; cold = new environments, warm = the "
                          f"same launch again; baseline = launcher='local' (plain processes).", "",
                          "| ranks | run | launch → all connected (s) | ratio to local | wall (s) | "
                          "cold starts | init per cold start, median (ms) | longest queue (ms) |",
                          "|---:|---|---:|---:|---:|---:|---:|---:|"]
                rows = startup(service, ranks, start_url)
                base = {r["ranks"]: r["connected_s"] for r in rows if r["phase"] == "local processes"}
                for r in rows:
                    lines.append(f"| {r['ranks']} | {r['phase']} | {r['connected_s']:.2f} | "
                                 f"{r['connected_s'] / base[r['ranks']]:.2f} | {r['wall_s']:.2f} | "
                                 f"{r['cold']} | {r['init_ms_median']:.0f} | {r['queued_ms_max']:.0f} |")
                print("\n".join(lines), flush=True)
            if "cost" not in args.skip:
                res = costs(service, [int(r) for r in args.cost_ranks.split(",")], urls, args.rows)
                lines += ["", f"## Cost of the BDB join query ({args.rows:,} visits, "
                          f"{args.rows // 10:,} pages), {MEMORY_MB} MB functions", "",
                          "| store | ranks | wall (s) | GB-s | store requests | Lambda compute $ | "
                          "Lambda requests $ | store $ | total $ | total vs cheapest |",
                          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
                for P in sorted({r["ranks"] for r in res}):
                    group = [r for r in res if r["ranks"] == P]
                    cheapest = min(r["report"].dollars["total"] for r in group)
                    for r in group:
                        rep = r["report"]
                        d = rep.dollars
                        lines.append(f"| {r['store']} | {P} | {rep.wall_seconds:.2f} | {rep.gb_seconds:.2f} | "
                                     f"{rep.store_requests_total:,} | {d['lambda_compute']:.6f} | "
                                     f"{d['lambda_requests']:.7f} | {d[rep.store]:.6f} | {d['total']:.6f} | "
                                     f"{d['total'] / cheapest:.2f} |")
                print("\n".join(lines[-(len(res) + 4):]), flush=True)
    finally:
        for s in started:
            s.stop()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
