"""Exchange over a Redis that also holds other data: receivers that learn message keys from
announcements (the current protocol) against receivers that LIST (SCAN) on every wake-up (the
previous one), in one run.

    python -m cylon_store.bench.redis_announce [--filler 0,200000] [--ranks 4] [--rounds 20]

``--filler`` unrelated keys are written first (an ElastiCache shared with an application): SCAN
walks the whole keyspace, so a LIST costs in proportion to it; announcements do not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

import cylon_store as cs
import cylon_store.store_comm as C

from . import require
from .redis_bench import raw_client
from .servers import LocalRedis


def _rank(comm, rounds):
    parts = [pa.table({"v": np.arange(1000)}) for _ in range(comm.world_size)]
    comm.barrier()
    lists0 = comm.store.stats()["requests"].get("list", 0)
    t0 = time.perf_counter()
    for _ in range(rounds):
        comm.exchange(parts)
    took = (time.perf_counter() - t0) / rounds
    return took, comm.store.stats()["requests"].get("list", 0) - lists0


def run(fillers, ranks: int, rounds: int) -> list[dict]:
    rows = []
    for filler in fillers:
        server = LocalRedis()
        try:
            client = raw_client(server.url)
            pipe = client.pipeline(transaction=False)
            for i in range(filler):
                pipe.set(f"app:key:{i}", b"x")
                if i % 10_000 == 9_999:
                    pipe.execute()
            pipe.execute()
            for mode in ("announced keys", "LIST every wake-up"):
                # LIST_FALLBACK < 0 makes every wake-up LIST: the protocol before announcements.
                C.LIST_FALLBACK = -1.0 if mode.startswith("LIST") else 1.0
                try:
                    res = cs.launch(_rank, ranks, store=server.url, launcher="threads",
                                    args=(rounds,))
                finally:
                    C.LIST_FALLBACK = 1.0
                rows.append({"filler": filler, "mode": mode,
                             "ms": statistics.mean(r[0] for r in res) * 1e3,
                             # ranks share one Store in threads: its counter is the total
                             "lists": res[0][1] / rounds})
        finally:
            server.stop()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filler", default="0,200000")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    require("redis", extra="redis")
    rows = run([int(x) for x in args.filler.split(",")], args.ranks, args.rounds)
    print("| other keys in the database | receivers | ms per exchange | LISTs per exchange (all ranks) |")
    print("|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['filler']:,} | {r['mode']} | {r['ms']:.1f} | {r['lists']:.1f} |")


if __name__ == "__main__":
    main()
