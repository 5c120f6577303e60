"""``flight://host:port`` and ``flight+tls://host:port``: the project's shuffle service.

The service is ``cylon-store serve`` (``cylon_store.service``, which documents the protocol).
Objects travel as Arrow Flight record-batch streams: a put streams the object's buffers as
``large_binary`` values without copying them (gRPC writes them to the socket), a get receives
them and, when the object came in several batches, joins them once into the result buffer.

Options: ``token`` (or ``CYLON_STORE_TOKEN``): the service's bearer token; ``ca``: a PEM file of
the certificate authority to trust (``flight+tls://``; default: the system's roots);
``verify=false`` skips server verification (tests only); ``prefix``: prepended to every key;
``call_timeout``: seconds one call may take before it fails (retryable).

==================  ============================================================================
put                 DoPut of the chunks (sliced to ``message_size``); the service publishes the
                    object only once every declared byte arrived: atomic, and ``create`` is
                    decided under the service's lock (exactly one concurrent creator wins)
get                 DoGet of the object or a byte range; ``if_version`` is checked by the
                    service (``PreconditionError``)
head / list         DoAction ``head`` / ``list``
delete_many         DoAction ``delete`` (missing keys are not an error)
notify / wait       DoAction ``notify`` / ``wait``: the waiter blocks in the service until a
                    message arrives or its timeout passes
incr                DoAction ``incr``, sent once (not retried: a lost reply would count twice)
==================  ============================================================================

Errors map by Flight error class and the service's code (``extra_info``), never by message:
unauthenticated -> ``PermissionDeniedError``; unavailable, timed out, cancelled, a broken stream
and ``ShuttingDown`` -> retryable ``TransientError``; ``Full`` -> ``PayloadTooLargeError``.
"""

from __future__ import annotations

import builtins
import os
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import msgpack
import pyarrow as pa
import pyarrow.flight as flight

from cylon_store.config import Size
from cylon_store.errors import (AlreadyExistsError, ConfigError, NotFoundError,
                                PayloadTooLargeError, PermissionDeniedError, PreconditionError,
                                StoreError, TransientError)
from cylon_store.service import SCHEMA, batch_value, data_batch

from ._retry import counting_retries
from .base import BlobAdapter, BufferLike, Capabilities, ObjectMeta, PutMode

#: Environment variable holding the token when the URL and keywords do not.
TOKEN_ENV = "CYLON_STORE_TOKEN"


@dataclass(frozen=True)
class FlightConfig:
    #: The service's bearer token (default: the ``CYLON_STORE_TOKEN`` environment variable).
    token: Optional[str] = field(default=None, repr=False)
    #: PEM file of the CA that signed the service's certificate (``flight+tls://``).
    ca: Optional[str] = None
    #: Verify the service's certificate (``flight+tls://``); false only for tests.
    verify: bool = True
    #: Prepended to every key (isolates tenants or tests sharing one service).
    prefix: str = ""
    #: Seconds one call may take (a blocking wait adds its own timeout to this).
    call_timeout: float = 300.0
    #: Largest value sent in one batch; bigger buffers are sliced (zero-copy).
    message_size: Size = Size(16 << 20)

    def __post_init__(self) -> None:
        if self.call_timeout <= 0:
            raise ConfigError(f"option 'call_timeout' must be > 0 seconds, got {self.call_timeout}")
        if not (64 << 10) <= self.message_size <= (1 << 30):
            raise ConfigError(f"option 'message_size' must be 64KiB to 1GiB, got "
                              f"{self.message_size}")


#: Chunks below this are joined (one small copy) into one message instead of one message each.
_SMALL = 1 << 20


def _pieces(chunks: Iterable[BufferLike], step: int):
    """The payload as buffers of at most ``step`` bytes: big chunks sliced without copying,
    runs of small ones (IPC metadata, small columns, the footer) joined up to ``step`` bytes,
    so that a small object is one message and is stored, and read back, as one buffer."""
    run: list = []
    run_bytes = 0
    for chunk in chunks:
        buf = chunk if isinstance(chunk, pa.Buffer) else pa.py_buffer(chunk)
        if buf.size < _SMALL:
            run.append(buf)
            run_bytes += buf.size
            if run_bytes >= step:
                yield _join(run)
                run, run_bytes = [], 0
            continue
        if run:
            yield _join(run)
            run, run_bytes = [], 0
        for at in range(0, buf.size, step):
            yield buf.slice(at, min(step, buf.size - at))
    if run:
        yield _join(run)


def _join(bufs: list) -> pa.Buffer:
    if len(bufs) == 1:
        return bufs[0]
    out = pa.allocate_buffer(sum(b.size for b in bufs))
    view = memoryview(out).cast("B")
    pos = 0
    for b in bufs:
        view[pos:pos + b.size] = memoryview(b).cast("B")
        pos += b.size
    return out


_CODES = {"NotFound": NotFoundError, "AlreadyExists": AlreadyExistsError,
          "Precondition": PreconditionError, "Invalid": ConfigError,
          "Full": PayloadTooLargeError, "ShuttingDown": TransientError}


class FlightAdapter(BlobAdapter):
    scheme = "flight"
    Config = FlightConfig
    capabilities = Capabilities(conditional_create=True, byte_ranges=True, max_object_size=None,
                                notification=True, atomic_counter=True, streaming_put=True,
                                billing="none")

    def __init__(self, location: str, config: FlightConfig, stats, options=None) -> None:
        super().__init__(location, config, stats, options)
        scheme, _, rest = location.partition("://")
        self.url_scheme = scheme   # flight or flight+tls
        hostport, _, path = rest.partition("/")
        if path.strip("/"):
            raise ConfigError(f"flight:// takes no path (got /{path}); to keep keys apart use "
                              f"?prefix={path.strip('/')}/", backend=scheme)
        if "@" in hostport:
            raise ConfigError("flight:// takes its token as ?token=... or CYLON_STORE_TOKEN, not "
                              "in the host part", backend=scheme)
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"flight:// needs host:port, got {hostport!r} (e.g. "
                              f"flight://127.0.0.1:8815)", backend=scheme)
        self._tls = scheme == "flight+tls"
        if config.ca and not os.path.isfile(config.ca):
            raise ConfigError(f"option 'ca': no such file {config.ca!r}", backend=scheme)
        self._grpc = f"{'grpc+tls' if self._tls else 'grpc'}://{host}:{port}"
        self._hostport = hostport
        token = config.token if config.token is not None else os.environ.get(TOKEN_ENV)
        self._headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._client: Optional[flight.FlightClient] = None
        self._lock = threading.Lock()
        self._checked = False
        self._retry = counting_retries(self)

    def describe(self) -> str:
        return f"{self.url_scheme}://{self._hostport}" + (f"?prefix={self.config.prefix}"
                                                     if self.config.prefix else "")

    # -- plumbing ---------------------------------------------------------------------------
    def _conn(self) -> flight.FlightClient:
        c = self._client
        if c is None:
            with self._lock:
                if self._client is None:
                    # gRPC waits at least 1 s before it reconnects a dropped channel by default,
                    # longer than the store's retries wait: reconnect after 100 ms instead.
                    kw: dict = {"generic_options": [("grpc.initial_reconnect_backoff_ms", 100),
                                                    ("grpc.min_reconnect_backoff_ms", 100),
                                                    ("grpc.max_reconnect_backoff_ms", 2000)]}
                    if self._tls:
                        if self.config.ca:
                            with open(self.config.ca, "rb") as f:
                                kw["tls_root_certs"] = f.read()
                        if not self.config.verify:
                            kw["disable_server_verification"] = True
                    self._client = flight.FlightClient(self._grpc, **kw)
                c = self._client
        if not self._checked:
            # One cheap call first: a wrong token or an unreachable service fails here with a
            # clear error, before any data is sent.
            self._retry.call(lambda: self._call("ping", {}))
            self._checked = True
        return c

    def _options(self, extra: float = 0.0) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(headers=self._headers,
                                        timeout=self.config.call_timeout + extra)

    def _key(self, key: str) -> str:
        return self.config.prefix + key

    def _error(self, exc: BaseException, op: str, key: Optional[str]) -> StoreError:
        where = {"backend": self.url_scheme, "op": op, "key": key}
        if isinstance(exc, (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError)):
            return PermissionDeniedError(
                f"the service at {self._hostport} refused the token (missing or wrong; give "
                f"?token=... or {TOKEN_ENV})", **where)
        code = (getattr(exc, "extra_info", b"") or b"").decode(errors="replace")
        if code in _CODES:
            message = str(exc).split(". Detail:", 1)[0]
            return _CODES[code](message, **where)
        if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError,
                            flight.FlightCancelledError)):
            return TransientError(f"the service at {self._hostport} is unreachable or did not "
                                  f"answer in time ({type(exc).__name__})", **where)
        if isinstance(exc, flight.FlightError):
            return TransientError(f"the call to {self._hostport} failed: "
                                  f"{str(exc).split('. gRPC client debug', 1)[0]}", **where)
        return TransientError(f"the stream from {self._hostport} broke: {exc}", **where)

    def _call(self, kind: str, body: dict, *, op: Optional[str] = None, key: Optional[str] = None,
              extra_timeout: float = 0.0) -> dict:
        self.stats.count(f"flight.{kind.upper()}")
        client = self._client if kind == "ping" else self._conn()
        assert client is not None
        try:
            results = list(client.do_action(flight.Action(kind, msgpack.packb(body)),
                                            self._options(extra_timeout)))
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise self._error(exc, op or kind, key) from exc
        return msgpack.unpackb(results[0].body.to_pybytes(), raw=False) if results else {}

    # -- the contract -----------------------------------------------------------------------
    def put(self, key: str, chunks: Iterable[BufferLike], mode: PutMode = PutMode.OVERWRITE) -> int:
        # A list's size is declared up front (the service places the object at once); a
        # stream's is not (the service reserves memory as bytes arrive, and spills if needed).
        declared = sum(memoryview(c).nbytes for c in chunks) \
            if isinstance(chunks, (list, tuple)) else None
        client = self._conn()
        desc = flight.FlightDescriptor.for_command(msgpack.packb(
            {"k": self._key(key), "m": "create" if mode is PutMode.CREATE else "overwrite",
             "n": declared}))
        total = 0
        self.stats.count("flight.PUT")
        step = self.config.message_size
        try:
            writer, _ = client.do_put(desc, SCHEMA, self._options())
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise self._error(exc, "put", key) from exc
        try:
            last = None
            for piece in _pieces(chunks, step):
                total += piece.size
                if last is not None:
                    writer.write_batch(last)
                last = data_batch(piece)
            # The commit rides on the last batch: a stream that ends without it (the payload
            # failed) stores nothing.
            commit = pa.py_buffer(msgpack.packb({"n": total}))
            if last is None:
                writer.write_metadata(commit)
            else:
                writer.write_with_metadata(last, commit)
            writer.done_writing()
            writer.close()      # waits for the call's status: the service published, or why not
        except BaseException as exc:
            try:
                writer.close()   # uncommitted: the service discards what arrived
            except Exception:
                pass             # the original error is the one to report
            if isinstance(exc, (flight.FlightError, pa.ArrowException, OSError)):
                raise self._error(exc, "put", key) from exc
            raise
        return total

    def get(self, key: str, byte_range: Optional[tuple[int, int]] = None,
            if_version: Optional[str] = None) -> BufferLike:
        ticket = {"k": self._key(key), "r": list(byte_range) if byte_range else None,
                  "v": if_version}
        client = self._conn()
        self.stats.count("flight.GET")
        parts: list = []
        try:
            reader = client.do_get(flight.Ticket(msgpack.packb(ticket)), self._options())
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                if chunk.data is not None:
                    parts.append(batch_value(chunk.data))
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise self._error(exc, "get", key) from exc
        except ValueError as exc:
            raise TransientError(f"the service sent a malformed batch: {exc}",
                                 backend=self.url_scheme, op="get", key=key) from exc
        if not parts:
            return pa.py_buffer(b"")
        if len(parts) == 1 and parts[0].address % 8 == 0:
            return parts[0]
        # gRPC hands over message bodies at any address; Arrow columns decoded from a value
        # that is not 8-byte aligned make Acero (groupby, joins) warn and copy, so copy once
        # here into an aligned buffer (also how several messages are joined).
        return _join(parts) if len(parts) > 1 else _join([parts[0], pa.py_buffer(b"")])

    def head(self, key: str) -> ObjectMeta:
        r = self._call("head", {"k": self._key(key)}, op="head", key=key)
        return ObjectMeta(key, r["n"], r["v"])

    def delete_many(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 10000):
            self._call("delete", {"keys": [self._key(k) for k in keys[i:i + 10000]]}, op="delete")

    def list(self, prefix: str) -> builtins.list[ObjectMeta]:
        r = self._call("list", {"prefix": self._key(prefix)}, op="list", key=prefix or None)
        n = len(self.config.prefix)
        return [ObjectMeta(k[n:], size, version) for k, size, version in r["items"]]

    # notify and wait are retried here (the facade does not): safe to repeat, since receivers
    # ignore a repeated announcement and LIST for one that a lost reply took.
    def notify(self, channel: str, message: bytes = b"") -> Optional[bool]:
        body = {"c": self._key(channel), "m": bytes(message)}
        self._retry.call(lambda: self._call("notify", body, key=channel))
        return True

    def wait(self, channel: str, timeout: float) -> builtins.list[bytes]:
        body = {"c": self._key(channel), "t": max(0.0, timeout)}
        r = self._retry.call(lambda: self._call("wait", body, key=channel,
                                                extra_timeout=max(0.0, timeout)))
        return list(r["m"])

    def incr(self, key: str) -> int:
        # Sent once: a lost reply after the service counted would count twice on a retry.
        return int(self._call("incr", {"k": self._key(key)}, key=key)["n"])

    def delete_counter(self, key: str) -> None:
        self._call("delete_counter", {"k": self._key(key)}, key=key)

    def sweep(self, prefix: str) -> int:
        """Notification channels and counters under ``prefix`` (objects are listed and deleted
        like any; a put that never committed stored nothing)."""
        return int(self._call("sweep", {"prefix": self._key(prefix)}, key=prefix or None)["n"])

    def server_stats(self) -> dict:
        """The service's own statistics: objects, bytes in memory and on disk, requests by kind."""
        return self._call("stats", {})

    def close(self) -> None:
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()
