"""Facade put/get throughput against plain I/O of the same Arrow IPC bytes, in one run.

    python -m cylon_store.bench.store_io [--sizes 1,64,512] [--repeat 3] [--dir /tmp]

Baselines, measured in the same process right before the facade:
- file: pyarrow's IPC stream writer on a plain ``open()`` file, overwritten in place (same
  serialisation, no checksum, no temp file + rename), fsync'd when the facade is; read back with
  Arrow's ``OSFile.read_buffer()`` + zero-copy IPC decode.
- memory: one memcpy of the table's bytes (the least a store that keeps a copy can do).
Ratios are baseline_time / facade_time (1.0 = as fast as the baseline, higher is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

import cylon_store as cs


def make_table(mib: int) -> pa.Table:
    rows = max(1, (mib << 20) // 32)
    rng = np.random.default_rng(mib)
    return pa.table({"k": rng.integers(0, 1 << 60, rows), "v": rng.random(rows),
                     "w": rng.integers(0, 1000, rows).astype(np.int64),
                     "t": rng.random(rows)})


def best_interleaved(fns, repeat):
    """Best time of each function, the functions taking turns (so drift hits all alike)."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times]


def plain_file_put(path, table, fsync):
    with open(path, "wb") as f:
        with pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def plain_file_get(path):
    # Arrow's own file read into one Arrow buffer, then a zero-copy decode: the same work the
    # facade does, minus checksums.
    with pa.OSFile(path, "rb") as f:
        data = f.read_buffer()
    return pa.ipc.open_stream(data).read_all()


def run(sizes, repeat, directory):
    rows = []
    root = tempfile.mkdtemp(prefix="cylon-bench-", dir=directory)
    try:
        for mib in sizes:
            table = make_table(mib)
            nbytes = table.nbytes
            for fsync in (False, True):
                base_path = os.path.join(root, "plain.arrow")
                store = cs.open_store(f"file://{root}/store?fsync={str(fsync).lower()}")
                bp, fp = best_interleaved([lambda: plain_file_put(base_path, table, fsync),
                                           lambda: store.put("bench/t", table)], repeat)
                bg, fg = best_interleaved([lambda: plain_file_get(base_path),
                                           lambda: store.get("bench/t")], repeat)
                store.delete("bench/t")
                store.close()
                os.unlink(base_path)
                rows.append((f"file fsync={'on' if fsync else 'off'}", mib, nbytes, bp, fp, bg, fg))
            mem = cs.open_store("memory://bench")
            arr = np.frombuffer(b"".join(bytes(b) for c in table.columns for ch in c.chunks
                                         for b in ch.buffers() if b is not None), dtype=np.uint8)
            bp, fp, fg = best_interleaved([lambda: arr.copy(), lambda: mem.put("bench/t", table),
                                           lambda: mem.get("bench/t")], repeat)
            rows.append(("memory", mib, nbytes, bp, fp, bp, fg))
            mem.close()
            del arr
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,64,512", help="table sizes in MiB")
    ap.add_argument("--repeat", type=int, default=5, help="best of N")
    ap.add_argument("--dir", default=None, help="directory for the file store (default: $TMPDIR)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = run(sizes, args.repeat, args.dir)
    print("| backend | MiB | baseline put GB/s | facade put GB/s | put ratio | baseline get GB/s | "
          "facade get GB/s | get ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, mib, nbytes, bp, fp, bg, fg in rows:
        gb = nbytes / 1e9
        print(f"| {name} | {mib} | {gb / bp:.2f} | {gb / fp:.2f} | {bp / fp:.2f}x | {gb / bg:.2f} | "
              f"{gb / fg:.2f} | {bg / fg:.2f}x |")


if __name__ == "__main__":
    main()
