"""S3 and DynamoDB backends against raw boto3, measured in one run against one endpoint.

    python -m cylon_store.bench.s3_bench [--quick | --full] [--out FILE.md]
    python -m cylon_store.bench.s3_bench --s3-url s3://bucket/prefix --dynamodb-url dynamodb://table

Without URLs, moto's S3/DynamoDB server is started in a child process on a free loopback port
(``moto[server]`` must be installed) and stopped at the end; with URLs, the real services (or any
endpoint given as ``?endpoint_url=...``) are measured, and the objects written are deleted.

For each backend, size and thread count: ``Store.put``/``Store.get`` of an Arrow table against
raw boto3 moving exactly the bytes the Store wrote, each thread its own key, all threads at once
(aggregate MiB/s, best of the repeats).  The facade side includes Arrow IPC encoding, xxh3
checksums and their verification on read.  Raw S3 is one ``put_object``/``get_object`` per value;
raw DynamoDB is the minimal boto3 equivalent: the bytes cut into items of the adapter's chunk
size, ``batch_write_item`` of 25 and ``batch_get_item`` of as many as fit 16 MB.  Both sides use
the same botocore settings (no SDK retries, checksums only where required, 32 connections), so
the ratio is the facade's overhead and its concurrency, not a client configuration difference.
Requests are counted on both sides and priced at AWS list prices (S3 Standard requests;
DynamoDB on-demand units), per operation.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

import cylon_store as cs

from . import require
from .servers import LocalMoto, moto_version

MiB = 1 << 20

_BOTO_CONFIG = dict(retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=32,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")


# -- helpers -------------------------------------------------------------------------------
def table_of(nbytes: int, seed: int = 0) -> pa.Table:
    rows = max(1, nbytes // 16)
    rng = np.random.default_rng(seed)
    return pa.table({"i": rng.integers(0, 2**62, rows), "f": rng.standard_normal(rows)})


def boto_client(service: str, store: cs.Store):
    """A raw boto3 client with the adapter's endpoint/region and the same botocore settings."""
    import boto3
    from botocore.config import Config
    cfg = store.adapter_config
    extra = {}
    if getattr(cfg, "addressing_style", None):
        extra["s3"] = {"addressing_style": cfg.addressing_style}
    return boto3.session.Session(profile_name=cfg.profile).client(
        service, endpoint_url=cfg.endpoint_url, region_name=cfg.region,
        config=Config(**_BOTO_CONFIG, **extra))


class RequestCounter:
    def __init__(self, client):
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        client.meta.events.register_first(
            f"before-send.{client.meta.service_model.service_id.hyphenize()}", self._count)

    def _count(self, event_name="", **_):
        with self._lock:
            self.counts[event_name.rsplit(".", 1)[-1]] += 1

    def take(self) -> Counter:
        with self._lock:
            out, self.counts = self.counts, Counter()
        return out


def run_threads(fn: Callable[[int], None], threads: int) -> float:
    """Seconds for ``threads`` threads to run ``fn(t)`` once each, started together."""
    barrier = threading.Barrier(threads + 1)
    errors: list = []

    def body(t):
        barrier.wait()
        try:
            fn(t)
        except BaseException as exc:  # report, do not hang the barrier
            errors.append(exc)

    ts = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def duel(sides: list, threads: int, nbytes: int, reps: int) -> list[float]:
    """Best aggregate MiB/s of each side over ``reps`` rounds, the sides taking turns in every
    round (so that none always runs on a warmer or quieter machine).  A side is
    ``fn(round, thread)``."""
    best = [0.0] * len(sides)
    for r in range(reps):
        for i, fn in enumerate(sides):
            secs = run_threads(lambda t: fn(r, t), threads)
            best[i] = max(best[i], threads * nbytes / MiB / secs)
    return best


# -- S3 ------------------------------------------------------------------------------------
S3_OPS = ("PutObject", "GetObject")


def s3_raw_cost(counts: Counter) -> float:
    from cylon_store.adapters.s3 import PRICE_GET_CLASS, PRICE_PUT_CLASS
    put = sum(counts[k] for k in ("PutObject", "CreateMultipartUpload", "UploadPart",
                                  "CompleteMultipartUpload", "ListObjectsV2"))
    get = counts["GetObject"] + counts["HeadObject"]
    return put * PRICE_PUT_CLASS + get * PRICE_GET_CLASS


def bench_s3(url: str, sizes, thread_counts, reps_for) -> list[dict]:
    """Raw boto3, the Store with default settings, and the Store with one request per value
    (``multipart_threshold=5GiB``: single PUT, single GET) — the last isolates the facade's own
    overhead from multipart and ranged reads, which an emulator may serve slower than S3."""
    from cylon_store.adapters.s3 import request_cost_usd
    rows = []
    sep = "&" if "?" in url else "?"
    with cs.open_store(url) as store, cs.open_store(url + sep + "multipart_threshold=5GiB") as one:
        client = boto_client("s3", store)
        counter = RequestCounter(client)
        bucket, prefix = store.adapter.bucket, store.adapter._prefix
        for size in sizes:
            table = table_of(size)
            store.put("bench/probe", table)
            blob = bytes(memoryview(store.get_bytes("bench/probe")))  # exactly what the Store wrote
            store.delete("bench/probe")
            for threads in thread_counts:
                reps = reps_for(size, threads)
                res = {"backend": "s3", "size": size, "threads": threads, "stored": len(blob)}
                key = lambda r, t: f"bench/{size}/{r}/{t}"  # noqa: E731  fresh keys: no overwrites
                key1 = lambda r, t: f"bench1/{size}/{r}/{t}"  # noqa: E731
                raw_key = lambda r, t: f"{prefix}raw/{size}/{r}/{t}"  # noqa: E731
                sides = {
                    "put": [lambda r, t: client.put_object(Bucket=bucket, Key=raw_key(r, t), Body=blob),
                            lambda r, t: store.put(key(r, t), table),
                            lambda r, t: one.put(key1(r, t), table)],
                    "get": [lambda r, t: client.get_object(Bucket=bucket, Key=raw_key(r, t))["Body"].read(),
                            lambda r, t: store.get(key(r, t)),
                            lambda r, t: one.get(key1(r, t))],
                }
                for name, fns in sides.items():
                    store.reset_stats()
                    counter.take()
                    rr, fr, f1 = duel(fns, threads, len(blob), reps)
                    n_ops = threads * reps
                    res[f"{name}_raw"], res[f"{name}_facade"], res[f"{name}_single"] = rr, fr, f1
                    # requests_total counts the adapter's backend requests (s3.PUT, ...)
                    res[f"{name}_req_facade"] = store.stats()["requests_total"] / n_ops
                    res[f"{name}_req_raw"] = sum(counter.take().values()) / n_ops
                    res[f"{name}_usd_facade"] = request_cost_usd(store.stats()) / n_ops
                    res[f"{name}_usd_raw"] = s3_raw_cost(Counter({
                        "PutObject" if name == "put" else "GetObject": 1}))
                store.delete_many([key(r, t) for r in range(reps) for t in range(threads)])
                one.delete_many([key1(r, t) for r in range(reps) for t in range(threads)])
                raw_keys = [raw_key(r, t) for r in range(reps) for t in range(threads)]
                client.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": k} for k in raw_keys], "Quiet": True})
                rows.append(res)
                _progress(res)
    return rows


# -- DynamoDB ------------------------------------------------------------------------------
def bench_dynamodb(url: str, sizes, thread_counts, reps_for) -> list[dict]:
    from cylon_store.adapters import dynamodb as D
    rows = []
    with cs.open_store(url) as store:
        store.adapter.client  # creates the table (not part of the measurement)
        client = boto_client("dynamodb", store)
        counter = RequestCounter(client)
        table_name = store.adapter.table
        chunk = store.adapter_config.chunk_size
        per_get = max(1, min(D.BATCH_GET_KEYS, D.BATCH_GET_BYTES // D.MAX_ITEM_SIZE))
        for size in sizes:
            table = table_of(size)
            store.put("bench/probe", table)
            blob = bytes(memoryview(store.get_bytes("bench/probe")))
            store.delete("bench/probe")
            pieces = [blob[i:i + chunk] for i in range(0, len(blob), chunk)]
            for threads in thread_counts:
                reps = reps_for(size, threads)
                res = {"backend": "dynamodb", "size": size, "threads": threads, "stored": len(blob)}
                key = lambda r, t: f"bench/{size}/{r}/{t}"  # noqa: E731  fresh keys: no overwrites
                units = {"w": 0.0, "r": 0.0}
                units_lock = threading.Lock()

                def chunk_keys(r, t):
                    return [{"pk": {"S": f"raw#{size}#{r}#{t}#{i}"}, "sk": {"S": "-"}}
                            for i in range(len(pieces))]

                def r_put(r, t):
                    items = [{**k, "b": {"B": p}} for k, p in zip(chunk_keys(r, t), pieces)]
                    w = sum(math.ceil(D._item_size(it) / D.WRITE_UNIT) for it in items)
                    for i in range(0, len(items), D.BATCH_WRITE_ITEMS):
                        reqs = [{"PutRequest": {"Item": it}} for it in items[i:i + D.BATCH_WRITE_ITEMS]]
                        while reqs:
                            out = client.batch_write_item(RequestItems={table_name: reqs})
                            reqs = out.get("UnprocessedItems", {}).get(table_name, [])
                    with units_lock:
                        units["w"] += w

                def r_get(r, t):
                    keys_ = chunk_keys(r, t)
                    got = {}
                    ru = 0
                    for i in range(0, len(keys_), per_get):
                        pending = keys_[i:i + per_get]
                        while pending:
                            out = client.batch_get_item(RequestItems={
                                table_name: {"Keys": pending, "ConsistentRead": True}})
                            for it in out["Responses"][table_name]:
                                got[it["pk"]["S"]] = it["b"]["B"]
                                ru += math.ceil(D._item_size(it) / D.READ_UNIT)
                            pending = out.get("UnprocessedKeys", {}).get(table_name, {}).get("Keys", [])
                    b"".join(got[k["pk"]["S"]] for k in keys_)
                    with units_lock:
                        units["r"] += ru

                def f_put(r, t):
                    store.put(key(r, t), table)

                def f_get(r, t):
                    store.get(key(r, t))

                for name, r, f, unit, price in (("put", r_put, f_put, "w", D.PRICE_WRITE_UNIT),
                                                ("get", r_get, f_get, "r", D.PRICE_READ_UNIT)):
                    store.reset_stats()
                    counter.take()
                    units[unit] = 0.0
                    rr, fr = duel([r, f], threads, len(blob), reps)
                    n_ops = threads * reps
                    res[f"{name}_raw"], res[f"{name}_facade"] = rr, fr
                    res[f"{name}_req_facade"] = store.stats()["requests_total"] / n_ops
                    res[f"{name}_req_raw"] = sum(counter.take().values()) / n_ops
                    res[f"{name}_usd_facade"] = D.request_cost_usd(store.stats()) / n_ops
                    res[f"{name}_usd_raw"] = units[unit] * price / n_ops
                store.delete_many([key(r, t) for r in range(reps) for t in range(threads)])
                dels = [{"DeleteRequest": {"Key": k}} for r in range(reps) for t in range(threads)
                        for k in chunk_keys(r, t)]
                for i in range(0, len(dels), D.BATCH_WRITE_ITEMS):
                    client.batch_write_item(RequestItems={table_name: dels[i:i + D.BATCH_WRITE_ITEMS]})
                rows.append(res)
                _progress(res)
    return rows


# -- report --------------------------------------------------------------------------------
def _progress(res: dict) -> None:
    def side(name):
        text = (f"{name} raw {res[name + '_raw']:6.0f}, Store {res[name + '_facade']:6.0f} "
                f"({res[name + '_facade'] / res[name + '_raw']:.2f}x)")
        if name + "_single" in res:
            text += f", 1-req {res[name + '_single']:6.0f} ({res[name + '_single'] / res[name + '_raw']:.2f}x)"
        return text
    print(f"  {res['backend']:8s} {res['size'] // MiB:4d} MiB x{res['threads']}: {side('put')}; "
          f"{side('get')} MiB/s", file=sys.stderr, flush=True)


def _usd(x: float) -> str:
    return f"{x * 1e6:.2f}"


def report(rows: list[dict], command: str, where: str, elapsed: float) -> str:
    import boto3
    import botocore
    lines = [
        "## S3 and DynamoDB: Store vs raw boto3",
        "",
        f"Command: `{command}` ({elapsed:.0f} s). Endpoint: {where}. "
        f"boto3 {boto3.__version__}, botocore {botocore.__version__}, moto {moto_version()}, "
        f"pyarrow {pa.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs.",
        "",
        "Aggregate MiB/s over all threads (each thread its own key, fresh keys every round), best "
        "of the rounds, the sides taking turns; ratio = Store / raw (target >= 0.9). "
        "Requests and cost (micro-dollars) are per operation, from the requests counted on both "
        "sides, at AWS list prices: S3 $0.005 per 1,000 PUT-class and $0.0004 per 1,000 "
        "GET-class requests; DynamoDB on-demand $0.625 per million write units and $0.125 per "
        "million read units.",
        "",
    ]
    s3 = [r for r in rows if r["backend"] == "s3"]
    if s3:
        lines += [
            "### S3",
            "",
            "*Store* uses the defaults (multipart above 32 MiB in 16 MiB parts, reads above 32 MiB "
            "as concurrent 16 MiB ranges); *1-req* is the Store with `multipart_threshold=5GiB` "
            "(one PUT, one GET per value, like raw), which isolates the facade's own cost.",
            "",
            "| size | threads | put raw | put Store | ratio | put 1-req | ratio | get raw | get Store "
            "| ratio | get 1-req | ratio | requests put, get: Store / raw | cost put, get: Store / raw (µ$) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in s3:
            lines.append(
                f"| {r['size'] // MiB} MiB | {r['threads']} "
                f"| {r['put_raw']:.0f} | {r['put_facade']:.0f} | {r['put_facade'] / r['put_raw']:.2f} "
                f"| {r['put_single']:.0f} | {r['put_single'] / r['put_raw']:.2f} "
                f"| {r['get_raw']:.0f} | {r['get_facade']:.0f} | {r['get_facade'] / r['get_raw']:.2f} "
                f"| {r['get_single']:.0f} | {r['get_single'] / r['get_raw']:.2f} "
                f"| {r['put_req_facade']:.0f}, {r['get_req_facade']:.0f} / "
                f"{r['put_req_raw']:.0f}, {r['get_req_raw']:.0f} "
                f"| {_usd(r['put_usd_facade'])}, {_usd(r['get_usd_facade'])} / "
                f"{_usd(r['put_usd_raw'])}, {_usd(r['get_usd_raw'])} |")
        lines.append("")
    ddb = [r for r in rows if r["backend"] == "dynamodb"]
    if ddb:
        lines += [
            "### DynamoDB",
            "",
            "Raw: the bytes cut into items of the adapter's chunk size, `batch_write_item` of 25, "
            "`batch_get_item` strongly consistent, one thread per value.  Store: chunk items in "
            "batches of `batch_bytes` (2 MiB), 4 in flight, then the commit item; reads the commit "
            "item (strongly consistent) and the chunks (eventually consistent, immutable).",
            "",
            "| size | threads | put raw | put Store | ratio | get raw | get Store | ratio "
            "| requests put, get: Store / raw | cost put, get: Store / raw (µ$) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in ddb:
            lines.append(
                f"| {r['size'] // MiB} MiB | {r['threads']} "
                f"| {r['put_raw']:.1f} | {r['put_facade']:.1f} | {r['put_facade'] / r['put_raw']:.2f} "
                f"| {r['get_raw']:.1f} | {r['get_facade']:.1f} | {r['get_facade'] / r['get_raw']:.2f} "
                f"| {r['put_req_facade']:.1f}, {r['get_req_facade']:.1f} / "
                f"{r['put_req_raw']:.1f}, {r['get_req_raw']:.1f} "
                f"| {_usd(r['put_usd_facade'])}, {_usd(r['get_usd_facade'])} / "
                f"{_usd(r['put_usd_raw'])}, {_usd(r['get_usd_raw'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--s3-url", help="s3://bucket/prefix[?endpoint_url=...] (default: local moto)")
    ap.add_argument("--dynamodb-url", help="dynamodb://table[?region=...] (default: local moto)")
    ap.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    ap.add_argument("--full", action="store_true", help="also DynamoDB at 128 MiB, more repeats")
    ap.add_argument("--skip", choices=("s3", "dynamodb"), action="append", default=[])
    ap.add_argument("--out", help="write the markdown section to this file")
    args = ap.parse_args(argv)
    require("boto3", *([] if (args.s3_url and args.dynamodb_url) else ["moto"]))

    moto = None
    s3_url, ddb_url = args.s3_url, args.dynamodb_url
    where = "given URLs"
    if not (s3_url and ddb_url):
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        moto = LocalMoto()
        where = f"moto {moto_version()} server (one Python process) on 127.0.0.1"
        import boto3
        boto3.session.Session().client("s3", endpoint_url=moto.url, region_name="us-east-1") \
            .create_bucket(Bucket="cylon-bench")
        s3_url = s3_url or f"s3://cylon-bench/run-{uuid.uuid4().hex[:8]}?endpoint_url={moto.url}&region=us-east-1"
        ddb_url = ddb_url or (f"dynamodb://cylon-bench-{uuid.uuid4().hex[:8]}?endpoint_url={moto.url}"
                              f"&region=us-east-1")
    s3_sizes = [1 * MiB, 16 * MiB] if args.quick else [1 * MiB, 16 * MiB, 128 * MiB]
    ddb_sizes = [1 * MiB] if args.quick else ([1 * MiB, 16 * MiB, 128 * MiB] if args.full
                                              else [1 * MiB, 16 * MiB])

    def reps_for(size, threads):
        total = size * threads
        reps = 6 if total <= MiB else 4 if total <= 16 * MiB else 2 if total <= 128 * MiB else 1
        return reps * 2 if args.full else reps

    def ddb_reps_for(size, threads):  # the emulated DynamoDB moves ~10-40 MiB/s
        total = size * threads
        reps = 4 if total <= MiB else 2 if total <= 16 * MiB else 1
        return reps * 2 if args.full else reps

    start = time.perf_counter()
    rows = []
    try:
        if "s3" not in args.skip:
            rows += bench_s3(s3_url, s3_sizes, (1, 8), reps_for)
        if "dynamodb" not in args.skip:
            rows += bench_dynamodb(ddb_url, ddb_sizes, (1, 8), ddb_reps_for)
    finally:
        if moto is not None:
            moto.stop()
    command = "python -m cylon_store.bench.s3_bench" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out")
        and not (a.endswith(".md")))
    text = report(rows, command, where, time.perf_counter() - start)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
