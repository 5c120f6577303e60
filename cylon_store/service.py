"""The standalone shuffle service: an Arrow Flight server that every ``flight://`` store talks to.

Start it with ``cylon-store serve`` (or ``python -m cylon_store.service``); it prints one line,
``serving flight://HOST:PORT`` (``flight+tls://`` with certificates), once it accepts calls.
Workers that cannot reach each other (Lambda functions, locked-down containers) meet here the way
Spark executors meet at a Celeborn or Uniffle worker, with Arrow all the way.

Protocol (the client is ``cylon_store.adapters.flight``; every call carries
``authorization: Bearer TOKEN`` when the server has a token):

==========================  ========================================================================
``DoPut``                   descriptor command: msgpack ``{"k": key, "m": "overwrite"|"create",
                            "n": total bytes}``; a stream of record batches of one ``large_binary``
                            column, one value per batch (the object's bytes, in order).  The
                            service keeps the received Arrow buffers as they are (no decoding, no
                            re-encoding) or writes them to its spill directory.  The stream ends
                            with a metadata message ``{"n": bytes sent}`` (the commit): only then,
                            and only if every byte arrived, is the object published under its
                            key; a stream without it (the client's payload failed, the client
                            died) stores nothing.  No reply message: the call's status is the
                            answer (one message less per put).
``DoGet``                   ticket: msgpack ``{"k": key, "r": [start, end] | None, "v": version |
                            None}``; the reply streams the object (or the range) as the same kind
                            of batches, sliced from memory or from the spilled file, zero-copy.
``DoAction``                ``head``, ``delete``, ``list``, ``notify``, ``wait``, ``incr``,
                            ``delete_counter``, ``sweep``, ``stats``, ``ping``: msgpack body, msgpack result.
==========================  ========================================================================

Errors travel as Flight errors whose ``extra_info`` is a code (``NotFound``, ``AlreadyExists``,
``Precondition``, ``Invalid``, ``Full``, ``ShuttingDown``); the client maps the code, never the
message text.  A missing or wrong token is refused by middleware before the handler runs.

Memory: objects live in memory up to ``memory_limit``.  When a write would take memory above the
high watermark (``high`` x limit) the service starts spilling: new writes go to files in
``spill_dir``, streamed batch by batch as they arrive, until deletions bring memory below the low
watermark (``low`` x limit).  A write that fits nowhere fails before anything is published and
leaves nothing behind.  Reads of spilled objects stream from the file (memory-mapped).

Expiry: objects, notification channels and counters belong to a *group*: the job for keys under
``_cylon/{job}/`` (after any client prefix), otherwise the key's first path segment.  A group
that sees no request for ``ttl`` seconds is removed whole, so a crashed job leaves nothing behind
for long.

Shutdown (SIGTERM, SIGINT): waiters are woken, calls in flight finish, new calls are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hmac
import os
import shutil
import signal
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any, Iterator, Optional

import msgpack
import pyarrow as pa
import pyarrow.flight as flight

_TWO_OFFSETS = struct.Struct("<qq")
#: The one column of every data batch.
SCHEMA = pa.schema([pa.field("data", pa.large_binary(), nullable=False)])
#: Largest value the service sends in one batch (stored buffers are sliced to it).
MESSAGE_SIZE = 16 << 20


def data_batch(buf: pa.Buffer) -> pa.RecordBatch:
    """One batch whose single ``large_binary`` value is ``buf``, zero-copy."""
    off = pa.array([0, buf.size], type=pa.int64()).buffers()[1]
    arr = pa.Array.from_buffers(pa.large_binary(), 1, [None, off, buf])
    return pa.RecordBatch.from_arrays([arr], schema=SCHEMA)


def batch_value(batch: pa.RecordBatch) -> pa.Buffer:
    """The bytes of the one value of a data batch: a slice of the batch's data buffer, no copy
    (``col[0].as_buffer()`` would copy the value into a new scalar)."""
    col = batch.column(0)
    if batch.num_rows != 1 or col.null_count:
        raise ValueError(f"a data batch holds exactly one non-null value, got {batch.num_rows} rows")
    offsets, data = col.buffers()[1], col.buffers()[2]
    start, end = _TWO_OFFSETS.unpack_from(memoryview(offsets), 8 * col.offset)
    if not 0 <= start <= end <= (data.size if data is not None else 0):
        raise ValueError(f"a data batch's offsets [{start}, {end}) are outside its data")
    return data.slice(start, end - start) if data is not None else pa.py_buffer(b"")


def group_of(key: str) -> str:
    """The expiry group of ``key``: ``..._cylon/{job}/`` for communicator keys, else the first
    path segment (the whole key if it has no ``/``)."""
    at = key.find("_cylon/")
    if at >= 0 and (at == 0 or key[at - 1] in "/:"):
        end = key.find("/", at + 7)
        return key[:end + 1] if end >= 0 else key
    first = key.find("/")
    return key[:first + 1] if first >= 0 else key


class ServiceError(flight.FlightServerError):
    """A refusal the client maps by ``code`` (``extra_info``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, extra_info=code.encode())


@dataclasses.dataclass
class _Object:
    size: int
    version: str
    group: str
    buffers: Optional[list] = None   # in memory: the received buffers, in order
    path: Optional[str] = None       # spilled: the file holding the bytes


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 0
    token: Optional[str] = dataclasses.field(default=None, repr=False)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    memory_limit: int = 2 << 30
    spill_dir: Optional[str] = None
    ttl: float = 3600.0
    #: Fractions of ``memory_limit``: spilling starts above ``high``, stops below ``low``.
    high: float = 0.9
    low: float = 0.7

    def __post_init__(self) -> None:
        if self.memory_limit < 0:
            raise ValueError(f"memory_limit must be >= 0 bytes, got {self.memory_limit}")
        if not 0 < self.low <= self.high <= 1:
            raise ValueError(f"watermarks must satisfy 0 < low <= high <= 1, got low={self.low} "
                             f"high={self.high}")
        if self.ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {self.ttl}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token is empty")


class _TokenAuth(flight.ServerMiddlewareFactory):
    """Refuses a call whose bearer token is missing or wrong before its handler runs."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info, headers):
        given = headers.get("authorization") or headers.get("Authorization") or []
        ok = len(given) == 1 and hmac.compare_digest(
            given[0].encode() if isinstance(given[0], str) else given[0], self._expected)
        if not ok:
            # Never echo what was sent: it may be someone's real token for another service.
            raise flight.FlightUnauthenticatedError(
                "missing or wrong bearer token (give the service's token with ?token=... or "
                "CYLON_STORE_TOKEN)")
        return None


class ShuffleServer(flight.FlightServerBase):
    """The service.  Construct to start serving (on ``.port``); ``shutdown()`` to stop."""

    def __init__(self, config: ServiceConfig = ServiceConfig()) -> None:
        self.config = config
        tls = config.tls_cert is not None
        location = f"grpc+tls://{config.host}:{config.port}" if tls else \
            f"grpc://{config.host}:{config.port}"
        kwargs: dict[str, Any] = {}
        if tls:
            assert config.tls_cert is not None and config.tls_key is not None
            with open(config.tls_cert, "rb") as f:
                cert = f.read()
            with open(config.tls_key, "rb") as f:
                key = f.read()
            kwargs["tls_certificates"] = [flight.CertKeyPair(cert, key)]
        if config.token:
            kwargs["middleware"] = {"auth": _TokenAuth(config.token)}
        self._spill_root: Optional[str] = None
        if config.spill_dir:
            os.makedirs(config.spill_dir, exist_ok=True)
            self._spill_root = os.path.join(config.spill_dir, f"cylon-store-{uuid.uuid4().hex[:8]}")
            os.makedirs(self._spill_root)
        self._lock = threading.Condition()
        self._objects: dict[str, _Object] = {}
        self._channels: dict[str, list[bytes]] = {}
        self._counters: dict[str, int] = {}
        self._touched: dict[str, float] = {}     # group -> last request (monotonic)
        self._mem_used = 0                       # published in-memory bytes + reservations
        self._disk_used = 0
        self._spilling = False
        self._closing = False
        self._requests: Counter[str] = Counter()
        self._bytes_in = 0
        self._bytes_out = 0
        self._started = time.time()
        self._abort_puts = False                 # set when shutdown's grace period is over
        try:
            super().__init__(location, **kwargs)
        except BaseException:
            if self._spill_root is not None:     # nothing of a service that never started
                shutil.rmtree(self._spill_root, ignore_errors=True)
            raise
        self.scheme = "flight+tls" if tls else "flight"
        self._reaper = threading.Thread(target=self._reap_loop, name="cylon-store-ttl", daemon=True)
        self._reaper.start()

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    # -- bookkeeping (under self._lock) --------------------------------------------------
    def _touch(self, key: str) -> str:
        group = group_of(key)
        self._touched[group] = time.monotonic()
        return group

    def _free(self, obj: _Object) -> None:
        if obj.buffers is not None:
            self._mem_used -= obj.size
        elif obj.path is not None:
            self._disk_used -= obj.size
            _unlink(obj.path)
        self._update_spilling()

    def _update_spilling(self) -> None:
        limit = self.config.memory_limit
        if self._spilling and self._mem_used < self.config.low * limit:
            self._spilling = False

    def _count(self, kind: str) -> None:
        self._requests[kind] += 1

    # -- put ------------------------------------------------------------------------------
    def do_put(self, context, descriptor, reader, writer):
        self._refuse_if_closing()
        req = _unpack(descriptor.command, "put descriptor")
        key, mode, size = req.get("k"), req.get("m", "overwrite"), req.get("n")
        if not isinstance(key, str) or not key or mode not in ("overwrite", "create") or \
                (size is not None and (not isinstance(size, int) or size < 0)):
            raise ServiceError("Invalid", "a put names a key, a mode (overwrite|create) and, if "
                                          "known, its size in bytes")
        if not reader.schema.equals(SCHEMA):
            raise ServiceError("Invalid", f"a put streams one large_binary column, got "
                                          f"{reader.schema}")
        with self._lock:
            self._count("put")
            self._touch(key)
            if mode == "create" and key in self._objects:
                raise ServiceError("AlreadyExists", "key already exists (create-if-absent)")
        sink = _PutSink(self, size)
        committed = None
        try:
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                if committed is not None:
                    raise ServiceError("Invalid", "the put sent data after its commit")
                if self._abort_puts:
                    raise ServiceError("ShuttingDown", "the service shut down before the put "
                                                       "finished (its grace period ended)")
                if chunk.data is not None:
                    sink.add(batch_value(chunk.data))
                if chunk.app_metadata is not None:
                    committed = _unpack(chunk.app_metadata.to_pybytes(), "commit").get("n")
            if committed is None:
                # The client gave up (its payload failed, or it went away): nothing is stored.
                raise ServiceError("Invalid", "the put ended without its commit; nothing stored")
            if committed != sink.received or (size is not None and size != sink.received):
                declared = "" if size is None else f", {size} declared up front"
                raise ServiceError("Invalid", f"the put committed {committed} bytes{declared}, "
                                              f"but {sink.received} arrived")
            version = uuid.uuid4().hex
            with self._lock:
                if mode == "create" and key in self._objects:
                    raise ServiceError("AlreadyExists", "key already exists (create-if-absent)")
                if self._abort_puts:
                    raise ServiceError("ShuttingDown", "the service shut down before the put "
                                                       "finished (its grace period ended)")
                obj = sink.publish(version, self._touch(key))
                old = self._objects.get(key)
                self._objects[key] = obj
                if old is not None:
                    self._free(old)
                self._bytes_in += obj.size
        finally:
            sink.discard()

    def _reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` more memory for a write (True), or say it must spill (False);
        raises ``Full`` when it fits nowhere.  Under the lock."""
        c = self.config
        limit = c.memory_limit
        if not self._spilling and self._mem_used + nbytes <= c.high * limit:
            self._mem_used += nbytes
            return True
        if self._spill_root is not None:
            self._spilling = True
            return False
        if self._mem_used + nbytes <= limit:
            # Without a spill directory the watermarks do not matter: memory up to the limit.
            self._mem_used += nbytes
            return True
        raise ServiceError("Full", f"the service's memory is full: {self._mem_used} of {limit} "
                                   f"bytes in use and the write needs {nbytes} more; no spill "
                                   f"directory is set (serve --spill-dir D, or a larger "
                                   f"--memory-limit)")

    # -- get ------------------------------------------------------------------------------
    def do_get(self, context, ticket):
        self._refuse_if_closing()
        req = _unpack(ticket.ticket, "get ticket")
        key, rng, version = _field(req, "k", str), req.get("r"), req.get("v")
        if rng is not None and not (isinstance(rng, list) and len(rng) == 2 and
                                    all(isinstance(x, int) and x >= 0 for x in rng)):
            raise ServiceError("Invalid", "a get's range is [start, end] of byte offsets >= 0")
        if version is not None and not isinstance(version, str):
            raise ServiceError("Invalid", "a get's version is a string")
        with self._lock:
            self._count("get")
            self._touch(key)
            obj = self._objects.get(key)
        if obj is None:
            raise ServiceError("NotFound", "no such key")
        if version is not None and version != obj.version:
            raise ServiceError("Precondition", "object changed since it was first read")
        start, end = 0, obj.size
        if rng is not None:
            start, end = min(rng[0], obj.size), min(rng[1], obj.size)
            start = min(start, end)
        if obj.buffers is not None:
            source = obj.buffers
        else:
            assert obj.path is not None
            try:
                mapped = pa.memory_map(obj.path, "r")
            except FileNotFoundError:  # replaced or deleted since the lookup
                raise ServiceError("NotFound", "no such key") from None
            source = [mapped.read_buffer()] if obj.size else []
            mapped.close()
        batches = list(_slices(source, start, end))
        with self._lock:
            self._bytes_out += end - start
        return flight.RecordBatchStream(pa.Table.from_batches(batches, schema=SCHEMA))

    # -- actions --------------------------------------------------------------------------
    def list_actions(self, context):
        return [("head", "size and version of a key"), ("delete", "delete keys"),
                ("list", "keys by prefix"), ("notify", "leave a message on a channel"),
                ("wait", "take a channel's messages, blocking"), ("incr", "atomic counter"),
                ("delete_counter", "remove a counter"), ("stats", "service statistics"),
                ("sweep", "remove channels and counters under a prefix"),
                ("ping", "check the connection and the token")]

    def do_action(self, context, action):
        kind = action.type
        handler = getattr(self, f"_action_{kind}", None)
        if handler is None:
            raise ServiceError("Invalid", f"unknown action {kind!r}")
        if kind not in ("stats", "ping"):
            self._refuse_if_closing()
        body = _unpack(action.body.to_pybytes(), f"{kind} request") if action.body.size else {}
        with self._lock:
            self._count(kind)
        return [pa.py_buffer(msgpack.packb(handler(body)))]

    # Every handler reads its fields with _field: a malformed body is "Invalid", never a
    # traceback sent to the client.

    def _action_ping(self, body):
        return {"ok": True}

    def _action_head(self, body):
        key = _field(body, "k", str)
        with self._lock:
            self._touch(key)
            obj = self._objects.get(key)
        if obj is None:
            raise ServiceError("NotFound", "no such key")
        return {"n": obj.size, "v": obj.version}

    def _action_delete(self, body):
        with self._lock:
            for key in _keys(body):
                self._touch(key)
                obj = self._objects.pop(key, None)
                if obj is not None:
                    self._free(obj)
        return {}

    def _action_list(self, body):
        prefix = body.get("prefix", "")
        if not isinstance(prefix, str):
            raise ServiceError("Invalid", "a list's prefix is a string")
        with self._lock:
            if prefix:
                self._touch(prefix)
            return {"items": [[k, o.size, o.version] for k, o in self._objects.items()
                              if k.startswith(prefix)]}

    def _action_notify(self, body):
        channel, message = _field(body, "c", str), body.get("m", b"")
        if not isinstance(message, bytes):
            raise ServiceError("Invalid", "a notification's message is bytes")
        with self._lock:
            self._touch(channel)
            self._channels.setdefault(channel, []).append(message)
            self._lock.notify_all()
        return {}

    def _action_wait(self, body):
        channel, timeout = _field(body, "c", str), body.get("t", 0)
        if not isinstance(timeout, (int, float)) or timeout != timeout:
            raise ServiceError("Invalid", "a wait's timeout is a number of seconds")
        deadline = time.monotonic() + max(0.0, min(timeout, 3600.0))
        with self._lock:
            self._touch(channel)
            while not self._channels.get(channel) and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            if self._closing and not self._channels.get(channel):
                raise ServiceError("ShuttingDown", "the service is shutting down")
            return {"m": self._channels.pop(channel, [])}

    def _action_incr(self, body):
        key = _field(body, "k", str)
        with self._lock:
            self._touch(key)
            value = self._counters.get(key, 0) + 1
            self._counters[key] = value
        return {"n": value}

    def _action_delete_counter(self, body):
        with self._lock:
            self._counters.pop(_field(body, "k", str), None)
        return {}

    def _action_sweep(self, body):
        """Notification channels and counters under a prefix (``cylon-store clean``)."""
        prefix = body.get("prefix", "")
        if not isinstance(prefix, str):
            raise ServiceError("Invalid", "a sweep's prefix is a string")
        with self._lock:
            doomed = [(t, k) for t in (self._channels, self._counters) for k in t
                      if k.startswith(prefix)]
            for t, k in doomed:
                del t[k]
        return {"n": len(doomed)}

    def _action_stats(self, body):
        return self.stats()

    def stats(self) -> dict:
        """Objects, bytes in memory and on disk, requests by kind (what the ``stats`` action
        returns)."""
        with self._lock:
            on_disk = sum(1 for o in self._objects.values() if o.path is not None)
            return {
                "objects": len(self._objects),
                "objects_on_disk": on_disk,
                "bytes_memory": sum(o.size for o in self._objects.values() if o.buffers is not None),
                "bytes_disk": self._disk_used,
                "memory_reserved": self._mem_used,
                "memory_limit": self.config.memory_limit,
                "spilling": self._spilling,
                "channels": sum(1 for v in self._channels.values() if v),
                "counters": len(self._counters),
                "groups": len(self._touched),
                "requests": dict(self._requests),
                "bytes_in": self._bytes_in,
                "bytes_out": self._bytes_out,
                "uptime_s": round(time.time() - self._started, 3),
            }

    # -- expiry and shutdown ----------------------------------------------------------------
    def _reap_loop(self) -> None:
        period = max(0.05, min(self.config.ttl / 4, 30.0))
        while True:
            with self._lock:
                if self._closing:
                    return
                self._lock.wait(period)
                if self._closing:
                    return
            self.expire()

    def expire(self, now: Optional[float] = None) -> int:
        """Remove every group idle for ``ttl``; returns how many objects went."""
        now = time.monotonic() if now is None else now
        gone = 0
        with self._lock:
            stale = {g for g, t in self._touched.items() if now - t >= self.config.ttl}
            if not stale:
                return 0
            for key in [k for k, o in self._objects.items() if o.group in stale]:
                self._free(self._objects.pop(key))
                gone += 1
            for table in (self._channels, self._counters):
                for key in [k for k in table if group_of(k) in stale]:
                    del table[key]
            for g in stale:
                del self._touched[g]
        return gone

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise ServiceError("ShuttingDown", "the service is shutting down")

    def shutdown(self, grace: float = 30.0) -> None:
        """Refuse new calls, wake waiters, let calls in flight finish (puts still streaming after
        ``grace`` seconds are refused at their next message), then stop and remove the spill
        files."""
        with self._lock:
            already = self._closing
            self._closing = True
            self._lock.notify_all()
        if already:
            return

        def end_grace():
            self._abort_puts = True
        timer = threading.Timer(grace, end_grace)
        timer.daemon = True
        timer.start()
        try:
            super().shutdown()
        finally:
            timer.cancel()
        with self._lock:
            for obj in self._objects.values():
                if obj.path is not None:
                    _unlink(obj.path)
            self._objects.clear()
            self._mem_used = self._disk_used = 0
        if self._spill_root is not None:
            shutil.rmtree(self._spill_root, ignore_errors=True)


class _PutSink:
    """Where the bytes of one put go while they arrive: memory (reserved as they come, all of
    it up front when the size is declared) or, once memory is above the high watermark, a
    temporary file in the spill directory (what was in memory moves there).  Nothing is
    visible until ``publish``; ``discard`` gives back whatever was not published."""

    def __init__(self, server: ShuffleServer, size: Optional[int]) -> None:
        self.server = server
        self.declared = size
        self.received = 0
        self.reserved = 0
        self.buffers: list = []
        self.tmp: Optional[str] = None
        self.file: Any = None
        if size:
            with server._lock:
                memory = server._reserve(size)
            if memory:
                self.reserved = size
            else:
                self._to_disk()

    def add(self, value: pa.Buffer) -> None:
        self.received += value.size
        if self.declared is not None and self.received > self.declared:
            raise ServiceError("Invalid", f"the put sent more than the {self.declared} bytes it "
                                          f"declared")
        if self.file is None and self.received > self.reserved:
            need = self.received - self.reserved
            with self.server._lock:
                memory = self.server._reserve(need)
            if memory:
                self.reserved += need
            else:
                self._to_disk()
        if self.file is not None:
            self._write(value)
        else:
            self.buffers.append(value)

    def _to_disk(self) -> None:
        """Continue on disk: earlier buffers move to the file, their memory is given back."""
        root = self.server._spill_root
        assert root is not None
        self.tmp = os.path.join(root, f".tmp-{uuid.uuid4().hex}")
        self.file = open(self.tmp, "wb", buffering=0)
        for buf in self.buffers:
            self._write(buf)
        self.buffers = []
        with self.server._lock:
            self.server._mem_used -= self.reserved
            self.reserved = 0
            self.server._update_spilling()

    def _write(self, buf: pa.Buffer) -> None:
        try:
            _write_all(self.file, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ServiceError("Full", "the spill directory is full: the write does not "
                                           "fit in memory or on disk") from None
            raise

    def publish(self, version: str, group: str) -> _Object:
        """The finished object (under the server lock); the sink keeps nothing afterwards."""
        size = self.received
        if self.file is not None:
            self.file.close()
            self.file = None
            assert self.tmp is not None
            final = self.tmp.replace(".tmp-", "o-")
            os.rename(self.tmp, final)
            self.tmp = None
            self.server._disk_used += size
            return _Object(size, version, group, path=final)
        self.server._mem_used -= self.reserved - size   # a declared size may be 0 or exact
        self.reserved = 0
        obj = _Object(size, version, group, buffers=self.buffers)
        self.buffers = []
        return obj

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tmp is not None:
            _unlink(self.tmp)
            self.tmp = None
        if self.reserved:
            with self.server._lock:
                self.server._mem_used -= self.reserved
                self.reserved = 0
                self.server._update_spilling()
        self.buffers = []


def _slices(buffers: list, start: int, end: int) -> Iterator[pa.RecordBatch]:
    """Data batches covering bytes ``[start, end)`` of the concatenation of ``buffers``."""
    pos = 0
    for buf in buffers:
        lo, hi = max(start, pos), min(end, pos + buf.size)
        if lo < hi:
            for at in range(lo, hi, MESSAGE_SIZE):
                yield data_batch(buf.slice(at - pos, min(MESSAGE_SIZE, hi - at)))
        pos += buf.size
        if pos >= end:
            break


def _write_all(f, buf: pa.Buffer) -> None:
    view = memoryview(buf)
    while view.nbytes:
        n = f.write(view)
        view = view[n:]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _field(body: dict, name: str, kind: type):
    value = body.get(name)
    if not isinstance(value, kind) or (kind is str and not value):
        raise ServiceError("Invalid", f"the request needs field {name!r} ({kind.__name__})")
    return value


def _keys(body: dict) -> list:
    keys = body.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ServiceError("Invalid", "a delete needs 'keys', a list of strings")
    return keys


def _unpack(raw: bytes, what: str) -> dict:
    try:
        value = msgpack.unpackb(raw, raw=False)
    except Exception:
        raise ServiceError("Invalid", f"the {what} is not valid msgpack") from None
    if not isinstance(value, dict):
        raise ServiceError("Invalid", f"the {what} is not a msgpack map")
    return value


# -- command line ---------------------------------------------------------------------------

DESCRIPTION = ("Run the shuffle service: an Arrow Flight server that workers which cannot reach each "
               "other (Lambda functions, locked-down containers) share as the store flight://HOST:PORT. "
               "Prints 'serving flight://HOST:PORT' once it accepts calls; SIGTERM or Ctrl-C stops "
               "it after the calls in flight.")

SERVE_EPILOG = """\
The token: --token T, --token-file F (keeps it out of the process list), or the environment
variable CYLON_STORE_TOKEN. Clients give the same token: flight://HOST:PORT?token=T or
CYLON_STORE_TOKEN. Without a token every call is accepted, which serve allows only on a
loopback address.

In a container (ECS/Fargate, EC2): docker/service.Dockerfile in the repository builds an image
that runs `cylon-store serve --host 0.0.0.0 --port 8815`:

  docker build -f docker/service.Dockerfile -t cylon-store-service .
  docker run -p 8815:8815 -e CYLON_STORE_TOKEN=... -v /mnt/efs:/spill cylon-store-service \\
      --memory-limit 8GiB --spill-dir /spill

On ECS, give the task the token as a secret (environment from Secrets Manager), open port 8815
to the workers' security group only, and size --memory-limit below the task's memory. Workers
(Lambda functions in the same VPC) then use store="flight://SERVICE-ADDRESS:8815".
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .argtypes import duration, int_range, size
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int_range(0, 65535), default=0,
                   help="port (default 0: a free one, printed on the 'serving' line)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", help="bearer token every call must carry")
    tok.add_argument("--token-file", help="file whose content (stripped) is the token")
    p.add_argument("--tls-cert", help="PEM certificate: serve flight+tls:// (needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--memory-limit", type=size, default=2 << 30,
                   help="bytes of objects held in memory (default 2GiB); e.g. 512MiB, 8GiB")
    p.add_argument("--spill-dir", help="directory (local disk or EFS) where writes go when "
                                       "memory is above its high watermark")
    p.add_argument("--grace", type=duration, default=30.0,
                   help="on SIGTERM, seconds that calls in flight get to finish (default 30)")
    p.add_argument("--ttl", type=duration, default=3600.0,
                   help="a job's objects expire after this long without a request (default 1h; "
                        "e.g. 90s, 30m, 2h)")


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    token = args.token
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
    if token is None:
        token = os.environ.get("CYLON_STORE_TOKEN") or None
    if token is None and not _loopback(args.host):
        raise ValueError(f"refusing to serve on {args.host} without a token: give --token, "
                         f"--token-file or CYLON_STORE_TOKEN")
    if args.spill_dir and os.path.exists(args.spill_dir) and not os.path.isdir(args.spill_dir):
        raise ValueError(f"--spill-dir {args.spill_dir} is not a directory")
    for what, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{what} {path}: no such file")
    return ServiceConfig(host=args.host, port=args.port, token=token, tls_cert=args.tls_cert,
                         tls_key=args.tls_key, memory_limit=int(args.memory_limit),
                         spill_dir=args.spill_dir, ttl=float(args.ttl))


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def serve(config: ServiceConfig, *, ready=None, grace: float = 30.0) -> int:
    """Run the service until SIGTERM or SIGINT; prints ``serving URL`` once it accepts calls.
    Calls in flight get ``grace`` seconds to finish; a call still running 10 s after that (a
    client that stalls mid-put) is abandoned: the spill files are removed and the process exits
    with 1."""
    server = ShuffleServer(config)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"serving {server.url}", flush=True)
        if ready is not None:
            ready(server)
        while not stop.wait(0.5):
            pass
        print("shutting down: finishing calls in flight", file=sys.stderr, flush=True)
    finally:
        closer = threading.Thread(target=server.shutdown, args=(grace,), daemon=True)
        closer.start()
        closer.join(grace + 10.0)
        for s, h in previous.items():
            signal.signal(s, h)
    if closer.is_alive():
        if server._spill_root is not None:
            shutil.rmtree(server._spill_root, ignore_errors=True)
        print(f"shutting down: calls still running {grace + 10:g} s after the signal were "
              f"abandoned", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)   # gRPC would wait for them forever while the interpreter exits
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cylon-store serve", description=DESCRIPTION,
                                epilog=SERVE_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args, p)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return serve(config, grace=args.grace)
    except (OSError, pa.ArrowException) as exc:
        print(f"cylon-store serve: cannot serve on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
