"""Failure scenarios and large messages on one rank of a direct transport (run by
tests/test_mpi.py under mpirun, and by tests/test_ucx.py as plain processes).

    python faults.py URL MODE [--world N] [--job J] [--timeout S]

Modes:
  die         the last rank kills itself (SIGKILL) while a large exchange is in flight
  stall       the last rank never calls the exchange; the others must time out naming it
  stall-coll  the last rank never calls allgather
  noconnect   the last rank never calls connect (under MPI it does start MPI)
  world       connect with the wrong world size (mpi://)
  job         ranks join different jobs (mpi://)
  ports       print the TCP ports this rank listens on (ucx://: port_range, net_devices)
  huge        rank 0 sends a part of more than 2 GiB to rank 1 (MPI's int32 count limit)

Each rank prints one line ``RESULT rank=R <what happened>`` for the test to check.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import numpy as np
import pyarrow as pa

import cylon_store as cs


def stall(args, world: int) -> None:
    """Take no part until every other rank has given up (or for 2.5 timeouts + 3 s)."""
    deadline = time.monotonic() + args.timeout * 2.5 + 3
    while time.monotonic() < deadline:
        if args.release and len(os.listdir(args.release)) >= world - 1:
            return
        time.sleep(0.1)


def gave_up(args, rank) -> None:
    if args.release:
        open(os.path.join(args.release, f"gave-up.{rank}"), "w").close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("mode")
    ap.add_argument("--world", type=int, default=None)
    ap.add_argument("--job", default="faults")
    ap.add_argument("--timeout", type=float, default=5)
    ap.add_argument("--release", default=None,
                    help="directory where ranks that gave up leave a file; a stalled rank "
                         "returns once every other rank has (instead of sleeping it out)")
    args = ap.parse_args()
    mode = args.mode
    t0 = time.monotonic()

    if mode == "world":
        try:
            cs.connect(args.url, job=args.job, world_size=99, timeout=args.timeout)
        except cs.ConfigError as exc:
            print(f"RESULT rank=? ConfigError {exc}", flush=True)
        return 0
    if mode == "job":
        rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
        try:
            cs.connect(args.url, job=f"{args.job}-{rank % 2}", timeout=args.timeout)
            print(f"RESULT rank={rank} joined", flush=True)
        except cs.RendezvousError as exc:
            print(f"RESULT rank={rank} RendezvousError {exc}", flush=True)
        return 0

    if mode == "noconnect":
        rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("FAULT_RANK", "0")))
        if rank == (args.world or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))) - 1:
            if args.url.startswith("mpi"):
                from mpi4py import MPI  # noqa: F401  (MPI_Init waits for every process)
            stall(args, args.world or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
            print(f"RESULT rank={rank} stalled", flush=True)
            return 0
        explicit = {"rank": rank} if "FAULT_RANK" in os.environ else {}
        try:
            cs.connect(args.url, job=args.job, world_size=args.world, timeout=args.timeout,
                       **explicit)
            print(f"RESULT rank={rank} connected", flush=True)
        except cs.ExchangeTimeoutError as exc:
            print(f"RESULT rank={rank} timeout missing={exc.missing} "
                  f"after={time.monotonic() - t0:.1f}s msg={exc}", flush=True)
            gave_up(args, rank)
            return 3
        return 0

    comm = cs.connect(args.url, job=args.job, world_size=args.world, timeout=args.timeout)
    me, P = comm.rank, comm.world_size
    last = P - 1

    if mode == "ports":
        import psutil
        comm.barrier()
        ports = sorted({c.laddr.port for c in psutil.Process().net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN})
        addrs = sorted({c.laddr.ip for c in psutil.Process().net_connections("tcp")})
        print(f"RESULT rank={me} listening={ports} addrs={addrs}", flush=True)
        comm.close()
        return 0

    if mode == "huge":
        n = (2**31 + 2**27) // 8  # 2.125 GiB of int64 in one part: above INT_MAX bytes
        parts = [None] * P
        if me == 0:
            parts[1] = pa.table({"v": np.arange(n, dtype=np.int64)})
        parts = [p if p is not None else pa.table({"v": pa.array([], pa.int64())}) for p in parts]
        out = comm.exchange(parts)
        del parts
        if me == 1:
            v = out[0].column("v")
            ok = len(v) == n and v[0].as_py() == 0 and v[n - 1].as_py() == n - 1 and \
                int(np.asarray(v.chunk(0))[::65536].sum()) == int(np.arange(n)[::65536].sum())
            print(f"RESULT rank={me} huge received={len(v)} ok={ok} "
                  f"seconds={time.monotonic() - t0:.1f}", flush=True)
        else:
            print(f"RESULT rank={me} huge sent", flush=True)
        comm.close()
        return 0

    comm.barrier()
    try:
        if mode == "die":
            rows = 8 << 20  # 64 MiB per part keeps the transfer busy when the rank dies
            parts = [pa.table({"v": np.full(rows, me, np.int64)}) for _ in range(P)]
            if me == last:
                threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
            for _ in range(50):
                comm.exchange(parts)
            print(f"RESULT rank={me} no failure", flush=True)
        elif mode in ("stall", "stall-coll"):
            if me == last:
                stall(args, P)
                print(f"RESULT rank={me} stalled", flush=True)
                return 0
            if mode == "stall":
                comm.exchange([pa.table({"v": [me]})] * P)
            else:
                comm.allgather(pa.table({"v": [me]}))
            print(f"RESULT rank={me} no failure", flush=True)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except cs.ExchangeTimeoutError as exc:
        print(f"RESULT rank={me} timeout missing={exc.missing} after={time.monotonic() - t0:.1f}s "
              f"msg={exc}", flush=True)
        comm.abort()
        gave_up(args, me)
        return 3
    except cs.ExchangeError as exc:
        print(f"RESULT rank={me} error after={time.monotonic() - t0:.1f}s msg={exc}", flush=True)
        comm.abort()
        return 4
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
