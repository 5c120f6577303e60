"""The one worker entry of every launcher: ``python -m cylon_store.worker PAYLOAD``.

Reads ``(fn, args)`` (cloudpickle) from PAYLOAD, joins the job named in the environment
(rank from ``CYLON_STORE_RANK`` or mpirun's variables), runs ``fn(comm, *args)``, closes the
communicator and writes ``result-<rank>.pkl`` — or ``error-<rank>.pkl`` with the exception and
its formatted traceback — atomically into ``CYLON_STORE_RESULT_DIR``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import cloudpickle


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        cloudpickle.dump(obj, f)
    os.replace(tmp, path)


def _exit_with_parent(period: float = 0.5) -> None:
    """End this rank if its launcher (or mpirun) dies: a killed parent must not leave ranks
    behind that wait out their collective timeouts (or block in MPI) as orphans."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(period)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="cylon-parent-watch", daemon=True).start()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cylon_store.worker PAYLOAD", file=sys.stderr)
        return 2
    _exit_with_parent()
    from cylon_store.comm import DEFAULT_TIMEOUT, connect, ranks_from_env

    outdir = os.environ["CYLON_STORE_RESULT_DIR"]
    rank, _ = ranks_from_env()
    rank = -1 if rank is None else rank
    # Tells the launcher this process ran: an mpirun that failed before any rank started
    # (its own startup, e.g. PMIx) may be retried, one whose ranks ran may not.
    open(os.path.join(outdir, f"started-{os.getpid()}"), "wb").close()
    try:
        with open(argv[0], "rb") as f:
            fn, args = cloudpickle.load(f)
        comm = connect(os.environ["CYLON_STORE_URL"], job=os.environ["CYLON_STORE_JOB"],
                       timeout=float(os.environ.get("CYLON_STORE_TIMEOUT", DEFAULT_TIMEOUT)))
        rank = comm.rank
        with comm:
            result = fn(comm, *args)
        _write(os.path.join(outdir, f"result-{rank}.pkl"), result)
        return 0
    except BaseException as exc:  # report everything, including KeyboardInterrupt/SystemExit
        tb = traceback.format_exc()
        try:
            cloudpickle.dumps(exc)
            payload = exc
        except Exception:
            payload = None
        _write(os.path.join(outdir, f"error-{max(rank, 0)}.pkl"),
               {"exception": payload, "summary": repr(exc), "traceback": tb})
        print(f"cylon-store rank {rank} failed:\n{tb}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
