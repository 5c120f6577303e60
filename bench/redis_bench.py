"""Redis backend against raw redis-py, all measured in one run on one redis-server.

    python -m cylon_store.bench.redis_bench [--url redis://host:6379/0] [--quick]

Without ``--url`` a redis-server is started on a free loopback port (``--save '' --appendonly
no``) and stopped at the end.  Four parts, each a ratio against a baseline of the same run:

1. chunk size: one 256 MiB value through the adapter with chunks of 256 KiB .. 64 MiB, next to
   raw ``SET``/``GET`` of the same bytes (how the default ``chunk_size`` was chosen);
2. ``Store.put``/``Store.get`` of an Arrow table against raw ``SET``/``GET`` of exactly the
   bytes the Store wrote, 1 to 256 MiB, with 1 and 4 client processes at once (aggregate MiB/s,
   best of the repeats; the facade side includes encoding, checksums and decoding);
3. a 4-rank ``exchange`` of 1 GB (each rank holds 1/4, sends 3/4 of it) against the same ranks
   moving the same parts with raw redis-py (IPC serialise, ``SET``, a barrier, ``GET``,
   deserialise), one client per rank: equal concurrency;
4. blocking wake-up: 4 ranks run small exchanges where one rank in turn arrives 0-50 ms late,
   with RPUSH/BLPOP notification and with notification forced off (waiters poll with capped
   backoff): time per exchange beyond the straggler's delay, and Redis commands per exchange.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

import cylon_store as cs

from . import require
from .servers import LocalRedis

MiB = 1 << 20


def raw_client(url: str):
    import redis
    return redis.Redis.from_url(url.split("?", 1)[0])


def with_query(url: str, **query) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in query.items())


def make_table(nbytes: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"x": rng.random(max(1, nbytes // 8))})


def best(fn, repeat: int) -> float:
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


# -- 1. chunk size ------------------------------------------------------------------------------
def chunk_sweep(url: str, mib: int, chunks, repeat: int) -> list[dict]:
    data = os.urandom(mib * MiB)
    r = raw_client(url)
    key = f"bench-raw-{uuid.uuid4().hex[:8]}"
    rows = []
    t_set = best(lambda: r.set(key, data), repeat)
    t_get = best(lambda: r.get(key), repeat)
    r.delete(key)
    rows.append({"chunk": "raw SET/GET (one value)", "put": mib / t_set, "get": mib / t_get})
    for c in chunks:
        with cs.open_store(with_query(url, prefix=f"bench-{uuid.uuid4().hex[:8]}:",
                                      chunk_size=c)) as store:
            tp = best(lambda: store.put_bytes("v", data), repeat)
            tg = best(lambda: store.get_bytes("v"), repeat)
            store.delete("v")
        rows.append({"chunk": c, "put": mib / tp, "get": mib / tg})
    return rows


# -- 2. facade vs raw, 1 and 4 clients ----------------------------------------------------------
def client_rank(comm, url: str, mib: int, repeat: int):
    """One client process: the four operations in lockstep with the other clients."""
    me = comm.rank
    store = cs.open_store(url)
    r = raw_client(url)
    table = make_table(mib * MiB, seed=me)
    key, raw_key = f"io/{me}", f"{store.adapter.config.prefix}raw-{me}"
    store.put(key, table)
    payload = bytes(memoryview(store.get_bytes(key)))   # exactly what the Store wrote
    store.delete(key)
    ops = {
        "facade put": lambda: store.put(key, table),
        "raw SET": lambda: r.set(raw_key, payload),
        "facade get": lambda: store.get(key),
        "raw GET": lambda: r.get(raw_key),
    }
    spans: dict[str, list[tuple[float, float]]] = {op: [] for op in ops}
    for _ in range(repeat):
        for op, fn in ops.items():
            comm.barrier()
            t0 = time.monotonic()
            out = fn()
            spans[op].append((t0, time.monotonic()))
            del out
        comm.barrier()
        store.delete(key)
        r.delete(raw_key)
    store.close()
    return {"spans": spans, "bytes": len(payload)}


def facade_vs_raw(url: str, sizes, clients, repeat: int) -> list[dict]:
    rows = []
    for n in clients:
        for mib in sizes:
            res = cs.launch(client_rank, n, store=with_query(url, prefix=f"bc-{uuid.uuid4().hex[:8]}:"),
                            args=(with_query(url, prefix=f"bd-{uuid.uuid4().hex[:8]}:"), mib, repeat))
            total = sum(x["bytes"] for x in res) / MiB
            rate = {}
            for op in res[0]["spans"]:
                times = [max(x["spans"][op][i][1] for x in res) - min(x["spans"][op][i][0] for x in res)
                         for i in range(repeat)]
                rate[op] = total / min(times)
            rows.append({"clients": n, "MiB": mib, **rate,
                         "put ratio": rate["facade put"] / rate["raw SET"],
                         "get ratio": rate["facade get"] / rate["raw GET"]})
            print(f"  {n} client(s) {mib:4d} MiB: put {rate['facade put']:7.0f} vs SET "
                  f"{rate['raw SET']:7.0f} MiB/s, get {rate['facade get']:7.0f} vs GET "
                  f"{rate['raw GET']:7.0f} MiB/s", flush=True)
    return rows


# -- 3. exchange vs raw at equal concurrency ----------------------------------------------------
def exchange_rank(comm, raw_url: str, total_bytes: int, repeat: int):
    P, me = comm.world_size, comm.rank
    table = make_table(total_bytes // P, seed=me)
    step = -(-table.num_rows // P)
    parts = [table.slice(d * step, step) for d in range(P)]
    moved = sum(p.nbytes for d, p in enumerate(parts) if d != me)
    r = raw_client(raw_url)
    prefix = f"bx-{comm.job}:"
    ex, raw = [], []
    for _ in range(repeat):
        comm.barrier()
        t0 = time.monotonic()
        out = comm.exchange(parts)
        ex.append((t0, time.monotonic()))
        assert out[me].num_rows == parts[me].num_rows
        del out
        comm.barrier()
        t0 = time.monotonic()
        for d in range(P):
            if d != me:
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, parts[d].schema) as w:
                    w.write_table(parts[d])
                r.set(f"{prefix}{me}-{d}", sink.getvalue().to_pybytes())
        comm.barrier()
        got = [pa.ipc.open_stream(r.get(f"{prefix}{s}-{me}")).read_all() for s in range(P) if s != me]
        raw.append((t0, time.monotonic()))
        del got
        comm.barrier()
        r.delete(*[f"{prefix}{s}-{me}" for s in range(P) if s != me])
    return {"exchange": ex, "raw": raw, "moved": moved}


def exchange_vs_raw(url: str, ranks: int, gb: float, repeat: int) -> dict:
    res = cs.launch(exchange_rank, ranks, store=with_query(url, prefix=f"ex-{uuid.uuid4().hex[:8]}:"),
                    args=(url, int(gb * 1e9), repeat))
    moved = sum(x["moved"] for x in res)
    out = {"ranks": ranks, "GB": gb, "moved GB": moved / 1e9}
    for name in ("exchange", "raw"):
        t = min(max(x[name][i][1] for x in res) - min(x[name][i][0] for x in res)
                for i in range(repeat))
        out[name] = moved / 1e9 / t
    out["ratio"] = out["exchange"] / out["raw"]
    return out


# -- 4. blocking wake-up vs polling -------------------------------------------------------------
def latency_rank(comm, rounds: int, max_delay: float, seed: int):
    P, me = comm.world_size, comm.rank
    rng = np.random.default_rng(seed)
    delays = rng.uniform(0, max_delay, rounds)
    parts = [pa.table({"v": [me * 100 + d]}) for d in range(P)]
    comm.barrier()
    comm.store.reset_stats()
    t0 = time.monotonic()
    for i in range(rounds):
        if i % P == me:   # the straggler of this round
            time.sleep(delays[i])
        comm.exchange(parts)
    elapsed = time.monotonic() - t0
    cmds = comm.store.stats()["requests"].get("redis.COMMANDS", 0)
    return {"elapsed": elapsed, "delay": float(delays.sum()), "commands": cmds}


def wakeup(url: str, ranks: int, rounds: int, max_delay: float, passes: int = 2) -> list[dict]:
    """Each mode ``passes`` times, interleaved (on, off, on, off); the best pass of each."""
    best_of: dict = {}
    for _ in range(passes):
        for notify in (True, False):
            u = with_query(url, prefix=f"wk-{uuid.uuid4().hex[:8]}:", notification=str(notify).lower())
            res = cs.launch(latency_rank, ranks, store=u, args=(rounds, max_delay, 7))
            elapsed = max(x["elapsed"] for x in res)
            row = {"notification": "on (BLPOP)" if notify else "off (polling)",
                   "ms/exchange": 1e3 * elapsed / rounds,
                   "overhead ms": 1e3 * (elapsed - res[0]["delay"]) / rounds,
                   "commands/exchange": sum(x["commands"] for x in res) / rounds}
            if notify not in best_of or row["ms/exchange"] < best_of[notify]["ms/exchange"]:
                best_of[notify] = row
    return [best_of[True], best_of[False]]


# -- report -------------------------------------------------------------------------------------
def table_md(rows: list[dict], cols: list[str], fmt: dict) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "|".join("---:" if c not in ("chunk", "notification") else "---"
                                                      for c in cols) + "|\n"
    body = ""
    for r in rows:
        body += "| " + " | ".join(fmt.get(c, "{}").format(r[c]) if isinstance(r[c], (int, float))
                                  else str(r[c]) for c in cols) + " |\n"
    return head + body


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an existing Redis (default: start a loopback redis-server)")
    ap.add_argument("--sizes", default="1,16,64,256", help="MiB per value (part 2)")
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sweep-mib", type=int, default=256)
    ap.add_argument("--chunks", default="256KiB,1MiB,4MiB,16MiB,64MiB")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--gb", type=float, default=1.0, help="total data of the exchange (part 3)")
    ap.add_argument("--rounds", type=int, default=40, help="small exchanges per pass (part 4)")
    ap.add_argument("--max-delay", type=float, default=0.05, help="straggler delay bound, s (part 4)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.clients, a.repeat, a.sweep_mib, a.gb, a.rounds = "1,16", "1,2", 1, 16, 0.1, 12
    require("redis", "hiredis", extra="redis")
    sizes = [int(s) for s in a.sizes.split(",")]
    clients = [int(c) for c in a.clients.split(",")]
    server = None if a.url else LocalRedis()
    url = a.url or server.url
    try:
        import hiredis
        import redis
        where = f"redis-server {server.version()} on loopback" if server else urlsplit(url).hostname
        print(f"# Redis backend benchmark: {where}, redis-py {redis.__version__}, hiredis "
              f"{hiredis.__version__}, {os.cpu_count()} CPUs\n", flush=True)
        t_all = time.monotonic()

        print(f"1. chunk size ({a.sweep_mib} MiB value, MiB/s, best of {a.repeat})", flush=True)
        sweep = chunk_sweep(url, a.sweep_mib, a.chunks.split(","), a.repeat)
        print(table_md(sweep, ["chunk", "put", "get"], {"put": "{:.0f}", "get": "{:.0f}"}), flush=True)

        print(f"2. Store put/get vs raw redis-py SET/GET (aggregate MiB/s, best of {a.repeat})",
              flush=True)
        io = facade_vs_raw(url, sizes, clients, a.repeat)
        print(table_md(io, ["clients", "MiB", "facade put", "raw SET", "put ratio", "facade get",
                            "raw GET", "get ratio"],
                       {k: "{:.0f}" for k in ("facade put", "raw SET", "facade get", "raw GET")}
                       | {"put ratio": "{:.2f}x", "get ratio": "{:.2f}x"}), flush=True)

        print(f"3. {a.ranks}-rank exchange of {a.gb:g} GB vs raw redis-py, same ranks (GB/s of "
              f"data crossing ranks, best of {min(a.repeat, 2)})", flush=True)
        ex = exchange_vs_raw(url, a.ranks, a.gb, min(a.repeat, 2))
        print(table_md([ex], ["ranks", "GB", "moved GB", "exchange", "raw", "ratio"],
                       {"GB": "{:g}", "moved GB": "{:.2f}", "exchange": "{:.2f}", "raw": "{:.2f}",
                        "ratio": "{:.2f}x"}), flush=True)

        print(f"4. wake-up: {a.ranks} ranks, {a.rounds} small exchanges, one rank 0-"
              f"{a.max_delay * 1e3:g} ms late each round (best of 2 interleaved passes)", flush=True)
        wk = wakeup(url, a.ranks, a.rounds, a.max_delay)
        print(table_md(wk, ["notification", "ms/exchange", "overhead ms", "commands/exchange"],
                       {"ms/exchange": "{:.1f}", "overhead ms": "{:.1f}",
                        "commands/exchange": "{:.0f}"}), flush=True)
        print(f"total {time.monotonic() - t_all:.0f} s")
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
