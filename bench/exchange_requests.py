"""Exchange over S3 and DynamoDB (moto on loopback): time, requests and dollars per exchange,
direct (one object per pair), write-combined (one object per sender) and two-level (two
combined rounds on a sqrt(P) grid), in one run.

    python -m cylon_store.bench.exchange_requests [--ranks 4,8] [--gb 1.0] [--stores s3,dynamodb]
        [--strategies direct,combined,twolevel] [--launcher local|threads]

``--launcher threads`` runs the ranks as threads of one process (for request counts at many
ranks with little data; timings then share one interpreter).

Ranks are OS processes (``cs.launch``); each counts its own store requests around the exchange
(polling LISTs included, deletes listed apart: S3 does not bill them). The request model of
``cylon_store.comm.request_model`` is printed beside the counts. Dollars at AWS list prices:
S3 $0.005 per 1,000 PUT/LIST and $0.0004 per 1,000 GET; DynamoDB on-demand $0.625 per million
write units and $0.125 per million read units.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
import uuid

import cylon_store as cs
from cylon_store import pricing
from cylon_store.comm import request_model

from . import require
from .exchange import rank_parts
from .servers import LocalMoto

# The project's one price table.
S3_PUT, S3_GET = pricing.S3_PUT_CLASS, pricing.S3_GET_CLASS
DDB_WRU, DDB_RRU = pricing.DYNAMODB_WRITE_UNIT, pricing.DYNAMODB_READ_UNIT


#: Set by run() for the threads launcher: ranks share one Store, so rank 0 alone reads its
#: counters, between waits on this barrier (which costs no store request).
_SHARED: dict = {}


def _snapshot(comm):
    sync = _SHARED.get("barrier")
    if sync is None:
        stats = comm.store.stats()
        return {"requests": dict(stats["requests"]), **stats}
    sync.wait()
    stats = comm.store.stats() if comm.rank == 0 else {"requests": {}}
    sync.wait()
    return {"requests": dict(stats["requests"]), **stats}


def rank(comm, total_bytes):
    me = comm.rank
    parts = rank_parts(comm, total_bytes)
    comm.barrier()
    before = _snapshot(comm)
    t0 = time.perf_counter()
    out = comm.exchange(parts)
    took = time.perf_counter() - t0
    after = _snapshot(comm)
    assert sum(t.num_rows for t in out) > 0 or sum(p.num_rows for p in parts) == 0
    diff = {k: after["requests"].get(k, 0) - before["requests"].get(k, 0) for k in after["requests"]}
    units = {k: after.get(k, 0) - before.get(k, 0)
             for k in ("dynamodb.write_units", "dynamodb.read_units")}
    comm.barrier()
    return {"seconds": took, "requests": diff, "units": units,
            "bytes": sum(p.nbytes for d, p in enumerate(parts) if d != me)}


def run(stores, ranks, gb, strategies=("direct", "combined", "twolevel"), launcher="local"):
    moto = LocalMoto()
    rows = []
    try:
        endpoint = moto.url
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        __import__("boto3").client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket=bucket)
        for store in stores:
            for P in ranks:
                for strategy in strategies:
                    if store == "s3":
                        url = (f"s3://{bucket}/x-{uuid.uuid4().hex[:8]}?endpoint_url={endpoint}"
                               f"&region=us-east-1")
                    else:
                        url = (f"dynamodb://bench-{uuid.uuid4().hex[:8]}?endpoint_url={endpoint}"
                               f"&region=us-east-1")
                    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
                    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
                    if launcher == "threads":
                        _SHARED["barrier"] = threading.Barrier(P)
                    res = cs.launch(rank, P, store=url, args=(int(gb * 1e9),), launcher=launcher,
                                    comm_timeout=900, exchange=strategy)
                    req: dict = {}
                    units = {"dynamodb.write_units": 0.0, "dynamodb.read_units": 0.0}
                    for r in res:
                        for k, v in r["requests"].items():
                            req[k] = req.get(k, 0) + v
                        for k, v in r["units"].items():
                            units[k] += v
                    rows.append({"store": store, "ranks": P, "strategy": strategy,
                                 "seconds": max(r["seconds"] for r in res),
                                 "gb": sum(r["bytes"] for r in res) / 1e9, "requests": req,
                                 "units": units, "model": request_model(P, strategy)})
    finally:
        moto.stop()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="4,8")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--stores", default="s3,dynamodb")
    ap.add_argument("--strategies", default="direct,combined,twolevel")
    ap.add_argument("--launcher", default="local", choices=["local", "threads"])
    args = ap.parse_args(argv)
    require("boto3", "moto")
    rows = run(args.stores.split(","), [int(r) for r in args.ranks.split(",")], args.gb,
               args.strategies.split(","), args.launcher)
    print("| store | ranks | exchange | GB crossing | seconds | GB/s | PUT-class | GET-class | LIST (polls) "
          "| model put/get | 2P√P | $ per exchange |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        q = r["requests"]
        if r["store"] == "s3":
            put = q.get("s3.PUT", 0) + q.get("s3.MULTIPART_CREATE", 0) + \
                q.get("s3.MULTIPART_PART", 0) + q.get("s3.MULTIPART_COMPLETE", 0)
            get = q.get("s3.GET", 0) + q.get("s3.HEAD", 0)
            lst = q.get("s3.LIST", 0)
            usd = (put + lst) * S3_PUT + get * S3_GET
        else:
            put = sum(v for k, v in q.items() if k.startswith("dynamodb.") and
                      k.split(".")[1] in ("PutItem", "BatchWriteItem", "UpdateItem", "DeleteItem"))
            get = sum(v for k, v in q.items() if k.startswith("dynamodb.") and
                      k.split(".")[1] in ("GetItem", "BatchGetItem"))
            lst = sum(v for k, v in q.items() if k.startswith("dynamodb.") and k.split(".")[1] in ("Query", "Scan"))
            usd = r["units"]["dynamodb.write_units"] * DDB_WRU + r["units"]["dynamodb.read_units"] * DDB_RRU
        m = r["model"]
        print(f"| {r['store']} | {r['ranks']} | {r['strategy']} | {r['gb']:.2f} | {r['seconds']:.2f} | "
              f"{r['gb'] / r['seconds']:.2f} | {put} | {get} | {lst} | {m['put']}/{m['get']} | "
              f"{2 * r['ranks'] * math.sqrt(r['ranks']):.0f} | {usd:.5f} |")


if __name__ == "__main__":
    main()
