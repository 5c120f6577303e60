"""The ``ray`` and ``dask`` launchers: run the ranks of ``cs.launch`` on a Ray or Dask cluster.

Both gang-schedule: all ``world_size`` ranks must run at once (a rank waiting in a collective
holds its slot), so the launcher first checks that the cluster can hold them all and fails at
once, naming ``world_size`` and what the cluster has, when it cannot.

* ``launcher="ray"`` uses the connected Ray cluster (``ray.init`` called already, or
  ``RAY_ADDRESS``); with neither it starts a local Ray instance for this process (as Ray's own
  first ``.remote`` call would), sized to ``max(cpu_count, world_size)`` CPUs and shut down at
  exit.  One placement group of ``world_size`` bundles of 1 CPU, strategy PACK (as few nodes as
  possible: ranks exchange data with each other; STRICT_SPREAD could not place two ranks on one
  machine), waited for at most ``start_timeout`` seconds.  Each rank is a Ray task (no retries)
  in its bundle, in a Ray worker process of its own.
* ``launcher="dask"`` uses ``client=`` or the default ``distributed.Client``.  Each rank is a
  task pinned to one worker (``workers=[addr]``, no other worker allowed, ``pure=False``):
  the ranks take free thread slots (``nthreads`` minus tasks processing) round-robin over the
  workers, so every rank has a slot of its own.  Ranks are threads of the worker processes, so
  no per-rank environment (``env=`` is refused); rank and world size go to ``connect``.

Failures end the launch promptly: a rank that raises returns its error (re-raised here with its
rank and remote traceback, the causing rank chosen as by the local launcher); a rank whose
process dies is seen by Ray (the task's worker crashed) or by polling the Dask workers (the
rank's worker left the scheduler).  The other ranks are then stopped (Ray: tasks cancelled with
``force=True``, which kills their processes; Dask: each rank's wait is cancelled through its
communicator's cancel event, and a worker whose rank does not end within a grace period is
restarted), the placement group removed, and the store's keys of the job deleted and swept.
``memory://`` becomes a shared-memory store (as for the local launcher) when every node/worker
runs on this host, and is refused when the cluster spans other hosts.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import cloudpickle

from .collective import DEFAULT_TIMEOUT, first_cause
from .errors import ConfigError, ExchangeError, RankFailedError

log = logging.getLogger("cylon_store")

#: How long to wait, by default, for a cluster whose resources are in use to place all ranks.
START_TIMEOUT = 30.0
#: After a rank's ExchangeError (maybe provoked by another rank), how long to wait for the cause.
_GRACE = 1.0
#: How long stopped ranks may take to end before they are killed (Dask) or given up on.
_STOP_GRACE = 5.0
_POLL = 0.2

ShareStore = Callable[[str], "tuple[str, Optional[Callable[[], None]]]"]


def _require(module: str, extra: str, launcher: str) -> Any:
    """Import ``module`` lazily; a missing one names the extra that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"launcher={launcher!r} needs the {module!r} package: "
                          f"pip install 'cylon-store[{extra}]'") from exc


# -- what runs on a rank ---------------------------------------------------------------------

def run_rank(payload: bytes, rank: int, world_size: int, url: str, job: str,
             comm_timeout: Optional[float], exchange: Optional[str], paths: list,
             cancel: Optional[threading.Event] = None) -> tuple:
    """Join ``job`` as ``rank`` and run the pickled ``(fn, args)``; never raises: returns
    ``("ok", value)`` or ``("err", {"exception", "summary", "traceback"})``."""
    from .comm import connect

    for p in paths:  # the caller's import path (test modules, scripts) where it exists here
        if p not in sys.path and os.path.isdir(p):
            sys.path.append(p)
    try:
        fn, args = cloudpickle.loads(payload)
        with connect(url, job=job, rank=rank, world_size=world_size, cancel=cancel,
                     timeout=comm_timeout or DEFAULT_TIMEOUT, exchange=exchange) as comm:
            return ("ok", fn(comm, *args))
    except BaseException as exc:  # reported to the launcher, which re-raises it
        tb = traceback.format_exc()
        try:
            cloudpickle.dumps(exc)
            payload_exc: Optional[BaseException] = exc
        except Exception:
            payload_exc = None
        return ("err", {"exception": payload_exc, "summary": repr(exc), "traceback": tb})


def _ray_rank(payload: bytes, rank: int, world_size: int, url: str, job: str,
              comm_timeout: Optional[float], exchange: Optional[str], paths: list,
              env: dict) -> tuple:
    """A Ray task runs alone in its worker process: the rank's environment is set for it (and
    restored after, as Ray reuses the process)."""
    env = {**env, "CYLON_STORE_RANK": str(rank), "CYLON_STORE_WORLD_SIZE": str(world_size),
           "CYLON_STORE_JOB": job, "CYLON_STORE_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run_rank(payload, rank, world_size, url, job, comm_timeout, exchange, paths)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: Dask ranks running in this worker process: (job, rank) -> their cancel event.
_DASK_RANKS: dict = {}
_DASK_CANCELLED: collections.deque = collections.deque(maxlen=256)
_DASK_LOCK = threading.Lock()


def _dask_rank(payload: bytes, rank: int, world_size: int, url: str, job: str,
               comm_timeout: Optional[float], exchange: Optional[str], paths: list) -> tuple:
    cancel = threading.Event()
    with _DASK_LOCK:
        if job in _DASK_CANCELLED:
            cancel.set()
        _DASK_RANKS[(job, rank)] = cancel
    try:
        return run_rank(payload, rank, world_size, url, job, comm_timeout, exchange, paths, cancel)
    finally:
        with _DASK_LOCK:
            _DASK_RANKS.pop((job, rank), None)


def _dask_cancel(job: str) -> list:
    """Runs on each Dask worker (``client.run``): cancel the job's ranks there."""
    with _DASK_LOCK:
        _DASK_CANCELLED.append(job)
        for (j, _), ev in _DASK_RANKS.items():
            if j == job:
                ev.set()
        return _dask_running(job)


def _dask_running(job: str) -> list:
    return sorted(r for (j, r) in list(_DASK_RANKS) if j == job)


# -- the launcher's side, shared -------------------------------------------------------------

class _Outcome:
    """What the ranks reported so far."""

    def __init__(self, world_size: int, job: str, launcher: str):
        self.results: list = [None] * world_size
        self.done: set = set()
        self.errors: dict = {}   # rank -> {"exception", "summary", "traceback"}
        self.died: dict = {}     # rank -> why
        self.job, self.launcher = job, launcher

    def report(self, rank: int, value: tuple) -> None:
        self.done.add(rank)
        status, payload = value
        if status == "ok":
            self.results[rank] = payload
        else:
            self.errors[rank] = payload

    def lost(self, rank: int, why: str) -> None:
        self.done.add(rank)
        self.died[rank] = why

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.died)

    def decisive(self) -> bool:
        """A failure whose cause is known: a rank's own error or a dead rank (an ExchangeError
        may have been provoked by a rank that has not reported yet)."""
        return bool(self.died) or any(not isinstance(e["exception"], ExchangeError)
                                      for e in self.errors.values())

    def raise_failure(self) -> None:
        causes = {r: e["exception"] for r, e in self.errors.items() if e["exception"] is not None}
        own = {r: e for r, e in causes.items() if not isinstance(e, ExchangeError)}
        if own or (causes and not self.died):
            rank = first_cause(causes)
        elif self.died:
            ranks = sorted(self.died)
            what = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
            raise RankFailedError(f"{what} of job {self.job!r} died: {self.died[ranks[0]]}",
                                  rank=ranks[0])
        else:
            rank = min(self.errors)
        info = self.errors[rank]
        raise RankFailedError(f"rank {rank} of job {self.job!r} raised {info['summary']} "
                              f"(launcher={self.launcher!r})", rank=rank,
                              remote_traceback=info["traceback"]) from info["exception"]


def _timed_out(job: str, timeout: float, outcome: _Outcome, world_size: int) -> RankFailedError:
    alive = [r for r in range(world_size) if r not in outcome.done]
    return RankFailedError(f"launch of job {job!r} timed out after {timeout:g}s; ranks {alive} "
                           f"still running", rank=alive[0] if alive else None)


def clean_job(url: str, job: str) -> None:
    """Delete what the job left in the store (after a failure: killed ranks cannot clean up)."""
    from . import keys as K
    from .config import split_url
    from .store import open_store

    if split_url(url)[0] in ("mpi", "ucx"):
        return
    try:
        with open_store(url) as store:
            prefix = K.job_prefix(job)
            store.delete_many(store.list(prefix))
            if store.capabilities.atomic_counter:
                store.delete_counter(K.counter_key(job))
            store.sweep(prefix)
    except Exception as exc:
        log.warning("cleaning up job %r after its failure failed (%s: %s); `cylon-store clean "
                    "URL --job %s` removes what is left", job, type(exc).__name__, exc, job)


def _is_memory(url: str) -> bool:
    return url.split("://", 1)[0].lower() == "memory"


def _local_hosts() -> set:
    """Names and addresses of this host (those of its hostname and its outgoing interface)."""
    hosts = {"localhost", "::1", "0.0.0.0", socket.gethostname()}
    try:
        hosts.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    try:  # the address a connection to elsewhere leaves from (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            hosts.add(s.getsockname()[0])
    except OSError:
        pass
    return hosts


def _check_memory(url: str, hosts: set, launcher: str, what: str,
                  local: Optional[set] = None) -> None:
    """memory:// (shared memory of this host) only when every node/worker runs on this host."""
    known = _local_hosts() | set(local or ())
    foreign = sorted(h for h in hosts if h not in known and not h.startswith("127."))
    if _is_memory(url) and foreign:
        raise ConfigError(f"memory:// lives on this host, but the {launcher} cluster's {what} run "
                          f"on {', '.join(foreign)}: use a store every host reaches (redis://, "
                          f"s3://, file:// on a shared file system)")


def _run(body: Callable[[str], list], url: str, job: str, share: ShareStore) -> list:
    """Run ``body(url)`` with memory:// made shared; on failure clean the job's keys."""
    url, remove = share(url)
    ok = False
    try:
        values = body(url)
        ok = True
        return values
    finally:
        if not ok and remove is None:
            clean_job(url, job)
        if remove is not None:
            remove()


# -- Ray ---------------------------------------------------------------------------------------

_RAY_TASK: Any = None


def launch_ray(fn: Callable, world_size: int, url: str, args: tuple, job: str, *,
               timeout: Optional[float], comm_timeout: Optional[float], exchange: Optional[str],
               env: dict, start_timeout: Optional[float], share: ShareStore) -> list:
    ray = _require("ray", "ray", "ray")
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    global _RAY_TASK
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING)
        else:
            log.info("launcher='ray': no Ray cluster connected and no RAY_ADDRESS: starting a "
                     "local Ray instance")
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, world_size),
                     include_dashboard=False, logging_level=logging.WARNING)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if _is_memory(url):
        here = ray.get_runtime_context().get_node_id()
        _check_memory(url, {n.get("NodeManagerAddress", "") for n in nodes}, "ray", "nodes",
                      {n.get("NodeManagerAddress") for n in nodes if n.get("NodeID") == here})
    total = ray.cluster_resources().get("CPU", 0)
    if total < world_size:
        raise ConfigError(f"launcher='ray' runs {world_size} ranks at once, one 1-CPU bundle "
                          f"each, but the Ray cluster has {total:g} CPU(s) on {len(nodes)} "
                          f"node(s): use fewer ranks or a bigger cluster")
    if _RAY_TASK is None:
        _RAY_TASK = ray.remote(_ray_rank)
    wait_start = START_TIMEOUT if start_timeout is None else start_timeout
    payload = cloudpickle.dumps((fn, args))
    paths = [p for p in sys.path if p]

    def body(url: str) -> list:
        pg = placement_group([{"CPU": 1}] * world_size, strategy="PACK", name=f"cylon-{job}")
        refs: list = []
        try:
            try:
                ray.get(pg.ready(), timeout=wait_start)
            except ray.exceptions.GetTimeoutError:
                free = ray.available_resources().get("CPU", 0)
                raise ConfigError(
                    f"launcher='ray' could not place {world_size} ranks (1 CPU each) within "
                    f"{wait_start:g}s: the Ray cluster has {total:g} CPU(s), {free:g} free "
                    f"(others in use); raise start_timeout= to wait longer") from None
            ref = ray.put(payload)
            for rank in range(world_size):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank)
                refs.append(_RAY_TASK.options(
                    num_cpus=1, max_retries=0, scheduling_strategy=strategy,
                    name=f"cylon-rank-{rank}-{job}").remote(
                        ref, rank, world_size, url, job, comm_timeout, exchange, paths, env))
            return _supervise_ray(ray, refs, world_size, job, timeout)
        finally:
            _stop_ray(ray, refs)
            remove_placement_group(pg)

    return _run(body, url, job, share)


def _supervise_ray(ray, refs: list, world_size: int, job: str, timeout: Optional[float]) -> list:
    outcome = _Outcome(world_size, job, "ray")
    rank_of = {ref: r for r, ref in enumerate(refs)}
    pending = list(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    grace_end = None

    def collect(done):
        for ref in done:
            rank = rank_of[ref]
            try:
                outcome.report(rank, ray.get(ref))
            except ray.exceptions.RayError as exc:
                what = ("its Ray worker process exited (killed, os._exit, out of memory)"
                        if isinstance(exc, (ray.exceptions.WorkerCrashedError,
                                            ray.exceptions.NodeDiedError)) else
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                outcome.lost(rank, what)

    while pending:
        now = time.monotonic()
        if outcome.failed:
            if outcome.decisive() or (grace_end is not None and now >= grace_end):
                break
            grace_end = grace_end or now + _GRACE
        if deadline is not None and now >= deadline:
            raise _timed_out(job, timeout or 0.0, outcome, world_size)
        wait = min([0.5] + [t - now for t in (deadline, grace_end) if t is not None])
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, wait))
        collect(done)
        # More may be ready at once: take them without waiting.
        if pending:
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            collect(more)
    if outcome.failed:
        outcome.raise_failure()
    return outcome.results


def _stop_ray(ray, refs: list) -> None:
    """Kill what still runs (its worker process) and wait a little for it to end."""
    if not refs:
        return
    _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in running:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # finished meanwhile
            pass
    if running:
        ray.wait(running, num_returns=len(running), timeout=_STOP_GRACE)


# -- Dask --------------------------------------------------------------------------------------

def launch_dask(fn: Callable, world_size: int, url: str, args: tuple, job: str, *,
                timeout: Optional[float], comm_timeout: Optional[float], exchange: Optional[str],
                start_timeout: Optional[float], client: Any, share: ShareStore) -> list:
    distributed = _require("distributed", "dask", "dask")
    from distributed.comm import get_address_host

    if client is None:
        try:
            client = distributed.Client.current()
        except ValueError:
            raise ConfigError("launcher='dask' runs on the default distributed.Client: create "
                              "one first (distributed.Client(...)) or pass client=") from None
    elif not isinstance(client, distributed.Client):
        raise ConfigError(f"client= must be a distributed.Client, got {type(client).__name__}")
    if _is_memory(url):
        hosts = {get_address_host(a) for a in client.nthreads()
                 if not a.startswith("inproc://")}
        _check_memory(url, hosts, "dask", "workers")
    slots = _dask_slots(client, world_size, START_TIMEOUT if start_timeout is None
                        else start_timeout)
    payload: Any = cloudpickle.dumps((fn, args))
    paths = [p for p in sys.path if p]

    def body(url: str) -> list:
        data = payload
        if len(payload) > 1 << 20:  # one copy per worker, not one per task
            data = client.scatter(payload, workers=sorted(set(slots)), broadcast=True, hash=False)
        futures = [client.submit(_dask_rank, data, rank, world_size, url, job, comm_timeout,
                                 exchange, paths, key=f"cylon-rank-{rank}-{job}",
                                 workers=[slots[rank]], allow_other_workers=False, pure=False,
                                 retries=0)
                   for rank in range(world_size)]
        ok = False
        try:
            values = _supervise_dask(distributed, client, futures, slots, job, timeout)
            ok = True
            return values
        finally:
            if not ok:
                _stop_dask(client, job, slots)
            client.cancel(futures)

    return _run(body, url, job, share)


def _dask_slots(client, world_size: int, wait: float) -> list:
    """One worker address per rank: free thread slots, round-robin over the workers."""
    deadline = time.monotonic() + wait
    while True:
        nthreads = client.nthreads()
        processing = client.processing()
        total = sum(nthreads.values())
        if total < world_size:
            raise ConfigError(f"launcher='dask' runs {world_size} ranks at once, one per worker "
                              f"thread, but the Dask cluster has {total} thread(s) over "
                              f"{len(nthreads)} worker(s): use fewer ranks or more workers/threads")
        free = {a: max(0, n - len(processing.get(a, ()))) for a, n in sorted(nthreads.items())}
        if sum(free.values()) >= world_size:
            slots: list = []
            while len(slots) < world_size:
                for addr in free:
                    if free[addr] > 0 and len(slots) < world_size:
                        slots.append(addr)
                        free[addr] -= 1
            return slots
        if time.monotonic() >= deadline:
            raise ConfigError(f"launcher='dask' needs {world_size} free worker threads; the Dask "
                              f"cluster has {total}, {sum(free.values())} free (others busy with "
                              f"tasks) after {wait:g}s; raise start_timeout= to wait longer")
        time.sleep(_POLL)


def _supervise_dask(distributed, client, futures: list, slots: list, job: str,
                    timeout: Optional[float]) -> list:
    world_size = len(futures)
    outcome = _Outcome(world_size, job, "dask")
    deadline = None if timeout is None else time.monotonic() + timeout
    grace_end = None
    while True:
        for rank, fut in enumerate(futures):
            if rank in outcome.done or not fut.done():
                continue
            if fut.status == "finished":
                outcome.report(rank, fut.result())
            else:  # "error" (KilledWorker...) or "cancelled"
                exc = fut.exception() if fut.status == "error" else None
                outcome.lost(rank, f"its Dask task ended as {fut.status!r}"
                                   + (f" ({type(exc).__name__}: {exc})" if exc else ""))
        running = [r for r in range(world_size) if r not in outcome.done]
        if running:
            # A worker that died (os._exit, killed, out of memory) leaves the scheduler; a
            # nanny restarts it under a new address, and its pinned ranks would never run.
            alive = client.nthreads()
            for rank in running:
                if slots[rank] not in alive:
                    outcome.lost(rank, f"the Dask worker {slots[rank]} was lost "
                                       f"(killed, os._exit, out of memory)")
        now = time.monotonic()
        if outcome.failed:
            if outcome.decisive() or (grace_end is not None and now >= grace_end):
                outcome.raise_failure()
            grace_end = grace_end or now + _GRACE
        if len(outcome.done) == world_size:
            if outcome.failed:
                outcome.raise_failure()
            return outcome.results
        if deadline is not None and now >= deadline:
            raise _timed_out(job, timeout or 0.0, outcome, world_size)
        try:
            distributed.wait([futures[r] for r in range(world_size) if r not in outcome.done],
                             timeout=_POLL, return_when="FIRST_COMPLETED")
        except (TimeoutError, distributed.TimeoutError):
            pass


def _stop_dask(client, job: str, slots: list) -> None:
    """Cancel the ranks' waits on every worker; restart a worker whose rank does not end."""
    workers = sorted(set(slots) & set(client.nthreads()))
    if not workers:
        return
    deadline = time.monotonic() + _STOP_GRACE
    running = client.run(_dask_cancel, job, workers=workers, on_error="ignore")
    while True:
        stuck = sorted(a for a, ranks in running.items() if isinstance(ranks, list) and ranks)
        if not stuck:
            return
        if time.monotonic() >= deadline:
            log.warning("job %r: ranks on Dask workers %s did not stop within %gs: restarting "
                        "those workers", job, stuck, _STOP_GRACE)
            try:
                client.restart_workers(stuck, raise_for_error=False)
            except Exception as exc:
                log.warning("restarting Dask workers %s failed: %s", stuck, exc)
            return
        time.sleep(_POLL)
        running = client.run(_dask_running, job, workers=stuck, on_error="ignore")
