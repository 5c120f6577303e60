"""Exchange throughput of the store communicator against a plain-file exchange, in one run.

    python -m cylon_store.bench.exchange [--ranks 2,4,8] [--gb 1.0] [--stores memory,file]

Every rank (an OS process, started by ``cs.launch``) holds ``gb / ranks`` of int64/float64 data
split into one part per destination, and the whole data set moves in one ``exchange``.  The
baseline runs in the same processes right after: each rank writes its outgoing parts as Arrow
IPC files with plain ``open``/``write``, a barrier, then reads its incoming files back (the same
bytes, serialised the same way, no checksums, no atomic rename, no cleanup protocol).  Reported:
GB/s of data that crossed ranks, the ratio baseline_time / cylon_time, and each rank's peak RSS
growth during the exchange against its share of the data.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

import cylon_store as cs


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return _peak_mib()


def rank_parts(comm, total_bytes: int) -> list:
    """This rank's share of ``total_bytes`` (int64 key, float64 value), one slice per rank."""
    P, me = comm.world_size, comm.rank
    rows = total_bytes // P // 16
    rng = np.random.default_rng(me)
    table = pa.table({"k": rng.integers(0, 1 << 62, rows), "v": rng.random(rows)})
    per = rows // P
    return [table.slice(d * per, per if d < P - 1 else rows - d * per) for d in range(P)]


def bench_rank(comm, total_bytes: int, plain_dir: str):
    P, me = comm.world_size, comm.rank
    parts = rank_parts(comm, total_bytes)
    crossing = sum(p.nbytes for d, p in enumerate(parts) if d != me)

    comm.barrier()
    _reset_peak()
    before = _rss_mib()
    t0 = time.perf_counter()
    out = comm.exchange(parts)
    comm.barrier()
    cylon = time.perf_counter() - t0
    peak = _hwm_mib() - before
    received = sum(t.nbytes for s, t in enumerate(out) if s != me)
    del out

    # Baseline: the same parts through plain files.
    comm.barrier()
    t0 = time.perf_counter()
    for d, p in enumerate(parts):
        if d == me:
            continue
        with open(os.path.join(plain_dir, f"{me}-{d}.arrow"), "wb") as f:
            with pa.ipc.new_stream(f, p.schema) as w:
                w.write_table(p)
    comm.barrier()
    got = []
    for s in range(P):
        if s == me:
            continue
        path = os.path.join(plain_dir, f"{s}-{me}.arrow")
        with open(path, "rb") as f:
            got.append(pa.ipc.open_stream(pa.py_buffer(f.read())).read_all())
    comm.barrier()
    plain = time.perf_counter() - t0
    for s in range(P):
        if s != me:
            os.unlink(os.path.join(plain_dir, f"{s}-{me}.arrow"))
    return {"cylon": cylon, "plain": plain, "crossing": crossing, "received": received,
            "peak_mib": peak, "share_mib": sum(p.nbytes for p in parts) / 2**20}


def run(ranks, gb, stores, directory):
    results = []
    for store in stores:
        for P in ranks:
            root = tempfile.mkdtemp(prefix="cylon-xbench-", dir=directory)
            plain_dir = os.path.join(root, "plain")
            os.makedirs(plain_dir)
            url = "memory://" if store == "memory" else f"file://{root}/store?fsync=false"
            try:
                res = cs.launch(bench_rank, P, store=url, args=(int(gb * 1e9), plain_dir),
                                comm_timeout=600)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            cylon = max(r["cylon"] for r in res)
            plain = max(r["plain"] for r in res)
            crossing = sum(r["crossing"] for r in res)
            results.append({"store": store, "ranks": P, "gb_crossing": crossing / 1e9,
                            "cylon_s": cylon, "plain_s": plain,
                            "peak_mib": max(r["peak_mib"] for r in res),
                            "share_mib": max(r["share_mib"] for r in res)})
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--gb", type=float, default=1.0, help="total data in GB (default 1.0)")
    ap.add_argument("--stores", default="memory,file")
    ap.add_argument("--dir", default=None, help="directory for file stores (default: $TMPDIR)")
    args = ap.parse_args(argv)
    rows = run([int(r) for r in args.ranks.split(",")], args.gb, args.stores.split(","), args.dir)
    print("| store | ranks | GB crossing ranks | cylon s | cylon GB/s | plain-file s | ratio (plain/cylon) "
          "| peak RSS growth per rank MiB | rank's share MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['store']} | {r['ranks']} | {r['gb_crossing']:.2f} | {r['cylon_s']:.3f} | "
              f"{r['gb_crossing'] / r['cylon_s']:.2f} | {r['plain_s']:.3f} | "
              f"{r['plain_s'] / r['cylon_s']:.2f}x | {r['peak_mib']:.0f} | {r['share_mib']:.0f} |")


if __name__ == "__main__":
    main()
