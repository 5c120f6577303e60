"""The driver of a serverless run: ``cs.launch(fn, n, store=URL, launcher="lambda", function=NAME)``.

| step | guarantee |
|---|---|
| before any invoke | the store is one Lambda ranks can share (not ucx://, mpi:// or a process-local memory://), the function exists (its memory, timeout and architecture are read), ``fn``/``args`` are cloudpickled into the store under the job's keys |
| invoke | one asynchronous (``Event``) invocation per rank through boto3's Lambda client (credentials, region, ``AWS_ENDPOINT_URL_LAMBDA`` from boto3's chain); a throttled invoke is retried, bounded and jittered — safe because a duplicate delivery is fenced by the handler |
| wait | for every rank's result or error: blocking notification where the store has it, else polling with capped backoff; bounded three ways, each error naming the ranks: never started (``start_timeout`` after its invoke), started but silent past its Lambda deadline (killed at its timeout or memory limit), the whole launch's ``timeout`` |
| failure | the first cause is raised as ``RankFailedError`` (rank, remote traceback); the other ranks are told to stop (abort marker) and waited for, bounded |
| end | the payload is deleted first (a late duplicate then does nothing), then every key of the job: nothing left behind, on success, failure or Ctrl-C |
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import cloudpickle
import msgpack

from .. import keys as K
from ..collective import first_cause
from ..errors import (ConfigError, ExchangeError, NotFoundError,
                      RankFailedError, StoreError, ThrottledError, TransientError)
from .rank import EVENT_VERSION

#: Lambda's payload limit for asynchronous (Event) invocations (AWS Lambda quotas: 1 MB since
#: 2025; 256 KB before). Events here are a few hundred bytes; fn and args go through the store.
ASYNC_PAYLOAD_LIMIT = 1024 * 1024
#: A rank whose invocation was accepted but that has not claimed its slot by then never started.
DEFAULT_START_TIMEOUT = 120.0
#: After a rank's Lambda deadline, how long its report may take to become visible.
DEADLINE_GRACE = 5.0
#: After a failure or an interrupt, how long the other ranks get to notice the abort and clean up.
ABORT_GRACE = 30.0
#: Invoke attempts for one rank when Lambda throttles (TooManyRequests) or fails transiently.
INVOKE_ATTEMPTS = 8
_NOT_ON_LAMBDA = ("ucx", "mpi")
log = logging.getLogger("cylon_store.serverless")


@dataclass
class _RankState:
    invoked_at: Optional[float] = None
    request_id: str = ""
    claim: Optional[dict] = None
    done: Optional[str] = None         # "result" | "error"


@dataclass
class LambdaRun:
    """One run's mutable state (the spec is the arguments of ``run``)."""
    job: str
    world_size: int
    store: Any
    ranks: list = field(default_factory=list)
    invocations: int = 0
    throttled: int = 0
    aborted: bool = False


def check_store_url(url: str, *, local: bool) -> str:
    """The store URL ranks will use, or ConfigError before anything is invoked."""
    from ..config import split_url
    scheme, location, query = split_url(url)
    if scheme in _NOT_ON_LAMBDA:
        raise ConfigError(f"{scheme}:// needs inbound connections between ranks, which AWS Lambda "
                          f"does not allow: with launcher='lambda' use a store the ranks can all "
                          f"reach (s3://, dynamodb://, redis:// (ElastiCache), file:// on EFS, or "
                          f"the flight:// shuffle service)")
    if scheme == "memory" and not local and query.get("shared", "").lower() not in ("1", "true", "yes", "on"):
        raise ConfigError("memory:// lives in one process and Lambda ranks run in their own "
                          "sandboxes: use s3://, dynamodb://, redis:// or file:// on EFS "
                          "(launcher='lambda-local' shares memory:// on this machine)")
    return url


def lambda_client(endpoint_url: Optional[str] = None, *, local: bool = False):
    """boto3's Lambda client with its own retries off: throttles are retried here, per rank.
    ``local``: a local Lambda service, which checks no signature: placeholder credentials and
    region when the environment has none."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise ConfigError("launcher='lambda' needs boto3: pip install 'cylon-store[lambda]'") from exc
    cfg = Config(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=60,
                 max_pool_connections=64)
    session = boto3.session.Session()
    kw: dict = {}
    if local:
        if session.get_credentials() is None:
            kw.update(aws_access_key_id="local", aws_secret_access_key="local")
        if session.region_name is None:
            kw["region_name"] = "us-east-1"
    return session.client("lambda", endpoint_url=endpoint_url, config=cfg, **kw)


def _function_config(client, function: str) -> dict:
    try:
        return client.get_function_configuration(FunctionName=function)
    except client.exceptions.ResourceNotFoundException as exc:
        region = client.meta.region_name
        raise ConfigError(f"Lambda function {function!r} not found (region {region}, endpoint "
                          f"{client.meta.endpoint_url}): deploy it with `cylon-store lambda "
                          f"deploy --function {function} --role ARN`") from exc
    except Exception as exc:
        raise _aws_error(exc, f"reading the configuration of Lambda function {function!r}") from exc


def _aws_error(exc: Exception, what: str) -> StoreError:
    """botocore errors by code, not text: throttling and 5xx are retryable."""
    code = ""
    status = 0
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code", "")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in ("TooManyRequestsException", "ThrottlingException", "EC2ThrottledException") or status == 429:
        return ThrottledError(f"{what}: Lambda throttled the call ({code or status})", backend="lambda")
    if status >= 500 or code in ("ServiceException", "ResourceNotReadyException") or not resp:
        return TransientError(f"{what}: {type(exc).__name__}: {exc}", backend="lambda")
    if code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"):
        from ..errors import PermissionDeniedError
        return PermissionDeniedError(f"{what}: {code}", backend="lambda")
    return StoreError(f"{what}: {code or type(exc).__name__}: {exc}", backend="lambda")


def run(fn: Callable, world_size: int, store_url: str, args: Sequence, job: str, *, function: str,
        timeout: Optional[float], comm_timeout: Optional[float], exchange: Optional[str],
        report: bool, start_timeout: Optional[float] = None, client=None, local: bool = False,
        abort_poll: Optional[float] = None):
    """Run ``fn(comm, *args)`` on ``world_size`` Lambda invocations of ``function``."""
    from ..retry import call as retry_call
    from ..store import open_store
    from .report import build_report

    if not isinstance(function, str) or not function:
        raise ConfigError("launcher='lambda' needs function='NAME' (the deployed function, see "
                          "`cylon-store lambda deploy`)")
    check_store_url(store_url, local=local)
    start_timeout = DEFAULT_START_TIMEOUT if start_timeout is None else float(start_timeout)
    if start_timeout <= 0:
        raise ConfigError(f"start_timeout must be positive, got {start_timeout!r}")
    client = client or lambda_client()
    config = _function_config(client, function)
    memory_mb = int(config.get("MemorySize", 128))
    function_timeout = float(config.get("Timeout", 3))
    arch = (config.get("Architectures") or ["x86_64"])[0]
    t0 = time.monotonic()
    deadline = None if timeout is None else time.time() + timeout

    store = open_store(store_url)
    state = LambdaRun(job=job, world_size=world_size, store=store,
                      ranks=[_RankState() for _ in range(world_size)])
    payload_key = K.lambda_payload_key(job)
    try:
        payload = cloudpickle.dumps((fn, tuple(args)))
        store.put_bytes(payload_key, payload, mode="create")
    except BaseException:
        store.close()
        raise
    try:
        if abort_poll is None:
            abort_poll = 1.0 if store.scheme in ("s3", "dynamodb") else 0.25
        event_base = {"cylon_store": EVENT_VERSION, "job": job, "world_size": world_size,
                      "store": store_url, "payload": payload_key, "comm_timeout": comm_timeout,
                      "exchange": exchange, "deadline": deadline, "abort_poll": abort_poll}

        def invoke(rank: int) -> None:
            body = json.dumps({**event_base, "rank": rank}).encode()
            if len(body) > ASYNC_PAYLOAD_LIMIT:
                raise ConfigError(f"rank event of {len(body)} bytes exceeds Lambda's asynchronous "
                                  f"payload limit ({ASYNC_PAYLOAD_LIMIT} bytes)")

            def once():
                try:
                    resp = client.invoke(FunctionName=function, InvocationType="Event", Payload=body)
                except Exception as exc:
                    err = _aws_error(exc, f"invoking rank {rank} of job {job!r} on {function!r}")
                    if isinstance(err, ThrottledError):
                        state.throttled += 1
                    raise err from exc
                st = state.ranks[rank]
                st.invoked_at = time.time()
                st.request_id = resp.get("ResponseMetadata", {}).get("RequestId", "")
                state.invocations += 1
            # Idempotent: a second delivery of a rank is fenced by its claim key.
            retry_call(once, idempotent=True, attempts=INVOKE_ATTEMPTS, base=0.2, cap=5.0)

        with ThreadPoolExecutor(max_workers=min(32, world_size)) as pool:
            futures = [pool.submit(invoke, r) for r in range(world_size)]
            failures = []
            for rank, fut in enumerate(futures):
                exc = fut.exception()
                if exc is not None:
                    failures.append((rank, exc))
        if failures:
            rank, exc = failures[0]
            raise RankFailedError(f"rank {rank} of job {job!r} could not be invoked "
                                  f"({len(failures)} rank(s) failed to invoke: "
                                  f"{[r for r, _ in failures]}): {exc}", rank=rank) from exc

        metas, values = _wait(state, function_timeout, start_timeout, deadline, timeout)
        wall = time.monotonic() - t0
        if not report:
            return values
        notes = [f"billed ms are the handler's own clock: the rank's work, plus the init phase "
                 f"of {sum(1 for m in metas if m['cold'])} cold start(s) from the process start"]
        return values, build_report(function=function, architecture=arch, memory_mb=memory_mb,
                                    world_size=world_size, scheme=store.scheme, wall_seconds=wall,
                                    invocations=state.invocations, throttled=state.throttled,
                                    metas=metas, driver_stats=store.stats(), notes=tuple(notes))
    except BaseException:
        _abort(state, function_timeout)
        raise
    finally:
        _cleanup(state)


def _scan(state: LambdaRun) -> dict:
    """LIST the run's keys; read each new claim once. Returns {rank: kind} of new reports."""
    store, job = state.store, state.job
    new = {}
    for key in store.list(K.lambda_prefix(job)):
        try:
            kind, rank = K.parse_lambda_rank_key(key)
        except ValueError:
            continue
        if rank >= state.world_size:
            continue
        st = state.ranks[rank]
        if kind == "claim" and st.claim is None:
            try:
                st.claim = msgpack.unpackb(bytes(memoryview(store.get_bytes(key))))
            except NotFoundError:
                continue
        elif kind in ("result", "error") and st.done is None:
            st.done = kind
            new[rank] = kind
    return new


def _wait(state: LambdaRun, function_timeout: float, start_timeout: float,
          deadline: Optional[float], timeout: Optional[float]):
    from ..retry import poll_delays

    store, job, P = state.store, state.job, state.world_size
    notify = store.capabilities.notification
    delays = poll_delays(first=0.02, cap=1.0 if store.scheme in ("s3", "dynamodb") else 0.1)
    records: dict[int, dict] = {}
    while True:
        new = _scan(state)
        for rank, kind in new.items():
            records[rank] = cloudpickle.loads(bytes(memoryview(
                store.get_bytes(K.lambda_rank_key(job, kind, rank)))))
        errors = {r: rec for r, rec in records.items() if state.ranks[r].done == "error"}
        if errors and not state.aborted:
            _write_abort(state)  # the others stop waiting within their abort poll
        if len(records) == P and not errors:
            metas = [{**records[r]["meta"], "ok": True} for r in range(P)]
            return metas, [records[r]["value"] for r in range(P)]
        now = time.time()
        dead = [r for r, st in enumerate(state.ranks) if st.done is None and st.claim is not None
                and st.claim.get("deadline") and now > st.claim["deadline"] + DEADLINE_GRACE]
        if errors and (any(_priority(rec) == 0 for rec in errors.values()) or not dead and not [
                r for r, st in enumerate(state.ranks) if st.done is None and st.claim is not None]):
            # A rank's own error, or only waits that failed and no started rank left to blame.
            _raise_first_cause(state, errors, function_timeout)
        if dead:
            r = dead[0]
            claim = state.ranks[r].claim
            raise RankFailedError(
                f"rank {r} of job {job!r} (request {claim.get('request_id')}) started but did not "
                f"report before its Lambda deadline ({function_timeout:g} s function timeout): "
                f"Lambda killed it at its timeout or memory limit ({claim.get('memory_mb')} MB); "
                f"see log stream {claim.get('log_stream') or '?'}"
                + (f"; also silent: ranks {dead[1:]}" if len(dead) > 1 else ""), rank=r)
        unstarted = [r for r, st in enumerate(state.ranks) if st.claim is None and st.done is None
                     and st.invoked_at is not None and now > st.invoked_at + start_timeout]
        if unstarted:
            raise RankFailedError(
                f"rank(s) {unstarted} of job {job!r} never started within {start_timeout:g} s of "
                f"their invocation: Lambda throttled them or the function's concurrency limit "
                f"(reserved, or the account's) is below the world size {P} — every rank must run "
                f"at once", rank=unstarted[0])
        if deadline is not None and now > deadline:
            missing = [r for r, st in enumerate(state.ranks) if st.done is None]
            raise RankFailedError(f"launch of job {job!r} timed out after {timeout:g}s; ranks "
                                  f"{missing} did not report", rank=missing[0] if missing else None)
        wait_s = next(delays)
        if notify:
            store.wait(K.lambda_channel(job), max(wait_s, 0.25))
        else:
            time.sleep(wait_s)


def _priority(record: dict) -> int:
    """0: the rank's own error; more: it timed out waiting for another, or was cancelled."""
    exc = record.get("exception")
    return 0 if not isinstance(exc, ExchangeError) else 1


def _raise_first_cause(state: LambdaRun, errors: dict, function_timeout: float) -> None:
    """The rank whose own error caused the others' (the launchers' rule, ``collective.first_cause``)."""
    causes = {r: rec["exception"] for r, rec in errors.items() if rec.get("exception") is not None}
    rank = first_cause(causes) if causes else min(errors)
    info = errors[rank]
    raise RankFailedError(f"rank {rank} of job {state.job!r} raised {info['summary']}", rank=rank,
                          remote_traceback=info["traceback"]) from info.get("exception")


def _write_abort(state: LambdaRun) -> bool:
    try:
        state.store.put_bytes(K.lambda_abort_key(state.job), b"abort")
    except Exception as exc:  # the cleanup still runs; ranks then end at their own timeouts
        log.warning("could not write the abort marker of job %r: %s", state.job, exc)
        return False
    state.aborted = True
    return True


def _abort(state: LambdaRun, function_timeout: float) -> None:
    """Tell every running rank to stop, then give the started ones a bounded time to report."""
    if not state.aborted and not _write_abort(state):
        return
    end = time.monotonic() + min(ABORT_GRACE, function_timeout)
    while time.monotonic() < end:
        try:
            _scan(state)
        except Exception as exc:  # the cleanup still runs
            log.warning("job %r: could not check which ranks still run after the abort: %s",
                        state.job, exc)
            break
        running = [r for r, st in enumerate(state.ranks) if st.claim is not None and st.done is None
                   and (not st.claim.get("deadline") or time.time() < st.claim["deadline"])]
        if not running:
            return
        time.sleep(0.2)


def _cleanup(state: LambdaRun) -> None:
    """Payload first (a late duplicate then finds the run over), then every key of the job."""
    store, job = state.store, state.job
    try:
        store.delete(K.lambda_payload_key(job))
        store.delete_many(store.list(K.job_prefix(job)))
    finally:
        store.close()


def new_job() -> str:
    return f"lambda-{uuid.uuid4().hex[:12]}"
