"""The ``cylon-store`` command: version, a demo of the embedded default, and job clean-up."""

from __future__ import annotations

import argparse
import sys
import time

from cylon_store.argtypes import int_range, seconds


def _demo_rank(comm, rows: int):
    """Each rank makes ``rows`` rows and sends each row to the rank its key hashes to."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(comm.rank)
    key = rng.integers(0, 1 << 40, rows, dtype=np.int64)
    table = pa.table({"key": key, "value": rng.random(rows), "src": np.full(rows, comm.rank, np.int32)})
    dest = (key % comm.world_size).astype(np.int64)
    order = np.argsort(dest, kind="stable")
    table = table.take(pa.array(order))
    bounds = np.searchsorted(dest[order], np.arange(comm.world_size + 1))
    parts = [table.slice(bounds[d], bounds[d + 1] - bounds[d]) for d in range(comm.world_size)]
    comm.barrier()
    t0 = time.perf_counter()
    out = comm.exchange(parts)
    elapsed = time.perf_counter() - t0
    moved = sum(p.num_rows for d, p in enumerate(parts) if d != comm.rank)
    moved_bytes = sum(p.nbytes for d, p in enumerate(parts) if d != comm.rank)
    ok = all(bool((t.column("key").to_numpy() % comm.world_size == comm.rank).all()) for t in out)
    return {"rows_sent": moved, "bytes_sent": moved_bytes, "seconds": elapsed,
            "rows_received": sum(t.num_rows for t in out), "ok": ok}


def _rows_of(rank: int, world_size: int, rows: int) -> int:
    """``rows`` split as evenly as integers allow: the first ``rows % world_size`` ranks get one more."""
    return rows // world_size + (1 if rank < rows % world_size else 0)


def _demo_exchange(comm, rows: int):
    return _demo_rank(comm, _rows_of(comm.rank, comm.world_size, rows))


def demo(args) -> int:
    import numpy as np
    import pyarrow as pa

    import cylon_store as cs
    from cylon_store.config import redact_url, split_url

    scheme = split_url(args.store)[0]
    where = ("the embedded default store memory://" if args.store == "memory://"
             else f"store {redact_url(args.store)}")
    launcher = args.launcher or ("mpi" if scheme == "mpi" else "local")
    print(f"cylon-store {cs.__version__} demo — {where}, {args.ranks} rank(s), launcher {launcher}")
    rows = args.rows
    if scheme in ("mpi", "ucx"):
        print(f"({scheme}:// is a direct transport: it exchanges between running ranks and stores "
              f"nothing, so the put/get step is skipped)")
    else:
        with cs.open_store(args.store) as store:
            rng = np.random.default_rng(0)
            table = pa.table({"key": rng.integers(0, 1 << 40, rows), "value": rng.random(rows)})
            t0 = time.perf_counter()
            store.put("demo/table", table)
            t1 = time.perf_counter()
            back = store.get("demo/table")
            t2 = time.perf_counter()
            assert back.equals(table)
            store.delete("demo/table")
            mb = table.nbytes / 1e6
            print(f"put  {rows:,} rows ({mb:,.1f} MB): {t1 - t0:.3f} s, {_rate(mb / 1e3, t1 - t0)}")
            print(f"get  {rows:,} rows ({mb:,.1f} MB): {t2 - t1:.3f} s, {_rate(mb / 1e3, t2 - t1)}")

    t0 = time.perf_counter()
    results = cs.launch(_demo_exchange, args.ranks, store=args.store, launcher=launcher,
                        args=(rows,), timeout=args.timeout)
    wall = time.perf_counter() - t0
    sent = sum(r["rows_sent"] for r in results)
    nbytes = sum(r["bytes_sent"] for r in results)
    slowest = max(r["seconds"] for r in results)
    if not all(r["ok"] for r in results):
        raise AssertionError("a rank received a row that is not its own")
    if sum(r["rows_received"] for r in results) != rows:
        raise AssertionError("rows were lost or duplicated in the exchange")
    ranks_as = "threads" if launcher == "threads" else "processes"
    print(f"exchange on {args.ranks} local {ranks_as}: {sent:,} rows ({nbytes / 1e6:,.1f} MB) moved "
          f"between ranks in {slowest:.3f} s, {_rate(nbytes / 1e9, slowest)} "
          f"(launch and rendezvous included: {wall:.2f} s); every row reached its rank")
    return 0


def _rate(gb: float, seconds: float) -> str:
    return f"{gb / seconds:.2f} GB/s" if seconds > 0 else "(too fast to time)"


def clean(args) -> int:
    import cylon_store as cs
    from cylon_store import keys as K

    with cs.open_store(args.url) as store:
        prefix = K.job_prefix(K.validate_job(args.job)) if args.job else K.ROOT + "/"
        doomed = store.list(prefix)
        swept = 0
        if args.dry_run:
            print("\n".join(doomed))
        else:
            store.delete_many(doomed)
            for counter in ([K.counter_key(args.job)] if args.job else []):
                if store.capabilities.atomic_counter:
                    store.delete_counter(counter)
            # What list() cannot see: a killed writer's temporary file, chunks or open upload,
            # notification channels, counters.
            swept = store.sweep(prefix)
        print(f"{'would delete' if args.dry_run else 'deleted'} {len(doomed)} key(s) under {prefix}"
              + (f" and {swept} unlisted leftover(s)" if not args.dry_run and swept else ""))
    return 0


#: More ranks than this on one machine is a fork bomb, not a demo.
MAX_DEMO_RANKS = 256


def _store_url(text: str) -> str:
    """A store URL whose scheme is known (its options are checked when it is opened)."""
    from cylon_store.config import split_url
    from cylon_store.errors import ConfigError
    from cylon_store.registry import schemes

    try:
        scheme = split_url(text)[0]
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if scheme not in schemes():
        raise argparse.ArgumentTypeError(f"unknown store scheme {scheme!r} in {text!r}; known: "
                                         f"{', '.join(sorted(schemes()))}")
    return text


def main(argv=None) -> int:
    import cylon_store as cs

    parser = argparse.ArgumentParser(prog="cylon-store", description=(
        "Storage and exchange layer for distributed Arrow dataframes."))
    parser.add_argument("--version", action="version", version=f"cylon-store {cs.__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="put/get a generated table, then exchange it between 4 local ranks",
                       description="Put and get a generated table through a store, then exchange "
                                   "it between local ranks (each row sent to the rank its key "
                                   "hashes to) and check that every row arrived exactly once.")
    p.add_argument("--store", default="memory://", type=_store_url,
                   help="store URL, e.g. file:///tmp/demo or redis://127.0.0.1:6379/0 "
                        "(default: the embedded memory://)")
    p.add_argument("--rows", type=int_range(1, 10**9), default=4_000_000,
                   help="rows in total, 1 to 10^9 (default 4,000,000)")
    p.add_argument("--ranks", type=int_range(1, MAX_DEMO_RANKS), default=4,
                   help=f"ranks, 1 to {MAX_DEMO_RANKS} (default 4)")
    p.add_argument("--launcher", choices=("local", "threads", "mpi"), default=None,
                   help="local processes (default; mpi for an mpi:// store), threads, or mpirun")
    p.add_argument("--timeout", type=seconds(), default=600.0,
                   help="seconds before the exchange is given up (default 600)")
    p.set_defaults(fn=demo)
    p = sub.add_parser("clean", help="delete what a job (or every job) left in a store")
    p.add_argument("url", type=_store_url, help="store URL, e.g. s3://bucket/prefix")
    p.add_argument("--job", help="only this job (default: every cylon-store job key)")
    p.add_argument("--dry-run", action="store_true", help="list the keys, delete nothing")
    p.set_defaults(fn=clean)
    from cylon_store import service
    p = sub.add_parser("serve", help="run the shuffle service (Arrow Flight): flight:// stores",
                       description=service.DESCRIPTION,
                       epilog=service.SERVE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    service.add_arguments(p)
    p.set_defaults(fn=lambda args, p=p: service.run(args, p))
    from cylon_store.bench import suite
    p = sub.add_parser("bench", help="compare the storage backends: latency, exchange, operators, "
                                     "BDB queries; results.json, report.md, charts",
                       description=suite.__doc__.split("\n\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    suite.add_arguments(p)
    p.set_defaults(fn=lambda args: suite.main(args, argv))
    from cylon_store.serverless.cli import add_parser as add_lambda_parser
    add_lambda_parser(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except cs.StoreError as exc:
        print(f"cylon-store: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
