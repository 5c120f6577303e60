"""What the S3 and DynamoDB adapters share, so that each keeps only what is specific to its
service:

- ``AwsOptions``: the client options both take;
- ``make_client``: lazily built boto3 clients with the SDK's own retries turned off (the adapters
  and the facade retry through ``cylon_store.retry``) and every HTTP attempt counted;
- the translation of AWS errors into the project's hierarchy by error *code* (never message
  text), keeping the cause (``map_error_code``, ``map_botocore_error``);
- ``AwsAdapter``: the base class of both adapters — the URL's resource/path split, the client
  and thread-pool properties, ``close``, the mapping of one call's errors with the adapter's own
  overrides (by code), and ``_call`` with its three retry modes ("none", "all", "safe") on the
  store's retry options (``_retry.RetryPolicy``);
- ``Gate``: the semaphore-gated upload to the pool (bounded memory; the first error stops the
  rest, cancels what has not started and runs the adapter's cleanup), and ``cancel_all``;
- payload helpers (``iter_views``, ``cut``) and ``Uncertain``.

boto3 is imported only when a client is first built, never when ``cylon_store`` is imported.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Optional

from cylon_store.config import StoreOptions
from cylon_store.errors import (ConfigError, NotFoundError, PayloadTooLargeError,
                                PermissionDeniedError, PreconditionError, StoreError,
                                ThrottledError, TransientError)

from ._retry import counting_retries
from .base import BlobAdapter

#: The backend asked us to slow down; the request was not applied.
THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "RequestLimitExceeded", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "LimitExceededException",
    "TransactionInProgressException", "EC2ThrottledException", "PriorRequestNotComplete",
})
#: A server-side failure that may pass.
TRANSIENT_CODES = frozenset({
    "InternalError", "InternalFailure", "InternalServerError", "ServiceUnavailable",
    "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException",
    "IDPCommunicationError", "OperationAborted",
})
#: The credentials themselves are wrong, expired or missing from the request.
BAD_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "UnrecognizedClientException",
    "InvalidSignatureException", "ExpiredToken", "ExpiredTokenException", "InvalidToken",
    "TokenRefreshRequired", "MissingAuthenticationToken", "MissingAuthenticationTokenException",
    "IncompleteSignature", "IncompleteSignatureException", "InvalidClientTokenId",
    "RequestExpired",
})
#: The credentials are fine but lack permission.
DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "AllAccessDisabled", "Forbidden",
                          "403"})
#: The request went to the wrong region for the bucket.
WRONG_REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed",
                                "IllegalLocationConstraintException", "301"})
TOO_LARGE_CODES = frozenset({"EntityTooLarge", "RequestEntityTooLarge", "413",
                             "RequestEntityTooLargeException"})


@dataclass(frozen=True)
class AwsOptions:
    """Client options shared by ``s3://`` and ``dynamodb://``.  Anything left at None follows
    boto3's own chain: ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` and
    ``AWS_ENDPOINT_URL_DYNAMODB`` (or ``AWS_ENDPOINT_URL``), profiles, instance/Lambda roles."""

    #: Service endpoint (MinIO, moto, LocalStack, a VPC endpoint); None: boto3's chain.
    endpoint_url: Optional[str] = None
    #: AWS region; None: boto3's chain.
    region: Optional[str] = None
    #: Named profile from ~/.aws/config; None: boto3's chain (AWS_PROFILE, env keys, roles).
    profile: Optional[str] = None
    #: Seconds to wait for a TCP connection, and for a response to start.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: HTTP connections kept per client (callers' threads plus the adapter's own pool).
    max_connections: int = 32

    def __post_init__(self):
        if self.max_connections < 1:
            raise ConfigError(f"option 'max_connections' must be >= 1, got {self.max_connections}")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("options 'connect_timeout' and 'read_timeout' must be > 0")


_SESSIONS: dict = {}
_SESSIONS_LOCK = threading.Lock()


def _session(profile: Optional[str]):
    """One boto3 Session per profile and process: building a client from a warm session skips
    re-reading the service model (about 0.1 s per store otherwise, e.g. per rank at start-up).
    The AWS_* environment is part of the key, so a changed environment (keys, profile, config
    file, endpoint) gets a fresh session, exactly as without the cache."""
    import boto3
    key = (os.getpid(), profile, tuple(sorted((k, v) for k, v in os.environ.items()
                                              if k.startswith("AWS_"))))
    session = _SESSIONS.get(key)
    if session is None:
        session = boto3.session.Session(profile_name=profile)
        _SESSIONS[key] = session
    return session


def make_client(service: str, opts: AwsOptions, *, on_request: Callable[[str], None],
                extra_config: Optional[dict] = None):
    """A boto3 client of ``service`` with the SDK's retries off and every HTTP attempt reported
    to ``on_request(operation_name)`` (before it is sent, so injected or failed attempts count:
    AWS bills them too)."""
    from botocore.config import Config

    config = Config(
        # One retry layer (cylon_store.retry): one attempt per SDK call.
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=opts.max_connections,
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        **(extra_config or {}),
    )
    try:
        with _SESSIONS_LOCK:  # a boto3 Session is not thread-safe; its clients are
            client = _session(opts.profile).client(service, region_name=opts.region,
                                                   endpoint_url=opts.endpoint_url, config=config)
    except Exception as exc:  # ProfileNotFound, NoRegionError, a bad endpoint URL
        raise map_botocore_error(exc, backend=service, op="connect", key=None) from exc

    def count(event_name: str = "", **_):
        on_request(event_name.rsplit(".", 1)[-1])

    # First, so that a fault injector registered later still sees the request counted.
    client.meta.events.register_first(f"before-send.{client.meta.service_model.service_id.hyphenize()}",
                                      count)
    return client


def error_code(exc) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError."""
    resp = getattr(exc, "response", None) or {}
    code = str((resp.get("Error") or {}).get("Code") or "")
    status = int((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code, status


def map_client_error(exc, *, backend: str, op: str, key: Optional[str],
                     overrides: Mapping[str, Callable[[], StoreError]] = {}) -> StoreError:
    """Translate a botocore ``ClientError`` by its code (and HTTP status as a fallback)."""
    code, status = error_code(exc)
    return map_error_code(code, status, backend=backend, op=op, key=key, overrides=overrides)


def map_error_code(code: str, status: int = 0, *, backend: str, op: str, key: Optional[str],
                   overrides: Mapping[str, Callable[[], StoreError]] = {}) -> StoreError:
    """The project error for an AWS error code (e.g. from a DeleteObjects ``Errors`` entry)."""
    kw = {"backend": backend, "op": op, "key": key}
    if code in overrides:
        return overrides[code]()
    label = f"{code or status}"
    if code in THROTTLE_CODES or status == 429 or (status == 503 and code in ("", "503")):
        return ThrottledError(f"throttled by the service ({label}); retried with backoff", **kw)
    if code in TRANSIENT_CODES or (500 <= status < 600 and code not in ("NotImplemented", "501")):
        return TransientError(f"service error ({label}), may pass", **kw)
    if code in BAD_CREDENTIAL_CODES:
        return PermissionDeniedError(
            f"the AWS credentials were rejected ({code}): check AWS_ACCESS_KEY_ID/"
            f"AWS_SECRET_ACCESS_KEY, the session token or the profile", **kw)
    if code in DENIED_CODES or (status == 403 and not code):
        return PermissionDeniedError(f"access denied ({label}): the credentials lack permission "
                                     f"for {op}", **kw)
    if code in WRONG_REGION_CODES:
        return ConfigError(f"wrong region ({label}): the bucket or table lives in another region; "
                           f"pass region=... or set AWS_REGION", **kw)
    if code in TOO_LARGE_CODES:
        return PayloadTooLargeError(f"the service rejected the object as too large ({label})", **kw)
    if code in ("PreconditionFailed", "412") or status == 412:
        return PreconditionError(f"precondition failed ({label})", **kw)
    if code in ("NoSuchKey", "404", "NotFound"):
        return NotFoundError("no such key", **kw)
    return StoreError(f"request failed ({label})", **kw)


class ConnectFailedError(TransientError):
    """No connection to the endpoint was made: the request was surely not applied, so even a
    non-idempotent call (a create, a counter) may be sent again."""


def map_botocore_error(exc, *, backend: str, op: str, key: Optional[str]) -> StoreError:
    """Translate any exception raised by a boto3 call."""
    from botocore import exceptions as bex

    kw: dict[str, Any] = {"backend": backend, "op": op, "key": key}
    if isinstance(exc, bex.ClientError):
        return map_client_error(exc, **kw)
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError,
                        bex.CredentialRetrievalError, bex.NoAuthTokenError,
                        bex.TokenRetrievalError)):
        return PermissionDeniedError(f"no usable AWS credentials ({type(exc).__name__}): set "
                                     f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                                     f"profile=..., or run with a role", **kw)
    if isinstance(exc, bex.NoRegionError):
        return ConfigError("no AWS region: pass region=... or set AWS_REGION", **kw)
    if isinstance(exc, bex.ProfileNotFound):
        return ConfigError(f"AWS profile not found ({exc})", **kw)
    if isinstance(exc, bex.SSLError):
        return TransientError(f"TLS failure talking to the endpoint ({type(exc).__name__})", **kw)
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
        # No connection was made: the request surely did not reach the service.
        return ConnectFailedError(f"could not connect to the endpoint ({type(exc).__name__})",
                                  **kw)
    if isinstance(exc, (bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError)):
        return TransientError(f"connection failure ({type(exc).__name__})", **kw)
    if isinstance(exc, bex.ParamValidationError):
        return ConfigError(f"invalid request parameters ({exc})", **kw)
    if isinstance(exc, (bex.EndpointResolutionError, bex.InvalidEndpointConfigurationError,
                        ValueError)):
        return ConfigError(f"invalid endpoint or region configuration ({exc})", **kw)
    if isinstance(exc, bex.BotoCoreError):
        return StoreError(f"AWS SDK error ({type(exc).__name__})", **kw)
    raise exc


def is_sdk_error(exc: BaseException) -> bool:
    """True for errors raised by botocore (which ``map_botocore_error`` translates)."""
    from botocore import exceptions as bex
    return isinstance(exc, (bex.ClientError, bex.BotoCoreError))


def iter_views(chunks: Iterable) -> Iterator:
    """The non-empty chunks of a payload as bytes-like objects whose ``len`` is in bytes."""
    for c in chunks:
        v = c if isinstance(c, (bytes, bytearray)) else memoryview(c).cast("B")
        if len(v):
            yield v


def cut(views: Iterator, size_for: Callable[[int], int], *, join: bool = True) -> Iterator:
    """Cut a stream of buffers into pieces of ``size_for(1)``, ``size_for(2)``, ... bytes; the
    last piece may be short, and an empty stream yields one empty piece.  A piece is ``bytes``
    (one copy) or, with ``join=False``, the list of buffer slices that make it up (no copy)."""
    pending: list = []
    have = 0
    number = 1
    target = size_for(number)
    for v in views:
        pending.append(v)
        have += len(v)
        while have >= target:
            take, rest, need = [], [], target
            for p in pending:
                if need <= 0:
                    rest.append(p)
                elif len(p) <= need:
                    take.append(p)
                    need -= len(p)
                else:
                    mv = memoryview(p)
                    take.append(mv[:need])
                    rest.append(mv[need:])
                    need = 0
            yield b"".join(take) if join else take
            pending, have = rest, have - target
            number += 1
            target = size_for(number)
    if have or number == 1:
        yield b"".join(pending) if join else pending


class Uncertain(StoreError):
    """Carries an error after which a write may or may not have happened: never retried, and
    the caller checks what landed (S3: the object; DynamoDB: the commit item)."""

    def __init__(self, inner: StoreError):
        self.inner = inner
        super().__init__(str(inner))


class Gate:
    """The semaphore-gated upload both adapters run: tasks in a thread pool with at most
    ``limit`` in flight.  ``submit`` blocks while ``limit`` tasks run — which bounds the memory
    their payloads hold (multipart parts, batches of chunk items) — and, once an earlier task
    failed, raises its error instead of submitting more.  Used as a context manager: when the
    block fails, the tasks not started are cancelled, those running are awaited, then
    ``on_error`` cleans up (abort the upload, delete the chunks written) and the error goes on.
    """

    def __init__(self, pool: ThreadPoolExecutor, limit: int, *, on_error: Callable[[], None]):
        self._pool = pool
        self._slots = threading.BoundedSemaphore(limit)
        self._failed: list[BaseException] = []
        self._on_error = on_error
        self.futures: list[Future] = []

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:   # the error (if any) goes on
        if exc_type is not None:
            cancel_all(self.futures)
            self._on_error()

    def submit(self, fn: Callable, *args) -> Future:
        self._slots.acquire()
        if self._failed:
            self._slots.release()
            raise self._failed[0]
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        self.futures.append(fut)
        return fut

    def _done(self, fut: Future) -> None:
        self._slots.release()
        error = None if fut.cancelled() else fut.exception()
        if error is not None:
            self._failed.append(error)

    def results(self) -> list:
        """The tasks' results in submission order; the first error to occur is raised."""
        if self._failed:
            raise self._failed[0]
        return [f.result() for f in self.futures]


def cancel_all(futures: list) -> None:
    """Cancel the futures that have not started, and wait for those that have."""
    for f in futures:
        f.cancel()
    wait(futures)


class AwsAdapter(BlobAdapter):
    """Base of the adapters over one AWS service: what they do alike, once.

    A subclass sets ``service`` (the boto3 service name, also the backend name in errors and
    the prefix of its stats counters), ``thread_name_prefix`` and ``default_retry``; its config
    is an ``AwsOptions`` with a ``max_concurrency`` (the pool's size).  It implements
    ``_locate`` (the URL's resource and path) and may override ``_make_client`` (extra client
    configuration), ``_count`` (names of counted requests), ``_overrides`` (its own error
    codes, by code) and ``_map_code``.
    """

    service: ClassVar[str] = ""
    thread_name_prefix: ClassVar[str] = "cylon-aws"
    #: ``_call``'s retry mode when the caller names none (see ``_call``).
    default_retry: ClassVar[str] = "none"
    #: Retryable errors after which a request surely did not apply ("safe" retries them).
    not_applied: ClassVar[tuple] = (ThrottledError, ConnectFailedError)

    def __init__(self, location: str, config: Any, stats,
                 options: Optional[StoreOptions] = None):
        super().__init__(location, config, stats, options)
        resource, _, path = location.split("://", 1)[1].partition("/")
        self._locate(resource, path.strip("/"))
        self._client = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._closed = False
        self._retry = counting_retries(self)

    def _locate(self, resource: str, path: str) -> None:
        """Check and keep the location ``scheme://resource/path`` (bucket and prefix, table and
        namespace; ``path`` without surrounding slashes).  No network I/O."""
        raise NotImplementedError

    # -- client and pool ----------------------------------------------------------------
    @property
    def client(self):
        """The boto3 client, built on first use (boto3 is imported then)."""
        c = self._client
        if c is None:
            with self._lock:
                if self._closed:
                    raise StoreError("the adapter is closed", backend=self.service)
                if self._client is None:
                    self._client = self._make_client()
                c = self._client
        return c

    def _make_client(self):
        """This service's client (built once, under the lock)."""
        return make_client(self.service, self.config, on_request=self._count)

    def _count(self, operation: str) -> None:
        """Count one HTTP attempt of ``operation`` (a boto3 operation name)."""
        self.stats.count(f"{self.service}.{operation}")

    @property
    def pool(self) -> ThreadPoolExecutor:
        p = self._pool
        if p is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.config.max_concurrency,
                                                    thread_name_prefix=self.thread_name_prefix)
                p = self._pool
        return p

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            client, self._client = self._client, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    # -- errors and calls ---------------------------------------------------------------
    def _map(self, exc: BaseException, op: str, key: Optional[str], *, create: bool = False,
             pinned: bool = False) -> StoreError:
        """The project error for an exception of a boto3 call (a ``StoreError`` passes as it
        is; an exception that is not the SDK's is re-raised).  ``create``: the call is a
        create-if-absent write; ``pinned``: a read conditional on a version."""
        if isinstance(exc, StoreError):
            return exc
        if not is_sdk_error(exc):
            raise exc
        kw: dict[str, Any] = {"backend": self.service, "op": op, "key": key}
        from botocore.exceptions import ClientError
        # Only a ClientError carries the service's answer: connection errors have a
        # ``response`` attribute too, set to None (mapping those by code made them final).
        if isinstance(exc, ClientError):
            code, status = error_code(exc)
            err = self._map_code(code, status, kw, create=create, pinned=pinned)
        else:
            err = map_botocore_error(exc, **kw)
        if isinstance(err, ThrottledError):
            self.stats.count(f"{self.service}.throttled")
        err.__cause__ = exc
        return err

    def _map_code(self, code: str, status: int, kw: dict, *, create: bool = False,
                  pinned: bool = False) -> StoreError:
        overrides = self._overrides(kw, create=create, pinned=pinned)
        return map_error_code(code, status, overrides=overrides, **kw)

    def _overrides(self, kw: dict, *, create: bool = False, pinned: bool = False) -> dict:
        """This service's error codes that mean something else than ``map_error_code`` says
        (code -> a function building the error), for a call described as in ``_map``."""
        return {}

    def _call(self, op: str, key: Optional[str], fn: Callable, *, retry: Optional[str] = None,
              create: bool = False, pinned: bool = False):
        """Run one boto3 call with its errors mapped.  ``retry``: "none" (the caller — the
        facade, or an adapter loop — decides), "all" (idempotent: throttling and transient
        errors), "safe" (only errors after which the request surely did not apply,
        ``not_applied``); None: the adapter's ``default_retry``."""
        retry = retry or self.default_retry

        def attempt():
            try:
                return fn()
            except BaseException as exc:
                err = self._map(exc, op, key, create=create, pinned=pinned)
                if retry == "safe" and err.retryable and not isinstance(err, self.not_applied):
                    raise Uncertain(err) from exc
                if err is exc:
                    raise
                raise err from exc

        if retry == "none":
            return attempt()
        try:
            return self._retry.call(attempt)
        except Uncertain as u:
            raise u.inner from u.inner.__cause__
