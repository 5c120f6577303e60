"""Direct transports against raw mpi4py and the storage backends: one all-to-all exchange of
``--size`` bytes (default 1 GiB) among ``--ranks`` processes (default 4), in one run.

    python -m cylon_store.bench.transport_bench [--size 1GiB] [--ranks 4] [--iters 5]
        [--store-iters 2] [--only mpi,ucx,file,redis] [--json results.json]

Every rank holds ``size / ranks`` bytes of Arrow data (int64 key, float64 value, int64 payload)
as one table per destination.  Contenders, each timed from a barrier to the last rank's
completion (best and median of the iterations, after one warm-up):

- ``raw mpi4py Alltoallv``: ``MPI_Alltoallv`` of the same tables already serialised to Arrow
  IPC bytes, into a preallocated buffer — the transfer alone, the baseline of the ratios;
- ``raw mpi4py Isend/Irecv``: the same bytes with every pair's transfer posted at once and the
  rank's own part left in place (the transfer pattern of ``mpi:// p2p``, without Arrow);
- ``mpi:// p2p`` (the default) and ``mpi:// alltoallv``: ``comm.exchange`` of the tables,
  serialisation and zero-copy decoding included; run in the same mpirun job as the baseline,
  iterations interleaved so load on the machine affects all alike;
- ``ucx://`` in three settings (see ``UCX_VARIANTS``), ranks bootstrapped through a file
  rendezvous;
- ``file://`` and ``redis://`` (a redis-server started on loopback if the binary is found):
  the store communicator's exchange.

Ranks are started with ``cs.launch`` (launcher "mpi" for mpi://, processes otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from urllib.parse import quote

import numpy as np
import pyarrow as pa

import cylon_store as cs
from cylon_store.config import parse_size

from . import require, servers


#: (label, ucx:// options): TCP on loopback as between hosts; shared memory with error
#: handling kept (UCX then copies through shared-memory fragments); and UCX's own choice
#: without endpoint error handling (shared memory plus CMA single-copy), which is fastest on
#: one host but lets UCX abort the survivors when a peer dies.
UCX_VARIANTS = (("ucx:// tcp", "tls=tcp,self&net_devices=lo"),
                ("ucx:// shm", "ucx_config=MM_ERROR_HANDLING%3Dy"),
                ("ucx:// shm+cma, no err. handling", "error_handling=false"))


def make_parts(rank: int, world: int, total_bytes: int) -> list:
    rows = max(1, total_bytes // world // world // 24)
    rng = np.random.default_rng(rank)
    return [pa.table({"key": rng.integers(0, 1 << 40, rows), "value": rng.random(rows),
                      "payload": np.full(rows, rank * world + d, np.int64)}) for d in range(world)]


def _timed(comm, fn) -> float:
    """Seconds from a common start to the last rank's completion of ``fn``."""
    comm.barrier()
    t0 = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - t0, "max")


def _check(out: list, rank: int, world: int) -> None:
    for s, t in enumerate(out):
        assert t.column("payload")[0].as_py() == s * world + rank, "wrong data"


def rank_mpi(comm, total_bytes: int, iters: int) -> dict:
    """mpi:// p2p and alltoallv against raw mpi4py Alltoallv, interleaved."""
    from mpi4py import MPI
    me, P = comm.rank, comm.world_size
    parts = make_parts(me, P, total_bytes)
    # The baseline's input: the same tables as Arrow IPC bytes, one contiguous send buffer.
    blobs = []
    for t in parts:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        blobs.append(sink.getvalue())
    send_counts = [b.size for b in blobs]
    send = np.frombuffer(b"".join(blobs), np.uint8)
    recv_counts = np.zeros(P, np.int64)
    MPI.COMM_WORLD.Alltoall(np.array(send_counts, np.int64), recv_counts)
    recv = np.empty(int(recv_counts.sum()), np.uint8)
    sdispl = np.concatenate([[0], np.cumsum(send_counts)[:-1]]).tolist()
    rdispl = np.concatenate([[0], np.cumsum(recv_counts)[:-1]]).tolist()

    def raw():
        MPI.COMM_WORLD.Alltoallv([send, (send_counts, sdispl), MPI.BYTE],
                                 [recv, (recv_counts.tolist(), rdispl), MPI.BYTE])

    def raw_p2p():  # every pair at once, self part not copied: what mpi:// p2p does
        world = MPI.COMM_WORLD
        reqs = []
        for k in range(1, P):
            s, d = (me - k) % P, (me + k) % P
            reqs.append(world.Irecv([recv[rdispl[s]:rdispl[s] + int(recv_counts[s])], MPI.BYTE],
                                    s, 77))
            reqs.append(world.Isend([send[sdispl[d]:sdispl[d] + send_counts[d]], MPI.BYTE], d, 77))
        MPI.Request.Waitall(reqs)

    a2av = cs.connect("mpi://", job=f"{comm.job}-a2av", exchange_method="alltoallv",
                      timeout=comm.timeout)
    out: dict[str, list[float]] = {}

    def ours(c):
        def run():
            res = c.exchange(parts)
            _check(res, me, P)
        return run

    contenders = [("raw mpi4py Alltoallv", raw), ("raw mpi4py Isend/Irecv", raw_p2p),
                  ("mpi:// p2p", ours(comm)),
                  ("mpi:// alltoallv", ours(a2av))]
    for it in range(iters + 1):
        for name, fn in contenders:
            t = _timed(comm, fn)
            if it:  # the first round warms up buffers and connections
                out.setdefault(name, []).append(t)
    a2av.close()
    return out


def rank_exchange(comm, total_bytes: int, iters: int, name: str) -> dict:
    me, P = comm.rank, comm.world_size
    parts = make_parts(me, P, total_bytes)
    times = []
    for it in range(iters + 1):
        def run():
            res = comm.exchange(parts)
            _check(res, me, P)
        t = _timed(comm, run)
        if it:
            times.append(t)
    return {name: times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="bytes exchanged in total (e.g. 256MiB, 1GiB)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5, help="timed rounds for mpi:// and ucx://")
    ap.add_argument("--store-iters", type=int, default=2, help="timed rounds for file and redis")
    ap.add_argument("--only", default="mpi,ucx,file,redis")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    total = parse_size(args.size)
    only = set(args.only.split(","))
    require(*(["mpi4py"] if "mpi" in only else []), *(["redis"] if "redis" in only else []),
            why="the contenders asked for")
    if "ucx" in only:
        require("ucxx", extra="ucx")
    P = args.ranks
    results: dict = {}
    notes: list = []
    workdir = tempfile.mkdtemp(prefix="cylon-transport-bench-")
    started = time.monotonic()

    def run(label, fn, store, fn_args, launcher="local"):
        t0 = time.monotonic()
        try:
            res = cs.launch(fn, P, store=store, launcher=launcher, args=fn_args, timeout=900,
                            comm_timeout=600)
            results.update(res[0])
        except Exception as exc:  # report and go on with the other contenders
            notes.append(f"{label}: failed: {exc!r}"[:500])
        print(f"  {label} done in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)

    try:
        if "mpi" in only:
            run("mpi", rank_mpi, "mpi://", (total, args.iters), launcher="mpi")
        if "ucx" in only:
            for i, (label, opts) in enumerate(UCX_VARIANTS):
                rdv = os.path.join(workdir, f"rdv-ucx{i}")
                os.makedirs(rdv)
                url = f"ucx://?rendezvous={quote(f'file://{rdv}', safe='')}&{opts}"
                run(label, rank_exchange, url, (total, args.iters, label))
        if "file" in only:
            run("file", rank_exchange, f"file://{workdir}/store?fsync=false",
                (total, args.store_iters, "file:// (store exchange)"))
        if "redis" in only:
            redis_server = None
            if servers.redis_binary() is None:
                notes.append("redis: no redis-server binary found; skipped")
            else:
                try:
                    redis_server = servers.LocalRedis()
                except RuntimeError as exc:
                    notes.append(f"redis: {exc}; skipped")
            if redis_server is not None:
                try:
                    run("redis", rank_exchange, redis_server.url, (total, args.store_iters,
                                                                   "redis:// (store exchange)"))
                finally:
                    redis_server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    base = results.get("raw mpi4py Alltoallv")
    best_raw = min((min(t) for n, t in results.items() if n.startswith("raw")), default=None)
    print(f"\n{P}-rank exchange of {total / 2**30:.2f} GiB in total ({total / P / 2**20:.0f} MiB "
          f"per rank), best and median of the timed rounds:\n")
    print(f"{'contender':34s} {'best s':>8s} {'median s':>9s} {'GB/s':>7s} {'x raw best':>11s} "
          f"{'x raw median':>13s} {'x best raw':>11s}")
    rows = []
    for name, times in results.items():
        best, med = min(times), statistics.median(times)
        r_best = f"{min(base) / best:.2f}" if base else "-"
        r_med = f"{statistics.median(base) / med:.2f}" if base else "-"
        r_any = f"{best_raw / best:.2f}" if best_raw else "-"
        print(f"{name:34s} {best:8.3f} {med:9.3f} {total / best / 1e9:7.2f} {r_best:>11s} "
              f"{r_med:>13s} {r_any:>11s}")
        rows.append({"name": name, "times": times, "best": best, "median": med})
    for n in notes:
        print(f"note: {n}")
    print(f"\n(x raw = raw mpi4py Alltoallv time / contender time, best to best and median to "
          f"median; x best raw = the fastest raw mpi4py best / contender best; >= 1 is as fast; "
          f"whole run {time.monotonic() - started:.0f}s, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": P, "bytes": total, "results": rows, "notes": notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
