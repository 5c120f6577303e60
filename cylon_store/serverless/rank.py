"""The Lambda side of a serverless run: one invocation runs one rank of ``cs.launch(...,
launcher="lambda")``.

| step | guarantee |
|---|---|
| fence | the rank's claim key is created if absent; a duplicate delivery (Lambda delivers asynchronous events at least once, and retries failures) finds it taken and does nothing else |
| run over | a delivery that arrives after the driver ended the run (payload deleted, or past the run's deadline) removes its own claim and does nothing else |
| run | ``fn(comm, *args)`` with the rank and world size of the event; every collective wait ends before the function's own timeout, with an error naming who never arrived |
| abort | the driver's abort marker (a rank failed, the driver was interrupted) cancels this rank's waits within ``abort_poll`` seconds |
| report | the return value, or the error (type, message, traceback), and the rank's accounting (billed ms, memory, cold/warm, store requests and bytes) are written under the job's keys; the driver is notified where the store has notification |
| clean up | the communicator removes what the rank wrote; a report written after the driver ended the run is removed again |

The event (JSON, well under Lambda's 1 MB asynchronous payload limit) carries only ids, the
store URL, keys and deadlines; ``fn`` and ``args`` travel through the store (cloudpickle).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any, Optional

import cloudpickle
import msgpack

from .. import keys as K
from ..errors import AlreadyExistsError, ConfigError, NotFoundError
from ..pricing import billed_ms

#: Version of the event format; the driver and the handler must agree.
EVENT_VERSION = 1
#: Collective waits end this long before the function's own timeout, so that a rank waiting on
#: a dead peer reports which peer it waited for instead of being killed silently.
DEADLINE_MARGIN_S = 3.0

# Module state survives between invocations in one execution environment: the first invocation
# after the module loads is the cold one.
_LOADED_AT = time.time()
_invocations = 0


def _process_started() -> float:
    """Epoch seconds at which this process (the execution environment's runtime) started: the
    start of Lambda's init phase, which Lambda bills on cold starts of on-demand functions
    (since August 2025). From /proc; the module's import time where there is none."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _LOADED_AT


def _context_value(context, name: str, default=None):
    value = getattr(context, name, default) if context is not None else default
    return value if value is not None else default


def parse_event(event: Any) -> dict:
    """Check an event from the driver; ConfigError naming what is wrong (then nothing is done)."""
    if not isinstance(event, dict) or event.get("cylon_store") != EVENT_VERSION:
        raise ConfigError(f"not a cylon-store rank event (version {EVENT_VERSION}): "
                          f"{str(event)[:200]!r}")
    need = {"job": str, "rank": int, "world_size": int, "store": str, "payload": str}
    for name, kind in need.items():
        if not isinstance(event.get(name), kind) or isinstance(event.get(name), bool):
            raise ConfigError(f"rank event: {name!r} missing or not a {kind.__name__}")
    K.validate_job(event["job"])
    if not 0 <= event["rank"] < event["world_size"]:
        raise ConfigError(f"rank event: rank {event['rank']} outside world size {event['world_size']}")
    return event


def handle(event: dict, context) -> dict:
    """Run one rank; returns a small summary (the real report goes through the store)."""
    global _invocations
    started = time.time()
    cold = _invocations == 0
    _invocations += 1
    ev = parse_event(event)
    job, rank, world = ev["job"], ev["rank"], ev["world_size"]
    request_id = _context_value(context, "aws_request_id", "local")
    memory_mb = int(_context_value(context, "memory_limit_in_mb", 0) or
                    os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", 0) or 0)
    remaining = (context.get_remaining_time_in_millis() / 1000.0
                 if context is not None and hasattr(context, "get_remaining_time_in_millis") else None)
    lambda_deadline = started + remaining if remaining is not None else None
    run_deadline = ev.get("deadline")

    from ..store import open_store
    store = open_store(ev["store"])
    try:
        if run_deadline is not None and started > float(run_deadline):
            return _summary(rank, "run-over", "the run's deadline passed before this delivery started")
        claim = {"request_id": request_id, "started": started, "deadline": lambda_deadline,
                 "memory_mb": memory_mb, "cold": cold, "pid": os.getpid(),
                 "log_stream": os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")}
        claim_key = K.lambda_rank_key(job, "claim", rank)
        try:
            store.put_bytes(claim_key, msgpack.packb(claim), mode="create")
        except AlreadyExistsError:
            print(f"cylon-store: rank {rank} of job {job!r} was already delivered; this duplicate "
                  f"(request {request_id}) is fenced and does nothing", flush=True)
            return _summary(rank, "fenced", "duplicate delivery")
        try:
            fn, args = cloudpickle.loads(bytes(memoryview(store.get_bytes(ev["payload"]))))
        except NotFoundError:
            store.delete(claim_key)  # the driver already ended the run: leave nothing behind
            return _summary(rank, "run-over", "the driver ended the run before this delivery")
        _notify(store, job, f"claim/{rank}")
        return _run(store, ev, fn, args, claim, started, lambda_deadline)
    finally:
        store.close()


def _run(store, ev: dict, fn, args, claim: dict, started: float,
         lambda_deadline: Optional[float]) -> dict:
    from ..comm import DEFAULT_TIMEOUT, connect

    job, rank, world = ev["job"], ev["rank"], ev["world_size"]
    timeout = float(ev.get("comm_timeout") or DEFAULT_TIMEOUT)
    if lambda_deadline is not None:
        timeout = max(1.0, min(timeout, lambda_deadline - time.time() - DEADLINE_MARGIN_S))
    cancel = threading.Event()
    stop_watch = threading.Event()
    watcher = threading.Thread(target=_watch_abort, name="cylon-abort-watch", daemon=True,
                               args=(store, job, cancel, stop_watch, float(ev.get("abort_poll") or 1.0)))
    watcher.start()
    value: Any = None
    error: Optional[BaseException] = None
    tb = ""
    try:
        with connect(store, job=job, rank=rank, world_size=world, timeout=timeout,
                     exchange=ev.get("exchange"), cancel=cancel) as comm:
            value = fn(comm, *args)
    except BaseException as exc:  # reported to the driver through the store
        error, tb = exc, traceback.format_exc()
    finally:
        stop_watch.set()
        watcher.join(5)
    ended = time.time()
    duration_ms = (ended - started) * 1000.0
    init_ms = max(0.0, (started - _process_started()) * 1000.0) if claim["cold"] else 0.0
    meta = {"rank": rank, "request_id": claim["request_id"], "cold": claim["cold"],
            "memory_mb": claim["memory_mb"], "duration_ms": duration_ms, "init_ms": init_ms,
            "billed_ms": billed_ms(duration_ms + init_ms), "max_rss_mb": _max_rss_mb(),
            # every request of this invocation (claim, payload, exchange) but the report's own put
            "stats": store.stats(), "aborted": cancel.is_set()}
    if error is None:
        kind, record = "result", {"value": value, "meta": meta}
    else:
        try:
            cloudpickle.dumps(error)
            picklable: Optional[BaseException] = error
        except Exception:  # an exception that cannot travel is reported by its text
            picklable = None
        kind, record = "error", {"exception": picklable, "type": type(error).__name__,
                                 "summary": repr(error), "traceback": tb, "meta": meta}
    key = K.lambda_rank_key(job, kind, rank)
    store.put_bytes(key, cloudpickle.dumps(record))
    if not store.exists(ev["payload"]):
        # The driver ended the run while this rank ran: nobody will read the report.
        store.delete_many([key, K.lambda_rank_key(job, "claim", rank)])
    else:
        _notify(store, job, f"{kind}/{rank}")
    if error is not None and not isinstance(error, Exception):
        raise error  # KeyboardInterrupt/SystemExit: the environment is going down
    if error is not None:
        # Lambda marks the invocation failed (metrics, logs); a retry of it is fenced by the claim.
        raise error
    return _summary(rank, "ok", "")


def _watch_abort(store, job: str, cancel: threading.Event, stop: threading.Event,
                 period: float) -> None:
    """Cancel this rank's waits once the driver writes the abort marker."""
    key = K.lambda_abort_key(job)
    while not stop.wait(period):
        try:
            if store.exists(key):
                cancel.set()
                return
        except Exception as exc:  # a store hiccup must not kill the rank; the next poll retries
            print(f"cylon-store: abort check failed ({type(exc).__name__}: {exc}); retrying",
                  flush=True)


def _notify(store, job: str, message: str) -> None:
    if store.capabilities.notification:
        store.notify(K.lambda_channel(job), message.encode())


def _max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _summary(rank: int, status: str, detail: str) -> dict:
    return {"rank": rank, "status": status, "detail": detail}
