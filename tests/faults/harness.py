"""The 4-rank exchange the fault tests run, and the checks of its outcome.

Each rank sends distinct rows to every rank (``id = src * 1e6 + dst * 1e5 + i`` and a string
column), so a received row names its sender and its destination.  The expected content of each
rank's result is known up front; a completed exchange is checked by a content digest (the
received rows sorted by id, written as Arrow IPC and hashed), not by counts, and the rows lost
or duplicated are counted from the ids.  A failed exchange must fail cleanly: ``cs.launch``
raises ``RankFailedError`` whose cause is a ``StoreError`` named in its message, every error a
rank saw is a ``StoreError``, all within the collective timeout plus a margin, and no secret
appears in any message.  Afterwards a direct (unproxied) store must hold nothing under
``_cylon/`` — or ``cylon-store clean`` must remove what is left.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

import cylon_store as cs

WORLD = 4
#: Collective wait timeout inside the ranks, and the margin a failure may take beyond it.
COMM_TIMEOUT = 20.0
MARGIN = 30.0
#: Retry options every faulty store gets (short: the suite must stay fast).
RETRY_OPTS = {"retries": 6, "retry_base": 0.01, "retry_cap": 0.2}


def query(opts: dict) -> str:
    return "&".join(f"{k}={v}" for k, v in opts.items())


# -- data --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def part(src: int, dst: int, rows: int) -> pa.Table:
    """The rows rank ``src`` sends to rank ``dst``."""
    i = np.arange(rows, dtype=np.int64)
    ids = src * 1_000_000 + dst * 100_000 + i
    text = pa.array([f"src{src}-dst{dst}-row{k:07d}-payload" for k in range(rows)], pa.string())
    return pa.table({"id": pa.array(ids), "s": text})


def _normalized(tables: list) -> pa.Table:
    t = pa.concat_tables([x.replace_schema_metadata(None) for x in tables])
    return t.sort_by("id").combine_chunks()


def digest(table: pa.Table) -> str:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


@functools.lru_cache(maxsize=4)
def expected(rows: int, world: int = WORLD) -> tuple:
    """Per destination rank: (digest of the rows it must receive, their sorted ids)."""
    out = []
    for d in range(world):
        t = _normalized([part(s, d, rows) for s in range(world)])
        out.append((digest(t), t.column("id").to_numpy()))
    return tuple(out)


def bytes_per_rank(rows: int, world: int = WORLD) -> int:
    return sum(part(0, d, rows).nbytes for d in range(1, world))


# -- the run -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    backend: str
    fault: str
    outcome: str = ""                # "completed" | "clean error"
    seconds: float = 0.0
    rows_lost: int = 0
    rows_duplicated: int = 0
    #: Every rank's received rows hash to the expected digest (None: the exchange failed).
    digests_ok: Optional[bool] = None
    error: Optional[BaseException] = None
    rank_errors: dict = field(default_factory=dict)
    leftovers: int = 0               # keys under _cylon/ after the launch (direct listing)
    cleaned_by: str = ""             # "close" (nothing left) | "cli clean"
    raw_leftovers: Optional[int] = None
    fault_stats: dict = field(default_factory=dict)
    store_stats: dict = field(default_factory=dict)

    def record(self) -> dict:
        err = self.error
        return {"fault": self.fault, "backend": self.backend, "outcome": self.outcome,
                "rows_lost": self.rows_lost, "rows_duplicated": self.rows_duplicated,
                "digests_ok": self.digests_ok,
                "seconds": round(self.seconds, 2), "leftovers": self.leftovers,
                "cleaned_by": self.cleaned_by, "raw_leftovers": self.raw_leftovers,
                "error": None if err is None else _summary(err),
                "fault_stats": self.fault_stats}


def _summary(err: BaseException) -> str:
    cause = err.__cause__
    text = f"{type(err).__name__}"
    if cause is not None:
        text += f" <- {type(cause).__name__}: {str(cause)[:300]}"
    else:
        text += f": {str(err)[:300]}"
    return text


def _rank(comm, rows: int, world: int, rank_errors: dict, lock: threading.Lock):
    parts = [part(comm.rank, d, rows) for d in range(world)]
    try:
        out = comm.exchange(parts)
    except BaseException as exc:
        with lock:
            rank_errors[comm.rank] = (exc, traceback.format_exc())
        raise
    t = _normalized(out)
    return {"rank": comm.rank, "digest": digest(t), "ids": t.column("id").to_numpy()}


def run_exchange(url: str, *, backend: str, fault: str, rows: int,
                 comm_timeout: float = COMM_TIMEOUT, world: int = WORLD) -> Outcome:
    """Run the exchange through ``url`` with the threads launcher; never raises for a failed
    exchange (the outcome holds the error)."""
    rank_errors: dict = {}
    lock = threading.Lock()
    result = Outcome(backend=backend, fault=fault)
    t0 = time.monotonic()
    try:
        values = cs.launch(_rank, world, store=url, launcher="threads", args=(rows, world,
                                                                          rank_errors, lock),
                           timeout=comm_timeout + MARGIN, comm_timeout=comm_timeout)
    except BaseException as exc:  # noqa: BLE001 - checked by check_outcome
        result.seconds = time.monotonic() - t0
        result.error = exc
        result.outcome = "clean error"   # confirmed (or refuted) by check_outcome
        result.rank_errors = rank_errors
        return result
    result.seconds = time.monotonic() - t0
    result.outcome = "completed"
    result.rank_errors = rank_errors
    exp = expected(rows, world)
    lost = dup = 0
    digests_ok = True
    for v in values:
        d = v["rank"]
        want_digest, want_ids = exp[d]
        got = v["ids"]
        uniq = np.unique(got)
        lost += int(np.setdiff1d(want_ids, uniq, assume_unique=True).size)
        dup += int(got.size - uniq.size) + int(np.setdiff1d(uniq, want_ids, assume_unique=True).size)
        digests_ok &= v["digest"] == want_digest
    result.rows_lost, result.rows_duplicated = lost, dup
    result.digests_ok = digests_ok
    return result


def error_texts(err: BaseException) -> list[str]:
    """Every message of an error chain, with the remote tracebacks a launch attaches."""
    texts, seen = [], set()
    cur: Optional[BaseException] = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        texts += [str(cur), repr(cur)]
        tb = getattr(cur, "remote_traceback", None)
        if tb:
            texts.append(tb)
        texts.append("".join(traceback.format_exception(type(cur), cur, cur.__traceback__)))
        cur = cur.__cause__ or cur.__context__
    return texts


def check_outcome(res: Outcome, *, secrets: tuple = (), comm_timeout: float = COMM_TIMEOUT,
                  log_records: tuple = ()) -> None:
    """The suite's invariant: exactly-once delivery, or a clean error in time; no secret."""
    assert res.seconds <= comm_timeout + MARGIN, (
        f"{res.backend}/{res.fault}: took {res.seconds:.1f}s, more than the timeout "
        f"{comm_timeout:g}s + {MARGIN:g}s")
    texts = [r.getMessage() for r in log_records]
    for exc, tb in res.rank_errors.values():
        texts += error_texts(exc) + [tb]
    if res.error is not None:
        texts += error_texts(res.error)
    for secret in secrets:
        leaked = [t for t in texts if secret in t]
        assert not leaked, f"a secret appears in an error or log message: {leaked[0][:2000]}"
    # Every error a rank saw in its exchange is one of the project's.
    for rank, (exc, tb) in res.rank_errors.items():
        assert isinstance(exc, cs.StoreError), (
            f"{res.backend}/{res.fault}: rank {rank} raised {type(exc).__name__}, not a "
            f"StoreError:\n{tb}")
    if res.error is None:
        assert res.outcome == "completed"
        assert not res.rank_errors, res.rank_errors
        assert (res.rows_lost, res.rows_duplicated) == (0, 0), (
            f"{res.backend}/{res.fault}: {res.rows_lost} rows lost, {res.rows_duplicated} "
            f"duplicated")
        assert res.digests_ok, f"{res.backend}/{res.fault}: a rank's rows do not match their digest"
        return
    err = res.error
    assert isinstance(err, cs.RankFailedError), (
        f"{res.backend}/{res.fault}: launch raised {type(err).__name__}: {err}")
    # The launch's own timeout (no cause, "ranks [...] still running"): a rank hung.
    assert err.__cause__ is not None or "still running" not in str(err), (
        f"{res.backend}/{res.fault}: a rank hung past the launch timeout: {err}")
    cause = err.__cause__
    assert isinstance(cause, cs.StoreError), (
        f"{res.backend}/{res.fault}: the launch error's cause is "
        f"{type(cause).__name__ if cause else None}, not a StoreError:\n{err}")
    first_line = str(err).split("\n", 1)[0]
    assert type(cause).__name__ in first_line, f"the launch error does not name its cause: {err}"


# -- leftovers ---------------------------------------------------------------------------------

def settle_leftovers(res: Outcome, direct_url: str,
                     raw_count: Optional[Callable[[], int]] = None) -> None:
    """List ``_cylon/`` through a direct store: nothing may be left after the launch; if
    something is, ``cylon-store clean`` must remove it.  Records which of the two held."""
    from cylon_store.cli import main as cli_main

    with cs.open_store(direct_url) as store:
        left = store.list("_cylon/")
    res.leftovers = len(left)
    if left:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli_main(["clean", direct_url]) == 0
        with cs.open_store(direct_url) as store:
            still = store.list("_cylon/")
        assert not still, f"{res.backend}/{res.fault}: `cylon-store clean` left {still}"
        res.cleaned_by = "cli clean"
    else:
        res.cleaned_by = "close"
    if raw_count is not None:
        try:
            res.raw_leftovers = raw_count()
        except Exception as exc:  # informational only
            logging.getLogger(__name__).warning("raw leftover count failed: %s", exc)
