"""``redis://host:port/db`` and ``rediss://`` (TLS): Redis and Amazon ElastiCache.

Guarantees: a put becomes visible atomically — data chunks are written under version-named keys
first and one commit record (``SET`` of a 64-byte header, with small values inline) publishes
them; a reader that finds a chunk of its version gone reads again or fails, it never mixes
versions.  Only ElastiCache-allowed commands are used (no KEYS, CONFIG, DEBUG; SCAN lists).
Every Redis key of one object shares a hash tag, so the adapter also runs on a cluster client.

Redis key layout (``P`` is the ``prefix`` option, ``E`` the escaped store key, ``T`` its tag)::

    P m:E{T}             commit record: header [+ value, when it fits one chunk]
    P d:E{T}:VER:I       chunk I of version VER of a value larger than one chunk
    P n:E{T}  P c:E{T}   notification list (RPUSH/BLPOP), counter (INCR)

==================  ============================================================================
put                 atomic: chunks (``chunk_size``) SET pipelined, then the commit record: SET NX
                    for ``mode=CREATE`` (exactly one concurrent creator wins), else MULTI
                    (GETRANGE of the old header, SET) EXEC, whose old header names the chunks
                    to UNLINK.  A failed put unlinks the chunks it wrote (unless the commit's
                    reply was lost: then the ``ttl`` reclaims them if it did not land)
get                 GET of the record (an inline value lands in the result buffer directly), then
                    its chunks, pipelined in a ``READ_WINDOW`` window; a byte range reads header
                    and inline range in one MULTI.  A chunk gone means the object was replaced
                    (``TransientError``: the facade reads again) — or, if the record still names
                    that version, lost (``IntegrityError``); ``if_version`` -> PreconditionError
head                GETRANGE of the record's 64-byte header; version is the header's version id
delete_many         MULTI (GETRANGE, DEL) EXEC per key, pipelined per node; then UNLINK of the
                    chunks the deleted headers name; missing keys are not an error
list                SCAN MATCH of the prefix on every primary, then the headers (GETRANGE)
notify / wait       RPUSH (+ PEXPIRE with a ttl) / BLPOP, then MULTI (LRANGE, DEL) EXEC in the
                    same round trip: every message left, in order
incr                INCR (+ PEXPIRE with a ttl), sent once; delete_counter: DEL
==================  ============================================================================

Retries: one layer (``cylon_store.retry``).  The facade retries the idempotent operations;
this adapter retries only what the facade does not — ``notify`` and ``wait`` (safe to repeat:
receivers dedupe announcements and LIST for lost ones) and the connection checkout before INCR —
with the store's ``retries``/``retry_base``/``retry_cap``, each retry counted under ``retries``.
redis-py's own retries are off.  Errors map by redis-py's exception class (connection and
timeout errors, LOADING, READONLY, TRYAGAIN, MOVED/ASK, CLUSTERDOWN/MASTERDOWN -> retryable
``TransientError``; a full pool -> ``ThrottledError``; OOM -> ``PayloadTooLargeError``; AUTH,
NOPERM and TLS verification -> ``PermissionDeniedError``) and, for replies redis-py has no
class for, by their error code (BUSY -> ``ThrottledError``, WRONGTYPE -> ``IntegrityError``);
never by message text.

The data path packs RESP commands itself and sends payload buffers without copying them, and
reads bulk replies straight from the socket into the result buffer; redis-py provides the
connections (pooling, AUTH, TLS, database selection), reply parsing of small replies, the error
classes and, in cluster mode, the slot map.  The redis-py internals this needs are confined to
``_redis_compat.py``, which names the redis-py releases they are verified with.
"""

from __future__ import annotations

import builtins

import os
import socket
import ssl
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional, Sequence
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import xxhash

from cylon_store.config import Size
from cylon_store.errors import (AlreadyExistsError, ConfigError, IntegrityError, InvalidKeyError,
                                NotFoundError, PayloadTooLargeError, PermissionDeniedError,
                                PreconditionError, StoreError, ThrottledError, TransientError)

from . import _redis_compat as compat
from ._retry import counting_retries
from .base import BlobAdapter, Capabilities, ObjectMeta, PutMode

#: Largest bulk string a Redis server accepts by default (``proto-max-bulk-len``, redis.conf;
#: ElastiCache uses the same default).  Chunks must stay below it.
REDIS_MAX_BULK = 512 << 20
#: Default chunk: values above it are split into keys of this size.  Measured on loopback
#: (BENCHMARKS.md, Redis "chunk size"): pipelined 1 MiB SETs/GETs move a 256 MiB value as fast
#: as 16-64 MiB ones, and a streaming put then holds at most ~1 MiB of payload.  Small chunks
#: also keep each command far below ElastiCache's replica output-buffer limit (256 MB hard).
DEFAULT_CHUNK_SIZE = 1 << 20
#: Size of the commit record's header.  Reads take the header apart from the value, so a value
#: lands at offset 0 of a fresh 64-byte aligned buffer and Arrow decodes it in place.
HEADER_SIZE = 64
_HEADER = struct.Struct("<4sB3x16sQQI")   # magic, layout, version, size, chunk size, chunks
_MAGIC = b"CYR1"
_INLINE, _CHUNKED = 0, 1
#: Chunk keys outlive their commit record by this much when a ttl is set, so a record never
#: points at expired chunks.
CHUNK_TTL_MARGIN = 60.0
#: Pipelined chunk writes in flight before the client reads their replies (errors such as OOM
#: surface early; replies are tiny).
_MAX_IN_FLIGHT = 8
#: Bytes of one value requested ahead while reading its chunks.
READ_WINDOW = 16 << 20
#: Pieces smaller than this are copied into the command buffer instead of sent on their own.
_SMALL = 16 << 10
_GLOB_SPECIAL = b"*?[]\\"


@dataclass(frozen=True)
class RedisConfig:
    #: Namespace of every Redis key this store writes (use one per store; no '{' or '}').
    prefix: str = "cylon:"
    #: Values larger than this are split into chunks of this size (one key each).
    chunk_size: Size = Size(DEFAULT_CHUNK_SIZE)
    #: Seconds after which every key this store writes expires (the safety net for leftovers
    #: of crashed runs); None keeps keys until deleted.  With an eviction policy other than
    #: noeviction, Redis may also evict keys that have a ttl before it.
    ttl: Optional[float] = None
    #: AUTH credentials (also accepted in the URL: redis://user:password@host).
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    #: Seconds a single socket read or write may block (not counting blocking waits).
    socket_timeout: float = 30.0
    connect_timeout: float = 5.0
    #: Connections per server node (a blocking wait holds one).
    max_connections: int = 64
    #: rediss:// only: CA bundle, client certificate/key, and whether to verify the server.
    tls_ca_certs: Optional[str] = None
    tls_certfile: Optional[str] = None
    tls_keyfile: Optional[str] = None
    tls_verify: bool = True
    #: Use Redis Cluster (ElastiCache cluster mode enabled): slots are routed per key.
    cluster: bool = False
    #: Hash tag of an object's keys: "parent" puts all objects of one directory (one inbox of
    #: one exchange) on one slot; "key" spreads every object to its own slot.
    hash_tag: Literal["parent", "key"] = "parent"
    #: Blocking wake-up through RPUSH/BLPOP; false makes waiters poll (for comparison).
    notification: bool = True
    #: SCAN page size for list.
    scan_count: int = 1000

    def __post_init__(self):
        if not isinstance(self.prefix, str) or "{" in self.prefix or "}" in self.prefix or any(
                ord(c) < 32 for c in self.prefix):
            raise ConfigError(f"option 'prefix' must be a string without '{{', '}}' or control "
                              f"characters, got {self.prefix!r}", backend="redis")
        if not 4096 <= self.chunk_size <= REDIS_MAX_BULK - HEADER_SIZE:
            raise ConfigError(f"option 'chunk_size' must be between 4096 bytes and 512 MiB "
                              f"(Redis' proto-max-bulk-len), got {self.chunk_size}", backend="redis")
        if self.ttl is not None and self.ttl <= 0:
            raise ConfigError(f"option 'ttl' must be a positive number of seconds, got {self.ttl}",
                              backend="redis")
        for name in ("socket_timeout", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"option {name!r} must be > 0 seconds", backend="redis")
        if self.max_connections < 2:
            raise ConfigError("option 'max_connections' must be >= 2", backend="redis")
        if self.scan_count < 1:
            raise ConfigError("option 'scan_count' must be >= 1", backend="redis")


# ---------------------------------------------------------------------------------------------
# Key layout: one builder per kind of Redis key, and the inverse for commit records
# ---------------------------------------------------------------------------------------------

def escape_key(key: str) -> bytes:
    """UTF-8 with '{' and '}' mapped to bytes 1 and 2 (valid store keys hold no control
    characters), so the only braces in a Redis key are the adapter's hash tag."""
    raw = key.encode("utf-8", "surrogatepass")
    if b"\x01" in raw or b"\x02" in raw:
        raise InvalidKeyError("invalid key: control character", backend="redis", key=key)
    return raw.replace(b"{", b"\x01").replace(b"}", b"\x02")


def unescape_key(raw: bytes) -> str:
    return raw.replace(b"\x01", b"{").replace(b"\x02", b"}").decode("utf-8", "surrogatepass")


def glob_escape(raw: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in _GLOB_SPECIAL else bytes([c]) for c in raw)


class KeyLayout:
    def __init__(self, prefix: str, hash_tag: str):
        self.prefix = prefix.encode()
        self.by_parent = hash_tag == "parent"
        self._mhead = self.prefix + b"m:"

    def _tagged(self, kind: bytes, key: str) -> bytes:
        e = escape_key(key)
        basis = e[:e.rfind(b"/") + 1] if self.by_parent else e
        return self.prefix + kind + e + b"{" + xxhash.xxh3_64_hexdigest(basis).encode() + b"}"

    def record(self, key: str) -> bytes:
        return self._tagged(b"m:", key)

    def chunk(self, record: bytes, version: bytes, index: int) -> bytes:
        # Same tag as the record: derived from it, so a chunk is always on the record's slot.
        return b"%sd:%s:%s:%d" % (self.prefix, record[len(self._mhead):], version, index)

    def chunks(self, record: bytes, version: bytes, n: int) -> list[bytes]:
        return [self.chunk(record, version, i) for i in range(n)]

    def channel(self, name: str) -> bytes:
        return self._tagged(b"n:", name)

    def counter(self, name: str) -> bytes:
        return self._tagged(b"c:", name)

    def record_pattern(self, key_prefix: str) -> bytes:
        return glob_escape(self._mhead + escape_key(key_prefix)) + b"*"

    def parse_record(self, rkey: bytes) -> Optional[str]:
        """Store key of a commit record, or None for a key that is not one of ours."""
        if not rkey.startswith(self._mhead):
            return None
        rest = rkey[len(self._mhead):]
        i = rest.rfind(b"{")
        if i < 0 or len(rest) - i != 18 or not rest.endswith(b"}"):
            return None
        try:
            return unescape_key(rest[:i])
        except UnicodeDecodeError:
            return None


@dataclass(frozen=True)
class Header:
    layout: int
    version: bytes
    size: int
    chunk_size: int
    nchunks: int

    def pack(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.layout, self.version, self.size, self.chunk_size,
                            self.nchunks).ljust(HEADER_SIZE, b"\0")

    @staticmethod
    def parse(raw, *, key: str, op: str) -> "Header":
        raw = bytes(raw)
        if len(raw) < HEADER_SIZE or raw[:4] != _MAGIC:
            raise IntegrityError("the Redis value is not a cylon-store record (written by "
                                 "something else under this prefix?)", backend="redis", op=op,
                                 key=key)
        _, layout, version, size, chunk_size, nchunks = _HEADER.unpack_from(raw)
        return Header(layout, version, size, chunk_size, nchunks)

    def chunk_span(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.size)


# ---------------------------------------------------------------------------------------------
# RESP encoding and a reader that lands bulk payloads in caller buffers
# ---------------------------------------------------------------------------------------------

def _arg(a) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, (int, float)):
        return repr(a).encode()
    raise TypeError(type(a))


class Packer:
    """Builds a batch of commands as a list of byte strings for ``send_packed_command``:
    small arguments are concatenated, payload views are passed through uncopied."""

    def __init__(self):
        self.parts: list = []
        self._buf = bytearray()
        self.commands = 0

    def command(self, *args, payload: Sequence = (), payload_len: int = 0, tail: tuple = ()) -> None:
        """``args``, then (if ``payload`` is not empty) one bulk argument made of the payload
        views, then ``tail`` arguments."""
        n = len(args) + len(tail) + (1 if payload or payload_len else 0)
        self._buf += b"*%d\r\n" % n
        self._args(args)
        if payload or payload_len:
            self._buf += b"$%d\r\n" % payload_len
            for p in payload:
                if p.nbytes < _SMALL:
                    self._buf += p
                else:
                    self._flush()
                    self.parts.append(p)
            self._buf += b"\r\n"
        self._args(tail)
        self.commands += 1

    def _args(self, args) -> None:
        buf = self._buf
        for a in args:
            a = _arg(a)
            buf += b"$%d\r\n" % len(a)
            buf += a
            buf += b"\r\n"

    def _flush(self):
        if self._buf:
            self.parts.append(bytes(self._buf))
            self._buf = bytearray()

    def take(self) -> list:
        self._flush()
        out, self.parts = self.parts, []
        self.commands = 0
        return out


class _Closed(Exception):
    """The server closed the connection in the middle of a reply."""


class RespReader:
    """Reads RESP2 replies from a connection's socket: bulk strings either into a buffer the
    caller provides (no intermediate copy) or as bytes.  Used only for batches whose every reply
    it reads, so redis-py's own parser never holds a partial reply."""

    def __init__(self, conn):
        self.sock = compat.socket_of(conn)
        self.buf = bytearray()
        self.pos = 0

    def _more(self):
        data = self.sock.recv(65536)
        if not data:
            raise _Closed("connection closed by the server")
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                out = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return out
            self._more()

    def read_into(self, view: memoryview) -> None:
        n = view.nbytes
        take = min(len(self.buf) - self.pos, n)
        if take:
            view[:take] = self.buf[self.pos:self.pos + take]
            self.pos += take
        got = take
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise _Closed("connection closed by the server")
            got += k

    def crlf(self) -> None:
        end = bytearray(2)
        self.read_into(memoryview(end))
        if end != b"\r\n":
            raise _Closed("protocol error: bulk string not terminated")

    def bulk_len(self) -> int:
        """Length of the next reply, a bulk string (-1: nil).  Error replies raise the
        exception redis-py would raise for them."""
        line = self.line()
        kind = line[:1]
        if kind == b"$":
            return int(line[1:])
        if kind == b"-":
            raise compat.error_from_reply(line[1:].decode("utf-8", "replace"))
        raise _Closed(f"protocol error: expected a bulk string, got {line[:20]!r}")

    def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            k = min(n, scratch.nbytes)
            self.read_into(scratch[:k])
            n -= k

    @property
    def clean(self) -> bool:
        return self.pos == len(self.buf)


class ParsedReader:
    """The same interface over redis-py's own reply parser (one extra copy per reply): used when
    a connection exposes no socket to read from directly (``DIRECT_READS`` off, or a redis-py
    whose connections keep it elsewhere)."""

    clean = True

    def __init__(self, conn):
        self.conn = conn
        self.reply = memoryview(b"")
        self.pos = 0

    def bulk_len(self) -> int:
        r = self.conn.read_response()
        if r is None:
            return -1
        self.reply, self.pos = memoryview(r).cast("B"), 0
        return len(r)

    def read_into(self, view: memoryview) -> None:
        view[:] = self.reply[self.pos:self.pos + view.nbytes]
        self.pos += view.nbytes

    def crlf(self) -> None:
        pass

    def skip(self, n: int) -> None:   # n counts the bulk's CRLF, which the parser consumed
        self.pos = min(len(self.reply), self.pos + n)


#: Read bulk replies straight from the socket into result buffers (no intermediate copies).
DIRECT_READS = True


def reader_for(conn):
    if DIRECT_READS and compat.socket_of(conn) is not None:
        return RespReader(conn)
    return ParsedReader(conn)


# ---------------------------------------------------------------------------------------------
# Connection routing: one pool, or per-node pools of a cluster client
# ---------------------------------------------------------------------------------------------

class _SingleRouter:
    def __init__(self, pool):
        self.pool = pool

    def pool_for(self, rkey: bytes):
        return self.pool

    def scan_pools(self) -> list:
        return [self.pool]

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.pool.disconnect()


class _ClusterRouter:
    """Routes each key to the pool of the primary that owns its slot (redis-py's slot map)."""

    def __init__(self, client):
        self.client = client

    def pool_for(self, rkey: bytes):
        node = self.client.get_node_from_key(rkey)
        return self.client.get_redis_connection(node).connection_pool

    def scan_pools(self) -> list:
        return [self.client.get_redis_connection(n).connection_pool
                for n in self.client.get_primaries()]

    def refresh(self) -> None:
        try:
            self.client.nodes_manager.initialize()
        except Exception:  # the next attempt reports the cause
            pass

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------------
# Error mapping: by redis-py's exception class (which redis-py derives from the reply's error
# code), and by the error code itself for the codes redis-py has no class for; never by the
# message text.
# ---------------------------------------------------------------------------------------------

#: Error codes of replies redis-py raises as a plain ``ResponseError``.  BUSY: a script or
#: function runs past its time limit (the server refuses other commands until it ends);
#: WRONGTYPE: a key holds another data type (Redis command reference, "Errors").
BUSY_CODES = frozenset({"BUSY"})
WRONG_TYPE_CODES = frozenset({"WRONGTYPE"})

def map_redis_error(exc: BaseException, *, op: str, key: Optional[str], where: str) -> StoreError:
    from redis import exceptions as R

    def make(cls, message):
        return cls(f"{message} ({type(exc).__name__}: {exc})", backend="redis", op=op, key=key)

    if isinstance(exc, StoreError):
        return exc
    if _caused_by(exc, ssl.SSLCertVerificationError):
        return make(PermissionDeniedError, f"the TLS certificate of Redis at {where} could not be "
                    f"verified: pass the CA bundle (tls_ca_certs=) or tls_verify=false")
    if isinstance(exc, (R.AuthenticationError, R.AuthenticationWrongNumberOfArgsError,
                        R.AuthorizationError)):
        return make(PermissionDeniedError, f"authentication to Redis at {where} failed: check "
                    f"the username/password (URL redis://user:password@host or options "
                    f"username=, password=)")
    if isinstance(exc, R.NoPermissionError):
        return make(PermissionDeniedError, f"the Redis user may not run this command or touch this "
                    f"key (ACL) at {where}")
    if isinstance(exc, R.OutOfMemoryError):
        return make(PayloadTooLargeError, f"Redis at {where} is out of memory (maxmemory reached): "
                    f"delete leftovers, set a ttl, or give the cache more memory")
    if isinstance(exc, (R.BusyLoadingError, R.ReadOnlyError, R.TryAgainError, R.ClusterDownError,
                        R.AskError)):  # AskError includes MovedError
        return make(TransientError, f"Redis at {where} is loading, failing over or resharding")
    if isinstance(exc, R.ClusterCrossSlotError):
        return make(StoreError, "keys of one operation map to different cluster slots (a bug: "
                    "every key of an object shares one hash tag)")
    if isinstance(exc, R.MaxConnectionsError):
        return make(ThrottledError, f"no free connection to Redis at {where} (raise "
                    f"max_connections)")
    if isinstance(exc, (R.TimeoutError, socket.timeout)):
        return make(TransientError, f"Redis at {where} did not answer in time")
    if isinstance(exc, (R.ConnectionError, _Closed, OSError)):
        return make(TransientError, f"cannot talk to Redis at {where} (refused, reset or closed)")
    if isinstance(exc, R.ResponseError):
        code = compat.error_code(exc)
        if code in BUSY_CODES:
            return make(ThrottledError, f"Redis at {where} is busy")
        if code in WRONG_TYPE_CODES:
            return make(IntegrityError, "a Redis key of this store holds a value of another type "
                        "(another application writes under this prefix?)")
        return make(StoreError, f"Redis at {where} refused the command")
    if isinstance(exc, R.RedisClusterException):
        return make(TransientError, f"the cluster's slot map does not cover this key yet ({where})")
    if isinstance(exc, R.RedisError):
        return make(StoreError, f"Redis client error talking to {where}")
    return make(StoreError, "unexpected error")


def _caused_by(exc: BaseException, cls: type) -> bool:
    seen = 0
    cur: Optional[BaseException] = exc
    while cur is not None and seen < 10:
        if isinstance(cur, cls):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _is_redis_error(exc: BaseException) -> bool:
    from redis import exceptions as R
    return isinstance(exc, (R.RedisError, R.RedisClusterException, OSError, _Closed))


class _ChunkMissing(Exception):
    """A chunk of ``version`` was missing: the read raced with an overwrite or delete (read
    again), unless the record still names the same version (then the chunk is gone for good)."""

    def __init__(self, version: bytes):
        super().__init__(version)
        self.version = version


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------

class RedisAdapter(BlobAdapter):
    scheme = "redis"
    Config = RedisConfig
    capabilities = Capabilities(conditional_create=True, byte_ranges=True, max_object_size=None,
                                notification=True, atomic_counter=True, streaming_put=True)

    def __init__(self, location: str, config: RedisConfig, stats, options=None):
        super().__init__(location, config, stats, options)
        parts = urlsplit(location)
        self.tls = parts.scheme.lower() == "rediss"
        # redis:// or rediss:// (TLS): the same adapter class serves both schemes.
        self.scheme = parts.scheme.lower()  # type: ignore[misc]
        try:
            self.host = parts.hostname or "127.0.0.1"
            self.port = parts.port or 6379
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {self._safe(location)!r}: {exc}", backend="redis") from exc
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"the path of a Redis URL is the database number (redis://host:6379/0), "
                              f"got {path!r}", backend="redis")
        self.db = int(path or 0)
        if config.cluster and self.db:
            raise ConfigError("Redis Cluster has only database 0", backend="redis")
        self.username = config.username or (unquote(parts.username) if parts.username else None)
        self.password = config.password or (unquote(parts.password) if parts.password else None)
        if not self.tls and (config.tls_ca_certs or config.tls_certfile or config.tls_keyfile):
            raise ConfigError("tls_* options need a rediss:// URL", backend="redis")
        self.keys = KeyLayout(config.prefix, config.hash_tag)
        self.where = f"{self.host}:{self.port}"
        if not config.notification:
            self.capabilities = Capabilities(conditional_create=True, byte_ranges=True,
                                             notification=False, atomic_counter=True,
                                             streaming_put=True)
        self._router = None
        self._router_lock = threading.Lock()
        self._pid = os.getpid()
        #: Retries this adapter runs itself (notify, wait, the checkout before INCR), on the
        #: store's retry options and counted as the facade counts its own.
        self._retry = counting_retries(self)

    @staticmethod
    def _safe(location: str) -> str:
        p = urlsplit(location)
        return f"{p.scheme}://{p.hostname}:{p.port or 6379}{p.path}"

    def describe(self) -> str:
        return (f"{self.scheme}://{self.where}/{self.db}?prefix={self.config.prefix}"
                + ("&cluster=true" if self.config.cluster else ""))

    # -- connections ----------------------------------------------------------------------
    @staticmethod
    def _no_retries():
        """redis-py's own retries, off: one retry layer (``cylon_store.retry``), so that
        attempts do not multiply."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        return Retry(NoBackoff(), 0)

    def _connection_kwargs(self) -> dict:
        c = self.config
        kw = dict(username=self.username, password=self.password, socket_timeout=c.socket_timeout,
                  socket_connect_timeout=c.connect_timeout, socket_keepalive=True,
                  health_check_interval=0, protocol=2, retry=self._no_retries())
        if self.tls:
            kw.update(ssl_ca_certs=c.tls_ca_certs, ssl_certfile=c.tls_certfile,
                      ssl_keyfile=c.tls_keyfile, ssl_cert_reqs="required" if c.tls_verify else "none",
                      ssl_check_hostname=c.tls_verify)
        return kw

    def _make_router(self):
        import redis
        kw = self._connection_kwargs()
        if self.config.cluster:
            from redis.cluster import RedisCluster
            # The cluster client takes its retry as a parameter (not a connection option); it
            # gives its node connections none of their own.
            retry = kw.pop("retry")
            if self.tls:
                kw["ssl"] = True
            try:
                client = RedisCluster(host=self.host, port=self.port, retry=retry,
                                      max_connections=self.config.max_connections, **kw)
            except Exception as exc:
                raise map_redis_error(exc, op="connect", key=None, where=self.where) from exc
            return _ClusterRouter(client)
        cls = redis.SSLConnection if self.tls else redis.Connection
        pool = redis.BlockingConnectionPool(connection_class=cls, host=self.host, port=self.port,
                                            db=self.db, max_connections=self.config.max_connections,
                                            timeout=self.config.socket_timeout, **kw)
        return _SingleRouter(pool)

    @property
    def router(self):
        r = self._router
        if r is None or self._pid != os.getpid():
            with self._router_lock:
                if self._router is None or self._pid != os.getpid():
                    self._router = self._make_router()
                    self._pid = os.getpid()
                r = self._router
        return r

    def close(self) -> None:
        with self._router_lock:
            r, self._router = self._router, None
        if r is not None:
            try:
                r.close()
            except Exception:
                pass

    @contextmanager
    def _session(self, rkey: Optional[bytes], op: str, key: Optional[str], pool=None):
        """A pooled connection for one exchange of commands.  Redis and socket errors become the
        project's errors (other exceptions pass unchanged); a connection left with a half-sent
        command or unread replies is dropped, not returned to the pool for reuse."""
        try:
            pool = pool or self.router.pool_for(rkey)
            conn = pool.get_connection()
        except Exception as exc:
            raise self._error(exc, op, key) from exc
        session = _Session(self, conn)
        try:
            yield session
        except (StoreError, _ChunkMissing):
            raise
        except Exception as exc:
            if _is_redis_error(exc):
                from redis.exceptions import OutOfMemoryError
                if isinstance(exc, OutOfMemoryError):
                    # The server keeps a connection's query buffer (a refused chunk) for a
                    # while: closing the connection gives the memory back now.
                    session.dirty = True
                raise self._error(exc, op, key) from exc
            raise
        finally:
            if session.dirty:
                conn.disconnect()
            pool.release(conn)

    def _error(self, exc: BaseException, op: str, key: Optional[str]) -> StoreError:
        from redis import exceptions as R
        if isinstance(exc, (R.AskError, R.ClusterDownError)):
            self.router.refresh()
        return map_redis_error(exc, op=op, key=key, where=self.where)

    def _px(self, extra: float = 0.0) -> tuple:
        ttl = self.config.ttl
        return () if ttl is None else (b"PX", int((ttl + extra) * 1000))

    # -- put --------------------------------------------------------------------------------
    def put_notify(self, key: str, chunks: Iterable, messages) -> tuple[int, builtins.list[bool]]:
        """On one server, the announcements go in the put's own transaction: one round trip."""
        if not isinstance(self.router, _SingleRouter) or not self.capabilities.notification:
            return super().put_notify(key, chunks, messages)
        pairs = [(self.keys.channel(ch), bytes(m)) for ch, m in messages]
        return self.put(key, chunks, PutMode.OVERWRITE, _notify=pairs), [True] * len(pairs)

    def put(self, key, chunks: Iterable, mode=PutMode.OVERWRITE, _notify=()) -> int:
        rkey = self.keys.record(key)
        cs = self.config.chunk_size
        version = os.urandom(8).hex().encode()
        held: list[memoryview] = []   # payload not yet sent (at most one chunk)
        held_len = 0
        sent = 0                      # chunks written
        size = 0
        # The checkout of a connection (nothing sent yet) is retried here: the facade does not
        # retry a create or a streamed put, and one dropped connection must not fail them.
        pool = self._retry.call(lambda: self._checked_pool(rkey, "put", key), idempotent=True)
        with self._session(rkey, "put", key, pool=pool) as s:
            try:
                for piece in chunks:
                    view = _as_view(piece)
                    while view.nbytes:
                        if held_len == cs:    # more than one chunk: the held one goes out
                            s.send_chunk(self.keys.chunk(rkey, version, sent), held, held_len)
                            sent += 1
                            held, held_len = [], 0
                        part = view[:cs - held_len]
                        held.append(part)
                        held_len += part.nbytes
                        size += part.nbytes
                        view = view[part.nbytes:]
                if sent:
                    s.send_chunk(self.keys.chunk(rkey, version, sent), held, held_len)
                    sent += 1
                    held, held_len = [], 0
                    s.drain_chunks()
            except BaseException:
                # Nothing was published: drop what was sent (on a fresh connection, since this
                # one may be mid-command), then report the cause.
                s.abandon()
                if sent:
                    self._unlink_quietly(rkey, self.keys.chunks(rkey, version, sent))
                raise
            if sent:
                header = Header(_CHUNKED, version, size, cs, sent)
                payload, plen = [], 0
            else:
                header = Header(_INLINE, version, size, cs, 0)
                payload, plen = held, held_len
            try:
                old = s.commit(rkey, header, payload, plen, mode, key, _notify)
            except AlreadyExistsError:
                if sent:
                    s.unlink_quietly(self.keys.chunks(rkey, version, sent))
                raise
            except BaseException:
                # If the commit's reply was lost it may have been applied: its chunks must stay
                # (the ttl reclaims them if it was not).  Otherwise they are ours to drop.
                if sent and not s.commit_unknown:
                    self._unlink_quietly(rkey, self.keys.chunks(rkey, version, sent))
                raise
            if old is not None and old.layout == _CHUNKED:
                # The put has succeeded; if this cleanup fails the ttl reclaims the chunks.
                s.unlink_quietly(self.keys.chunks(rkey, old.version, old.nchunks))
        self.stats.add("redis_chunks_written", sent)
        return size

    def _unlink_quietly(self, rkey: bytes, keys: list[bytes]) -> None:
        try:
            with self._session(rkey, "put", None) as s:
                s.unlink(keys)
        except StoreError:
            pass  # left to the ttl

    # -- get / head ---------------------------------------------------------------------------
    def get(self, key, byte_range=None, if_version=None):
        rkey = self.keys.record(key)
        want = if_version.encode() if isinstance(if_version, str) else if_version
        try:
            with self._session(rkey, "get", key) as s:
                if byte_range is None:
                    return s.get_whole(rkey, key, want)
                return s.get_range(rkey, key, byte_range, want)
        except _ChunkMissing as exc:
            missing = exc.version
        # A chunk of the version read was gone.  If the record still names that version, the
        # chunk is lost for good and reading again cannot help; otherwise the object was
        # replaced or deleted while it was read, and the facade's retry reads it again.
        current = self._header(rkey, "get", key)
        if current is not None and current.version == missing:
            raise IntegrityError("a chunk of the current version is missing (evicted under "
                                 "memory pressure, or expired: see the ttl and maxmemory-policy "
                                 "notes)", backend="redis", op="get", key=key)
        raise TransientError("object was replaced while it was read; read it again",
                             backend="redis", op="get", key=key)

    def head(self, key) -> ObjectMeta:
        h = self._header(self.keys.record(key), "head", key)
        if h is None:
            raise NotFoundError("no such key", backend="redis", op="head", key=key)
        return ObjectMeta(key, h.size, h.version.decode())

    def _header(self, rkey: bytes, op: str, key: str) -> Optional[Header]:
        """The header of the commit record ``rkey`` (one GETRANGE), None if there is none."""
        with self._session(rkey, op, key) as s:
            raw = s.call(b"GETRANGE", rkey, 0, HEADER_SIZE - 1)
        return Header.parse(raw, key=key, op=op) if raw else None

    # -- delete / list ------------------------------------------------------------------------
    def delete_many(self, keys: Sequence[str]) -> None:
        by_pool: dict = {}
        for key in keys:
            rkey = self.keys.record(key)
            pool = self.router.pool_for(rkey)
            by_pool.setdefault(id(pool), (pool, []))[1].append((key, rkey))
        for pool, items in by_pool.values():
            with self._session(None, "delete", items[0][0], pool=pool) as s:
                p = Packer()
                for _, rkey in items:
                    p.command(b"MULTI")
                    p.command(b"GETRANGE", rkey, 0, HEADER_SIZE - 1)
                    p.command(b"DEL", rkey)
                    p.command(b"EXEC")
                replies = s.batch(p)
                stale = []   # one list per object: its chunks share its slot, not the others'
                for i, (key, rkey) in enumerate(items):
                    res = replies[4 * i + 3]
                    if isinstance(res, list) and res and res[0]:
                        try:
                            h = Header.parse(res[0], key=key, op="delete")
                        except IntegrityError:
                            continue
                        if h.layout == _CHUNKED:
                            stale.append(self.keys.chunks(rkey, h.version, h.nchunks))
                if stale:
                    s.unlink(*stale)

    def list(self, prefix: str) -> list[ObjectMeta]:
        pattern = self.keys.record_pattern(prefix)
        found: dict[str, ObjectMeta] = {}
        for pool in self.router.scan_pools():
            with self._session(None, "list", prefix, pool=pool) as s:
                cursor = b"0"
                while True:
                    cursor, rkeys = s.call(b"SCAN", cursor, b"MATCH", pattern, b"COUNT",
                                           self.config.scan_count)
                    mine = [(k, self.keys.parse_record(k)) for k in rkeys]
                    mine = [(k, name) for k, name in mine if name is not None and name.startswith(prefix)
                            and name not in found]
                    named: list[tuple[bytes, str]] = [(k, name) for k, name in mine if name is not None]
                    if mine:
                        p = Packer()
                        for k, _ in named:
                            p.command(b"GETRANGE", k, 0, HEADER_SIZE - 1)
                        for (k, name), raw in zip(named, s.batch(p)):
                            if not raw:
                                continue  # deleted since the scan saw it
                            try:
                                h = Header.parse(raw, key=name, op="list")
                            except IntegrityError:
                                continue
                            found[name] = ObjectMeta(name, h.size, h.version.decode())
                    if cursor in (b"0", 0):
                        break
        return list(found.values())

    # -- notification and counter ---------------------------------------------------------------
    def notify(self, channel: str, message: bytes = b"") -> Optional[bool]:
        if not self.capabilities.notification:
            return super().notify(channel, message)
        ch = self.keys.channel(channel)

        def once():
            with self._session(ch, "notify", channel) as s:
                p = Packer()
                p.command(b"RPUSH", ch, bytes(message))
                if self.config.ttl is not None:
                    p.command(b"PEXPIRE", ch, int(self.config.ttl * 1000))
                s.batch(p)
        # Safe to repeat: a receiver keeps the keys it is told about in a set, so a message
        # delivered twice (the reply of a first attempt lost) is harmless.
        self._retry.call(once, idempotent=True)
        return True

    def notify_many(self, messages) -> builtins.list[bool]:
        if not self.capabilities.notification:
            return super().notify_many(messages)
        groups: dict[int, tuple[Any, list]] = {}
        for channel, message in messages:
            ch = self.keys.channel(channel)
            pool = self.router.pool_for(ch)
            groups.setdefault(id(pool), (pool, []))[1].append((ch, channel, bytes(message)))
        for pool, items in groups.values():
            def once(pool=pool, items=items):
                with self._session(items[0][0], "notify", items[0][1], pool=pool) as s:
                    p = Packer()
                    for ch, _, message in items:
                        p.command(b"RPUSH", ch, message)
                        if self.config.ttl is not None:
                            p.command(b"PEXPIRE", ch, int(self.config.ttl * 1000))
                    s.batch(p)
            # Safe to repeat, as notify.
            self._retry.call(once, idempotent=True)
        return [True] * len(messages)

    def wait(self, channel: str, timeout: float) -> builtins.list:
        """BLPOP for the first message, then take the rest in one transaction (LRANGE + DEL),
        all in one round trip.  A connection lost after the server ran it loses the messages:
        the communicator LISTs as a fallback, so they only cost time — which is also why a
        failed attempt is safe to repeat."""
        if not self.capabilities.notification:
            return super().wait(channel, timeout)
        ch = self.keys.channel(channel)

        def once():
            with self._session(ch, "wait", channel) as s:
                p = Packer()
                if timeout > 0:
                    p.command(b"BLPOP", ch, b"%.3f" % max(timeout, 0.001))
                p.command(b"MULTI")
                p.command(b"LRANGE", ch, 0, -1)
                p.command(b"DEL", ch)
                p.command(b"EXEC")
                replies = s.batch(p, read_timeout=max(timeout, 0) + self.config.socket_timeout)
                first = [replies[0][1]] if timeout > 0 and replies[0] is not None else []
                rest = replies[-1][0] if replies[-1] else []
                return [bytes(m) for m in first + list(rest)]
        return self._retry.call(once, idempotent=True)

    def incr(self, key: str) -> int:
        ck = self.keys.counter(key)
        # INCR is not idempotent: it is sent once; only the checkout of a connection before it
        # (nothing sent yet) is retried.
        pool = self._retry.call(lambda: self._checked_pool(ck, "incr", key), idempotent=True)
        with self._session(ck, "incr", key, pool=pool) as s:
            p = Packer()
            p.command(b"INCR", ck)
            if self.config.ttl is not None:
                p.command(b"PEXPIRE", ck, int(self.config.ttl * 1000))
            return int(s.batch(p)[0])

    def _checked_pool(self, rkey: bytes, op: str, key: str):
        pool = self.router.pool_for(rkey)
        try:
            conn = pool.get_connection()
        except Exception as exc:
            raise self._error(exc, op, key) from exc
        pool.release(conn)
        return pool

    def sweep(self, prefix: str) -> int:
        """What ``list`` cannot see under ``prefix``: chunks that no commit record names (a
        writer killed between its chunks and its commit, with no ``ttl``), notification lists
        and counters.  For ``cylon-store clean``: run it when no job under ``prefix`` runs."""
        esc = escape_key(prefix)
        removed = 0
        for pool in self.router.scan_pools():
            with self._session(None, "sweep", prefix, pool=pool) as s:
                for kind in (b"d:", b"n:", b"c:"):
                    pattern = glob_escape(self.keys.prefix + kind + esc) + b"*"
                    cursor = b"0"
                    while True:
                        cursor, rkeys = s.call(b"SCAN", cursor, b"MATCH", pattern, b"COUNT",
                                               self.config.scan_count)
                        doomed = [k for k in rkeys if kind != b"d:" or self._orphan_chunk(s, k)]
                        for k in doomed:   # one key per UNLINK: keys may sit on other slots
                            s.call(b"UNLINK", k)
                        removed += len(doomed)
                        if cursor in (b"0", 0):
                            break
        return removed

    def _orphan_chunk(self, s, chunk_key: bytes) -> bool:
        rest = chunk_key[len(self.keys.prefix) + 2:]          # E{T}:VER:I
        parts = rest.rsplit(b":", 2)
        if len(parts) != 3:
            return False                                       # not one of ours
        record = self.keys.prefix + b"m:" + parts[0]
        raw = s.call(b"GETRANGE", record, 0, HEADER_SIZE - 1)
        if not raw:
            return True
        try:
            return Header.parse(raw, key=parts[0].decode(errors="replace"),
                                op="sweep").version != parts[1]
        except IntegrityError:
            return False

    def delete_counter(self, key: str) -> None:
        # Idempotent: the facade retries it (Store.delete_counter), so not here as well.
        ck = self.keys.counter(key)
        with self._session(ck, "delete_counter", key) as s:
            s.call(b"DEL", ck)


def _as_view(piece) -> memoryview:
    view = piece if isinstance(piece, memoryview) else memoryview(piece)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class _Session:
    """Command exchanges on one checked-out connection.  ``dirty`` is true while commands are
    sent whose replies are not all read; the connection is then dropped instead of reused."""

    def __init__(self, adapter: RedisAdapter, conn):
        self.a = adapter
        self.conn = conn
        self.in_flight = 0
        self.dirty = False
        self.commit_unknown = False

    # -- generic ------------------------------------------------------------------------------
    def _send(self, parts: list, commands: int) -> None:
        self.a.stats.count("redis.COMMANDS", commands)
        self.dirty = True
        self.conn.send_packed_command(parts, check_health=False)

    def batch(self, packer: Packer, read_timeout: Optional[float] = None) -> list:
        """Send every command of ``packer``, read every reply; then raise the first error."""
        n = packer.commands
        self._send(packer.take(), n)
        return self._replies(n, read_timeout)

    def _replies(self, n: int, read_timeout: Optional[float] = None, *, last: bool = True) -> list:
        from redis import exceptions as R
        out, first = [], None
        kw = {} if read_timeout is None else {"timeout": read_timeout}
        for _ in range(n):
            try:
                r = self.conn.read_response(**kw)
            except R.ResponseError as exc:  # the reply was read whole: the stream stays in sync
                first = first or exc
                r = exc
            if isinstance(r, list):
                for item in r:
                    if isinstance(item, R.ResponseError):
                        first = first or item
            out.append(r)
        if last:
            self.dirty = False
        if first is not None:
            raise first
        return out

    def call(self, *args):
        p = Packer()
        p.command(*args)
        return self.batch(p)[0]

    def unlink(self, *groups: list[bytes]) -> None:
        """UNLINK each group of keys (keys of one object: one slot), pipelined."""
        p = Packer()
        for keys in groups:
            for i in range(0, len(keys), 1024):
                p.command(b"UNLINK", *keys[i:i + 1024])
        if p.commands:
            self.batch(p)

    def unlink_quietly(self, *groups: list[bytes]) -> None:
        try:
            self.unlink(*groups)
        except Exception as exc:
            if not _is_redis_error(exc):
                raise
            self.abandon()

    def abandon(self) -> None:
        """Drop the connection now (it may hold a half-sent command or unread replies)."""
        if self.dirty:
            self.conn.disconnect()
            self.dirty = False
        self.in_flight = 0

    # -- put ------------------------------------------------------------------------------------
    def send_chunk(self, ckey: bytes, views: list, n: int) -> None:
        p = Packer()
        p.command(b"SET", ckey, payload=views, payload_len=n, tail=self.a._px(CHUNK_TTL_MARGIN))
        self._send(p.take(), 1)
        self.in_flight += 1
        if self.in_flight > _MAX_IN_FLIGHT:
            self.in_flight -= 1
            self._replies(1, last=False)

    def drain_chunks(self) -> None:
        n, self.in_flight = self.in_flight, 0
        self._replies(n)

    def commit(self, rkey: bytes, header: Header, payload: list, plen: int, mode: PutMode,
               key: str, notify: Sequence[tuple[bytes, bytes]] = ()) -> Optional[Header]:
        """Publish the record; return the header it replaced (None if there was none).
        ``notify``: (channel, message) pairs pushed in the same transaction (one server only)."""
        value = [memoryview(header.pack())] + payload
        p = Packer()
        if mode is PutMode.CREATE:
            p.command(b"SET", rkey, payload=value, payload_len=HEADER_SIZE + plen,
                      tail=(b"NX",) + self.a._px())
        else:
            # The old header comes back from the same transaction: exactly the chunks this
            # commit orphaned are deleted afterwards, even with concurrent writers.
            p.command(b"MULTI")
            p.command(b"GETRANGE", rkey, 0, HEADER_SIZE - 1)
            p.command(b"SET", rkey, payload=value, payload_len=HEADER_SIZE + plen,
                      tail=self.a._px())
            for ch, message in notify:
                p.command(b"RPUSH", ch, message)
                if self.a.config.ttl is not None:
                    p.command(b"PEXPIRE", ch, int(self.a.config.ttl * 1000))
            p.command(b"EXEC")
        n = p.commands
        self.commit_unknown = True
        self._send(p.take(), n)
        try:
            replies = self._replies(n)
        except Exception as exc:
            from redis import exceptions as R
            if isinstance(exc, R.ResponseError):
                self.commit_unknown = False   # the server answered: nothing was applied
            raise
        self.commit_unknown = False
        if mode is PutMode.CREATE:
            if replies[0] is None:
                raise AlreadyExistsError("key already exists (create-if-absent)", backend="redis",
                                         op="put", key=key)
            return None
        old = replies[-1][0]
        if not old:
            return None
        try:
            return Header.parse(old, key=key, op="put")
        except IntegrityError:
            return None  # replaced a foreign value: nothing of ours to clean

    # -- get ------------------------------------------------------------------------------------
    def get_whole(self, rkey: bytes, key: str, want: Optional[bytes]):
        p = Packer()
        p.command(b"GET", rkey)
        self._send(p.take(), 1)
        rd = reader_for(self.conn)
        n = rd.bulk_len()
        if n < 0:
            self._done(rd)
            raise NotFoundError("no such key", backend="redis", op="get", key=key)
        head = bytearray(min(n, HEADER_SIZE))
        rd.read_into(memoryview(head))
        try:
            h = Header.parse(head, key=key, op="get")
            if want is not None and h.version != want:
                raise PreconditionError("object changed since it was first read",
                                        backend="redis", op="get", key=key)
            if h.layout == _INLINE and n - HEADER_SIZE != h.size:
                raise IntegrityError(f"record holds {n - HEADER_SIZE} bytes, its header says "
                                     f"{h.size}", backend="redis", op="get", key=key)
        except StoreError:
            rd.skip(n - len(head) + 2)
            self._done(rd)
            raise
        out = pa.allocate_buffer(h.size)   # 64-byte aligned: Arrow decodes it in place
        view = memoryview(out).cast("B")
        if h.layout == _INLINE:
            rd.read_into(view)
            rd.crlf()
            self._done(rd)
            return out
        rd.skip(n - HEADER_SIZE + 2)
        self._done(rd)
        spans = [h.chunk_span(i) for i in range(h.nchunks)]
        self._read_chunks(rkey, key, h, [(i, 0, e - s, s) for i, (s, e) in enumerate(spans)],
                          view, want)
        return out

    def get_range(self, rkey: bytes, key: str, byte_range, want: Optional[bytes]):
        start, end = (int(x) for x in byte_range)
        if start < 0 or end < 0:
            raise ConfigError(f"byte range {tuple(byte_range)!r} must not be negative",
                              backend="redis", op="get", key=key)
        p = Packer()
        # Header and (for an inline value) the range, read atomically together.
        p.command(b"MULTI")
        p.command(b"GETRANGE", rkey, 0, HEADER_SIZE - 1)
        # GETRANGE's end is inclusive; an empty range asks for start > end, which reads nothing.
        p.command(b"GETRANGE", rkey, HEADER_SIZE + start, HEADER_SIZE + max(end, start) - 1)
        p.command(b"EXEC")
        raw_head, inline = self.batch(p)[-1]
        if not raw_head:
            raise NotFoundError("no such key", backend="redis", op="get", key=key)
        h = Header.parse(raw_head, key=key, op="get")
        if want is not None and h.version != want:
            raise PreconditionError("object changed since it was first read", backend="redis",
                                    op="get", key=key)
        end = min(end, h.size)
        start = min(start, end)
        if h.layout == _INLINE:
            return pa.py_buffer(inline)
        out = pa.allocate_buffer(end - start)
        view = memoryview(out).cast("B")
        parts = []
        if end > start:
            for i in range(start // h.chunk_size, (end - 1) // h.chunk_size + 1):
                cs, ce = h.chunk_span(i)
                a, b = max(start, cs), min(end, ce)
                parts.append((i, a - cs, b - a, a - start))
        self._read_chunks(rkey, key, h, parts, view, want)
        return out

    def _read_chunks(self, rkey, key, h: Header, parts, view: memoryview, want) -> None:
        """Read ``(chunk, offset in chunk, length, offset in view)`` pieces of version
        ``h.version`` into ``view``; a missing chunk means the object changed.  Requests are
        pipelined in a sliding window of ``READ_WINDOW`` bytes, so the server never holds more
        than that of this value in its output buffer (which counts toward maxmemory)."""
        if not parts:
            return
        window = max(2, READ_WINDOW // h.chunk_size)
        requested = 0

        def request(upto: int) -> None:
            nonlocal requested
            p = Packer()
            while requested < upto:
                i, off, length, _ = parts[requested]
                ckey = self.a.keys.chunk(rkey, h.version, i)
                s, e = h.chunk_span(i)
                if off == 0 and length == e - s:
                    p.command(b"GET", ckey)
                else:
                    p.command(b"GETRANGE", ckey, off, off + length - 1)
                requested += 1
            if p.commands:
                n = p.commands
                self._send(p.take(), n)

        request(min(window, len(parts)))
        rd = reader_for(self.conn)
        changed = False
        for done, (i, off, length, at) in enumerate(parts):
            if done == requested:
                break   # the object changed: nothing more was asked for
            n = rd.bulk_len()
            if n < 0:
                changed = True
            elif n != length or changed:
                changed = True
                rd.skip(n + 2)
            else:
                rd.read_into(view[at:at + length])
                rd.crlf()
            if not changed:
                request(min(done + 1 + window, len(parts)))
        self._done(rd)
        if changed:
            if want is not None:
                raise PreconditionError("object changed (or its chunks expired) while it was "
                                        "read", backend="redis", op="get", key=key)
            raise _ChunkMissing(h.version)

    def _done(self, rd) -> None:
        """Every reply of the batch was read; bytes beyond them would be a protocol error."""
        self.dirty = not rd.clean
