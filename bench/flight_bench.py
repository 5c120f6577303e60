"""The shuffle service (``flight://``) against bare Arrow Flight and against Redis, in one run.

    python -m cylon_store.bench.flight_bench [--parts io,exchange,spill] [--sizes 1,16,128,512]
                                             [--ranks 4,8] [--gb 1.0] [--quick] [--json PATH]

Every server is a separate process on a free loopback port, started by this benchmark and
stopped by its PID at the end; the client side is this process (io) or rank processes started
by ``cs.launch`` (exchange, spill).  Three parts, each a ratio against a baseline of the same run:

1. io: ``Store.put``/``Store.get`` of one table (4 int64 columns of random data; ``+str`` adds a
   string column of 16 random characters per row) through ``cs.open_store("flight://...")``
   against raw ``pyarrow.flight`` ``do_put``/``do_get`` of the same table to a *bare* Flight
   server (a minimal ``FlightServerBase`` keeping the received table in a dict and returning a
   ``RecordBatchStream``; no token, no checksums, no atomic commit).  The raw put sends batches
   of about 16 MiB (``--raw-batch-mib``), the service's message size.  Raw and cylon runs
   alternate (raw put, cylon put, raw get, cylon get) so that they share the noise; best of N.
   A component table times the pieces of the cylon path separately (codec encode, the adapter's
   DoPut, the adapter's DoGet, codec verify + decode, one DoAction round trip on each server).
2. exchange: an all-to-all ``comm.exchange`` of ``--gb`` GB in total at each ``--ranks``, over
   ``flight://`` and over ``redis://`` (a redis-server started here, ``--save '' --appendonly
   no``), the same data (``bench.exchange.rank_parts``), timed barrier to barrier, slowest rank,
   best of ``--exchange-repeat`` inside one launch; flight and redis launches alternate.  Rank 0
   also reads the server process' CPU time (``/proc``) around each exchange, and every rank its
   own, so that the table says where the time went.
3. spill: the same exchange at ``--spill-ranks`` ranks against a service whose
   ``--memory-limit`` is 1/4 of the data (with ``--spill-dir`` in a temp dir) and against a
   service whose limit is above the data (same spill dir option): both times, the slowdown, the
   peak of the service's ``bytes_disk`` (polled from this process every 25 ms), and the number
   of files left in the spill directory after the exchange (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

import numpy as np
import pyarrow as pa

import cylon_store as cs

from . import require
from .servers import LocalRedis, Server, redis_binary, service_url, start_service

MiB = 1 << 20


# -- servers (separate processes, stopped by PID) ------------------------------------------------
def start_bare() -> Server:
    return Server([sys.executable, "-m", "cylon_store.bench.flight_bench", "--bare-server"],
                  name="the bare Flight server")


# -- the bare Flight server (run as its own process: --bare-server) ------------------------------
def serve_bare() -> int:
    import pyarrow.flight as flight

    class BareServer(flight.FlightServerBase):
        """DoPut keeps the received table in a dict; DoGet streams it back.  Nothing else."""

        def __init__(self):
            super().__init__("grpc://127.0.0.1:0")
            self.tables: dict = {}

        def do_put(self, context, descriptor, reader, writer):
            self.tables[descriptor.command] = reader.read_all()

        def do_get(self, context, ticket):
            return flight.RecordBatchStream(self.tables[ticket.ticket])

        def do_action(self, context, action):
            if action.type == "delete":
                self.tables.pop(action.body.to_pybytes(), None)
            return []

    server = BareServer()
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    print(f"serving grpc://127.0.0.1:{server.port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0


# -- data -------------------------------------------------------------------------------------------
def make_table(nbytes: int, strings: bool = False, seed: int = 0) -> pa.Table:
    """About ``nbytes`` of 4 random int64 columns (plus one 16-character string column)."""
    rng = np.random.default_rng(seed)
    width = 32 + (4 + 16 if strings else 0)
    rows = max(1, nbytes // width)
    cols = {f"i{c}": rng.integers(0, 1 << 62, rows) for c in range(4)}
    if strings:
        chars = rng.integers(ord("a"), ord("z") + 1, rows * 16, dtype=np.uint8)
        offsets = np.arange(0, rows * 16 + 1, 16, dtype=np.int32)
        cols["s"] = pa.Array.from_buffers(pa.string(), rows,
                                          [None, pa.py_buffer(offsets), pa.py_buffer(chars)])
    return pa.table(cols)


def default_repeat(mib: int) -> int:
    return 20 if mib <= 1 else 10 if mib <= 16 else 5 if mib <= 128 else 3


# -- 1. io ----------------------------------------------------------------------------------------
def io_part(service: Server, bare: Server, token: str, sizes, variants, repeat_override,
            raw_batch_mib: int):
    import pyarrow.flight as flight

    from cylon_store import codec

    store = cs.open_store(service_url(service, token, prefix=f"io-{uuid.uuid4().hex[:8]}/"))
    raw = flight.FlightClient(bare.url)
    rows, comps = [], []
    try:
        for strings in variants:
            for mib in sizes:
                table = make_table(mib * MiB, strings)
                n = repeat_override or default_repeat(mib)
                key = f"t{mib}{'s' if strings else ''}"
                rkey = key.encode()
                nbytes = table.nbytes
                # The raw side sends batches of about raw_batch_mib (the service's own message
                # size by default): one huge gRPC message is much slower (see BENCHMARKS.md).
                max_rows = max(1, table.num_rows * raw_batch_mib * MiB // nbytes) \
                    if raw_batch_mib else None

                def raw_put():
                    writer, _ = raw.do_put(flight.FlightDescriptor.for_command(rkey), table.schema)
                    writer.write_table(table, max_chunksize=max_rows)
                    writer.close()

                def raw_get():
                    return raw.do_get(flight.Ticket(rkey)).read_all()

                ops: dict[str, Callable] = {
                    "raw put": raw_put,
                    "cylon put": lambda: store.put(key, table),
                    "raw get": raw_get,
                    "cylon get": lambda: store.get(key),
                }
                t = {op: float("inf") for op in ops}
                for op, fn in ops.items():   # warm-up: connections, first allocations
                    fn()
                for _ in range(n):
                    for op, fn in ops.items():
                        t0 = time.perf_counter()
                        out = fn()
                        t[op] = min(t[op], time.perf_counter() - t0)
                        del out
                got = store.get(key)
                assert got.equals(table), "the table read back differs"
                del got

                # The cylon path in pieces (same process, same objects).
                o = store.options
                where: Callable[[], dict] = dict
                c = {k: float("inf") for k in ("encode", "adapter put", "adapter get", "decode",
                                               "cylon action", "raw action")}
                ad = store.adapter
                for _ in range(n):
                    t0 = time.perf_counter()
                    chunks = list(codec.encode(table, compression=o.compression,
                                               segment_size=o.segment_size))
                    c["encode"] = min(c["encode"], time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    ad.put(key + "-raw", iter(chunks))
                    c["adapter put"] = min(c["adapter put"], time.perf_counter() - t0)
                    del chunks
                    t0 = time.perf_counter()
                    buf = ad.get(key + "-raw")
                    c["adapter get"] = min(c["adapter get"], time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    got = codec.decode(buf, where)
                    c["decode"] = min(c["decode"], time.perf_counter() - t0)
                    del got, buf
                    t0 = time.perf_counter()
                    ad.head(key + "-raw")
                    c["cylon action"] = min(c["cylon action"], time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    list(raw.do_action(flight.Action("ping", b"")))
                    c["raw action"] = min(c["raw action"], time.perf_counter() - t0)
                store.delete(key)
                store.delete(key + "-raw")
                list(raw.do_action(flight.Action("delete", rkey)))

                label = "int64x4+str" if strings else "int64x4"
                gbs = {op: nbytes / t[op] / 1e9 for op in t}
                row = {"table": label, "MiB": mib, "bytes": nbytes, "best of": n,
                       "raw put GB/s": gbs["raw put"], "cylon put GB/s": gbs["cylon put"],
                       "put ratio": t["raw put"] / t["cylon put"],
                       "raw get GB/s": gbs["raw get"], "cylon get GB/s": gbs["cylon get"],
                       "get ratio": t["raw get"] / t["cylon get"],
                       **{f"{op} ms": 1e3 * t[op] for op in t}}
                rows.append(row)
                comps.append({"table": label, "MiB": mib,
                              "raw put ms": 1e3 * t["raw put"], "cylon put ms": 1e3 * t["cylon put"],
                              "encode ms": 1e3 * c["encode"], "adapter put ms": 1e3 * c["adapter put"],
                              "raw get ms": 1e3 * t["raw get"], "cylon get ms": 1e3 * t["cylon get"],
                              "adapter get ms": 1e3 * c["adapter get"], "decode ms": 1e3 * c["decode"],
                              "cylon action ms": 1e3 * c["cylon action"],
                              "raw action ms": 1e3 * c["raw action"]})
                print(f"  {label:12s} {mib:4d} MiB (best of {n:2d}): put {gbs['cylon put']:.2f} vs "
                      f"raw {gbs['raw put']:.2f} GB/s ({row['put ratio']:.2f}x), get "
                      f"{gbs['cylon get']:.2f} vs raw {gbs['raw get']:.2f} GB/s "
                      f"({row['get ratio']:.2f}x)", flush=True)
                del table
    finally:
        store.close()
        raw.close()
    return rows, comps


# -- 2. exchange ----------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exchange_rank(comm, total_bytes: int, repeat: int, server_pid: int = 0):
    """Time ``repeat`` exchanges barrier to barrier; rank 0 also reads the server's CPU time."""
    from cylon_store.bench.exchange import rank_parts

    me = comm.rank
    parts = rank_parts(comm, total_bytes)
    crossing = sum(p.nbytes for d, p in enumerate(parts) if d != me)
    times, cpu, server_cpu = [], [], []
    received_rows = 0
    watch = me == 0 and server_pid and os.path.exists(f"/proc/{server_pid}/stat")
    for _ in range(repeat):
        comm.barrier()
        s0 = cpu_seconds(server_pid) if watch else 0.0
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = comm.exchange(parts)
        comm.barrier()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        server_cpu.append(cpu_seconds(server_pid) - s0 if watch else float("nan"))
        received_rows = sum(t.num_rows for t in out)
        del out
    return {"times": times, "cpu": cpu, "server_cpu": server_cpu, "crossing": crossing,
            "rows_sent": sum(p.num_rows for p in parts), "rows_received": received_rows}


def run_exchange(url: str, ranks: int, gb: float, repeat: int, server_pid: int = 0) -> dict:
    res = cs.launch(exchange_rank, ranks, store=url, launcher="local",
                    args=(int(gb * 1e9), repeat, server_pid), comm_timeout=600)
    per_iter = [max(r["times"][i] for r in res) for i in range(repeat)]
    sent = sum(r["rows_sent"] for r in res)
    got = sum(r["rows_received"] for r in res)
    if sent != got:
        raise RuntimeError(f"the exchange lost rows: {sent} sent, {got} received")
    i = per_iter.index(min(per_iter))
    return {"s": per_iter[i], "all s": per_iter,
            "ranks cpu s": sum(r["cpu"][i] for r in res), "server cpu s": res[0]["server_cpu"][i],
            "gb_crossing": sum(r["crossing"] for r in res) / 1e9}


def exchange_part(service: Server, redis: LocalRedis, token: str, ranks, gb: float, repeat: int):
    rows = []
    for P in ranks:
        best: dict = {}
        # Alternate the stores launch by launch (flight, redis, flight, redis ...).
        for store in ("flight", "redis"):
            url = service_url(service, token) if store == "flight" else redis.url
            pid = service.pid if store == "flight" else redis.pid
            b = best[store] = run_exchange(url, P, gb, repeat, pid)
            print(f"  {store:6s} {P} ranks: {b['s']:.3f} s (all: "
                  f"{', '.join(f'{x:.3f}' for x in b['all s'])}); in the best: server CPU "
                  f"{b['server cpu s']:.2f} s, ranks' CPU {b['ranks cpu s']:.2f} s; load {load()}",
                  flush=True)
        f, r = best["flight"], best["redis"]
        rows.append({"ranks": P, "GB crossing ranks": f["gb_crossing"],
                     "flight s": f["s"], "flight GB/s": f["gb_crossing"] / f["s"],
                     "redis s": r["s"], "redis GB/s": r["gb_crossing"] / r["s"],
                     "ratio redis/flight": r["s"] / f["s"],
                     "flight server CPU s": f["server cpu s"], "flight ranks CPU s": f["ranks cpu s"],
                     "redis server CPU s": r["server cpu s"], "redis ranks CPU s": r["ranks cpu s"],
                     "flight all s": f["all s"], "redis all s": r["all s"]})
    return rows


# -- 3. spill ---------------------------------------------------------------------------------------
class StatsPoller:
    """Polls the service's stats from this process; keeps the peaks."""

    def __init__(self, url: str, period: float = 0.025):
        self.store = cs.open_store(url)
        self.period = period
        self.peak = {"bytes_disk": 0, "bytes_memory": 0, "objects_on_disk": 0, "memory_reserved": 0}
        self.spilled = False
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            s = self.store.adapter.server_stats()
            self.polls += 1
            for k in self.peak:
                self.peak[k] = max(self.peak[k], int(s.get(k, 0)))
            self.spilled |= bool(s.get("spilling"))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.stats = self.store.adapter.server_stats()
        self.store.close()


def files_under(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def spill_part(token: str, ranks: int, gb: float, repeat: int):
    data = int(gb * 1e9)
    low_limit = data // 4
    high_limit = max(2 << 30, 2 * data)
    root = tempfile.mkdtemp(prefix="cylon-flight-bench-spill-")
    dirs = {"spill": os.path.join(root, "low"), "in memory": os.path.join(root, "high")}
    limits = {"spill": low_limit, "in memory": high_limit}
    servers: dict = {}
    rows = []
    try:
        for mode in ("spill", "in memory"):
            os.makedirs(dirs[mode])
            servers[mode] = start_service("--memory-limit", str(limits[mode]),
                                          "--spill-dir", dirs[mode], token=token)
        result: dict = {}
        for mode in ("spill", "in memory"):   # alternate; each launch does `repeat` exchanges
            url = service_url(servers[mode], token)
            with StatsPoller(url) as poll:
                r = run_exchange(url, ranks, gb, repeat, servers[mode].pid)
            left = files_under(dirs[mode])
            result[mode] = {**r, "peak": dict(poll.peak), "spilling_seen": poll.spilled,
                            "polls": poll.polls, "after": poll.stats, "files_left": left}
            print(f"  {mode:9s} limit {limits[mode] / MiB:.0f} MiB: {r['s']:.3f} s (all: "
                  f"{', '.join(f'{x:.3f}' for x in r['all s'])}), peak on disk "
                  f"{poll.peak['bytes_disk'] / MiB:.0f} MiB, peak in memory "
                  f"{poll.peak['bytes_memory'] / MiB:.0f} MiB, files left {left}", flush=True)
        for mode in ("spill", "in memory"):
            servers[mode].stop()
        base = result["in memory"]["s"]
        for mode in ("spill", "in memory"):
            r = result[mode]
            rows.append({"service": mode, "ranks": ranks, "memory limit MiB": limits[mode] / MiB,
                         "GB crossing ranks": r["gb_crossing"], "s": r["s"],
                         "GB/s": r["gb_crossing"] / r["s"], "slowdown": r["s"] / base,
                         "peak disk MiB": r["peak"]["bytes_disk"] / MiB,
                         "peak memory MiB": r["peak"]["bytes_memory"] / MiB,
                         "files left": r["files_left"],
                         "server CPU s": r["server cpu s"], "ranks CPU s": r["ranks cpu s"],
                         "spill dir after stop": files_under(dirs[mode]),
                         "all s": r["all s"], "after": r["after"]})
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


# -- report ---------------------------------------------------------------------------------------
def text_table(rows: list, cols: list, fmt: dict) -> str:
    """An aligned Markdown table (readable as text, pasteable as Markdown)."""
    def cell(r, c):
        v = r[c]
        return fmt.get(c, "{}").format(v) if isinstance(v, (int, float)) else str(v)
    cells = [[cell(r, c) for c in cols] for r in rows]
    width = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r[c], (int, float)) for r in rows) for c in cols]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, width)) + " |",
             "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                            for w, n in zip(width, numeric)) + "|"]
    for x in cells:
        lines.append("| " + " | ".join(v.rjust(w) if n else v.ljust(w)
                                       for v, w, n in zip(x, width, numeric)) + " |")
    return "\n".join(lines)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="io,exchange,spill", help="any of io,exchange,spill")
    ap.add_argument("--sizes", default="1,16,128,512", help="MiB per table (io)")
    ap.add_argument("--variants", default="int,str",
                    help="io tables: int (4 int64 columns), str (plus a string column)")
    ap.add_argument("--repeat", type=int, default=0,
                    help="io repeats per size (default: 20 at 1 MiB, 10 to 16, 5 to 128, else 3)")
    ap.add_argument("--raw-batch-mib", type=int, default=16,
                    help="raw do_put sends batches of about this many MiB (default 16, the "
                         "service's message size; 0: the table as one batch)")
    ap.add_argument("--ranks", default="4,8", help="ranks of the exchange part")
    ap.add_argument("--gb", type=float, default=1.0, help="total data of an exchange, GB")
    ap.add_argument("--exchange-repeat", type=int, default=3,
                    help="exchanges per launch, best taken (exchange and spill)")
    ap.add_argument("--spill-ranks", type=int, default=4)
    ap.add_argument("--no-token", action="store_true",
                    help="run the service without a bearer token (default: a random token)")
    ap.add_argument("--quick", action="store_true",
                    help="sizes 1,16,64 MiB, 0.25 GB, fewer repeats (< 1 min)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.bare_server:
        return serve_bare()
    if a.quick:
        a.sizes, a.gb, a.exchange_repeat = "1,16,64", 0.25, 2
        a.repeat = a.repeat or 5
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = set(parts) - {"io", "exchange", "spill"}
    if unknown:
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}: choose from io,exchange,spill")
    try:
        import pyarrow.flight  # noqa: F401
    except ImportError as exc:
        # pyarrow/flight.py exists even in builds without Flight: only the import tells.
        raise SystemExit(f"this benchmark needs pyarrow built with Arrow Flight (pyarrow.flight "
                         f"does not import: {exc})") from None
    if "exchange" in parts:
        require("redis", "hiredis", extra="redis", why="the redis:// side of the exchange part")
        if redis_binary() is None:
            raise SystemExit("the exchange part needs redis-server on PATH (apt install redis-server)")
    sizes = [int(s) for s in a.sizes.split(",")]
    ranks = [int(r) for r in a.ranks.split(",")]
    variants = [{"int": False, "str": True}[v.strip()] for v in a.variants.split(",")]
    token = None if a.no_token else "bench-" + uuid.uuid4().hex

    meta = {"python": platform.python_version(), "pyarrow": pa.__version__, "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": load(),
            "args": vars(a)}
    print(f"# Shuffle service benchmark: pyarrow {pa.__version__}, Python {meta['python']}, "
          f"{meta['cpus']} CPUs, token {'off' if token is None else 'on'}; load {meta['load_before']}",
          flush=True)
    out: dict = {"meta": meta}
    t_all = time.monotonic()
    service = bare = redis = None
    try:
        if "io" in parts or "exchange" in parts:
            service = start_service(token=token)
            print(f"service pid {service.pid} at {service.url}", flush=True)
        if "io" in parts:
            bare = start_bare()
            print(f"bare Flight server pid {bare.pid} at {bare.url}", flush=True)
            print(f"\n1. io: Store.put/get over flight:// vs raw do_put/do_get to a bare Flight "
                  f"server (GB/s of table.nbytes, best of N; load {load()})", flush=True)
            io, comps = io_part(service, bare, token, sizes, variants, a.repeat, a.raw_batch_mib)
            out["io"], out["io_components"] = io, comps
            print(text_table(io, ["table", "MiB", "best of", "raw put GB/s", "cylon put GB/s",
                                  "put ratio", "raw get GB/s", "cylon get GB/s", "get ratio"],
                             {"raw put GB/s": "{:.2f}", "cylon put GB/s": "{:.2f}",
                              "raw get GB/s": "{:.2f}", "cylon get GB/s": "{:.2f}",
                              "put ratio": "{:.2f}x", "get ratio": "{:.2f}x"}))
            print("\n   components of the cylon path (best of N each, ms)")
            print(text_table(comps, list(comps[0]), {k: "{:.2f}" for k in comps[0] if k.endswith("ms")}))
            print(f"   load after io: {load()}", flush=True)
            bare.stop()
        if "exchange" in parts:
            redis = LocalRedis()
            print(f"\n2. exchange of {a.gb:g} GB: flight:// vs redis:// (redis-server "
                  f"{redis.version()} pid {redis.pid}), best of {a.exchange_repeat} per launch; "
                  f"load {load()}", flush=True)
            ex = exchange_part(service, redis, token, ranks, a.gb, a.exchange_repeat)
            out["exchange"] = ex
            print(text_table(ex, ["ranks", "GB crossing ranks", "flight s", "flight GB/s",
                                  "redis s", "redis GB/s", "ratio redis/flight"],
                             {"GB crossing ranks": "{:.2f}", "flight s": "{:.3f}",
                              "flight GB/s": "{:.2f}", "redis s": "{:.3f}", "redis GB/s": "{:.2f}",
                              "ratio redis/flight": "{:.2f}x"}))
            print("\n   CPU seconds during the best exchange (server process; all ranks together)")
            print(text_table(ex, ["ranks", "flight server CPU s", "flight ranks CPU s",
                                  "redis server CPU s", "redis ranks CPU s"],
                             {k: "{:.2f}" for k in ("flight server CPU s", "flight ranks CPU s",
                                                    "redis server CPU s", "redis ranks CPU s")}))
            print(f"   load after exchange: {load()}", flush=True)
            redis.stop()
        if service is not None:
            service.stop()
        if "spill" in parts:
            print(f"\n3. spill: {a.spill_ranks}-rank exchange of {a.gb:g} GB, memory limit 1/4 of "
                  f"the data vs above it; best of {a.exchange_repeat}; load {load()}", flush=True)
            sp = spill_part(token, a.spill_ranks, a.gb, a.exchange_repeat)
            out["spill"] = sp
            print(text_table(sp, ["service", "ranks", "memory limit MiB", "GB crossing ranks", "s",
                                  "GB/s", "slowdown", "peak disk MiB", "peak memory MiB",
                                  "files left", "server CPU s", "ranks CPU s"],
                             {"memory limit MiB": "{:.0f}", "GB crossing ranks": "{:.2f}",
                              "s": "{:.3f}", "GB/s": "{:.2f}", "slowdown": "{:.2f}x",
                              "peak disk MiB": "{:.0f}", "peak memory MiB": "{:.0f}",
                              "server CPU s": "{:.2f}", "ranks CPU s": "{:.2f}"}))
            print(f"   load after spill: {load()}", flush=True)
    finally:
        for s in (bare, service, redis):
            if s is not None:
                s.stop()
    meta["load_after"] = load()
    meta["wall_s"] = round(time.monotonic() - t_all, 1)
    print(f"\ntotal {meta['wall_s']:.0f} s; load {meta['load_before']} before, "
          f"{meta['load_after']} after", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
