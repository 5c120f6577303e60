"""The Store facade: Arrow data in, Arrow data out, over any blob adapter.

Everything convenient lives here once — encoding, integrity checks, key validation, retries,
request counting, exists/delete-one, streaming reads — so an adapter only moves bytes.  A Store
pickles through its URL and options and re-creates its client lazily, so it can be shipped to a
worker process or a Lambda.
"""

from __future__ import annotations

import builtins
import re
import threading
import uuid
from typing import Iterable, Optional, Union
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa

from . import codec, retry
from .adapters.base import BlobAdapter, ObjectMeta, PutMode, Stats
from .config import StoreOptions, build_options, option_names, redact_url, split_url
from .errors import ConfigError, InvalidKeyError, NotFoundError, NotSupportedError, StoreError
from .registry import adapter_class, option_classes_of_other_schemes

#: Longest key any backend accepts (S3's limit, in UTF-8 bytes).
MAX_KEY_BYTES = 1024

ArrowData = Union[pa.Table, pa.RecordBatch, pa.RecordBatchReader, Iterable[pa.RecordBatch]]


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def validate_key(key, *, backend: str = "", op: str = "") -> str:
    """Keys are '/'-separated relative names: no empty, '.' or '..' segments, no NUL or control
    characters, no leading or trailing '/', at most ``MAX_KEY_BYTES`` bytes of UTF-8."""
    def bad(why):
        return InvalidKeyError(f"invalid key: {why}", backend=backend or None, op=op or None,
                               key=key if isinstance(key, str) else repr(key))
    if not isinstance(key, str):
        raise bad(f"keys are str, not {type(key).__name__}")
    if not key:
        raise bad("empty key")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no backend can store the name
        raise bad("not valid Unicode (lone surrogate)") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise bad(f"longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise bad("absolute path (keys are relative to the store)")
    if key.endswith("/"):
        raise bad("trailing '/'")
    if _CONTROL.search(key):
        raise bad("NUL or control character")
    if "\\" in key:
        raise bad("backslash (use '/' to separate key segments)")
    if "//" in key or key.startswith("./") or key.startswith("../") or "/./" in key \
            or "/../" in key or key.endswith("/.") or key.endswith("/..") or key in (".", ".."):
        for seg in key.split("/"):
            if seg == "":
                raise bad("empty segment ('//')")
            if seg in (".", ".."):
                raise bad(f"'{seg}' segment")
    return key


def _could_start_a_key(prefix: str) -> bool:
    """Whether some valid key (see ``validate_key``) starts with ``prefix``."""
    if not prefix:
        return True
    try:
        if len(prefix.encode("utf-8")) > MAX_KEY_BYTES:
            return False
    except UnicodeEncodeError:
        return False
    if prefix.startswith("/") or "\\" in prefix or _CONTROL.search(prefix):
        return False
    # Every segment but the last is complete, so it must be a valid segment.
    return not any(seg in ("", ".", "..") for seg in prefix.split("/")[:-1])


class Store:
    """Arrow put/get over one backend.  Create with ``cylon_store.open_store(url, **options)``."""

    def __init__(self, url: str, **options):
        scheme, location, query = split_url(url)
        cls: type[BlobAdapter] = adapter_class(scheme)
        self._adapter_cls = cls
        if scheme == "memory" and not location.split("://", 1)[1].strip("/"):
            # An anonymous memory store gets a name so that unpickling it in this process (a
            # thread launcher, a copy) finds the same objects.
            location = f"memory://anon-{uuid.uuid4().hex[:12]}"
        self.url = location
        self.scheme = scheme
        self._given = {"query": dict(query), "kwargs": dict(options)}
        known = lambda: option_names(*option_classes_of_other_schemes(scheme))  # noqa: E731
        self.options, self.adapter_config = build_options(
            [StoreOptions, cls.Config], kwargs=options, query=query, known_env=known,
            # Environment namespace of the adapter (rediss:// reads CYLON_STORE_REDIS_*,
            # flight+tls:// CYLON_STORE_FLIGHT_*).
            scheme=getattr(cls, "scheme", "") or scheme, common=[StoreOptions])
        self._stats = Stats()
        self._adapter: Optional[BlobAdapter] = None
        self._lock = threading.Lock()
        self._closed = False
        self.adapter  # fail fast on a bad location (missing directory, bad name)

    # -- plumbing -----------------------------------------------------------------------
    @property
    def adapter(self) -> BlobAdapter:
        a = self._adapter
        if a is None:
            with self._lock:
                if self._closed:
                    raise StoreError("the store is closed", backend=self.scheme)
                if self._adapter is None:
                    self._adapter = self._adapter_cls(self.url, self.adapter_config, self._stats,
                                                      options=self.options)
                a = self._adapter
        return a

    @property
    def capabilities(self):
        return self.adapter.capabilities

    def __getstate__(self):
        return {"url": self.url, "given": self._given}

    def __setstate__(self, state):
        given = state["given"]
        query = urlencode(given["query"])
        url = state["url"] + (f"?{query}" if query else "")
        self.__init__(url, **given["kwargs"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            a, self._adapter = self._adapter, None
        if a is not None:
            a.close()

    @property
    def safe_url(self) -> str:
        """The store's URL with any password or secret option masked: the form every message,
        repr and log line uses (``url`` keeps the credentials a reopen needs)."""
        return redact_url(self.url)

    def __repr__(self):
        return f"Store({redact_url(self.adapter.describe()) if self._adapter else self.safe_url!r})"

    def _where(self, op: str, key: Optional[str]):
        return lambda: {"backend": self.scheme, "op": op, "key": key}

    def _check_mode(self, mode: PutMode, key: str) -> PutMode:
        # Without an atomic create-if-absent, a "create" would silently be a racy overwrite.
        if mode is PutMode.CREATE and not self.adapter.capabilities.conditional_create:
            raise NotSupportedError("this backend has no atomic create-if-absent; use "
                                    "mode='overwrite', or a backend that declares "
                                    "conditional_create", backend=self.scheme, op="put", key=key)
        return mode

    def _retrying(self, fn, *, idempotent: bool):
        o = self.options
        return retry.call(fn, idempotent=idempotent, attempts=o.retries, base=o.retry_base,
                          cap=o.retry_cap, on_retry=lambda exc: self._stats.count("retries"))

    # -- Arrow API ----------------------------------------------------------------------
    def put(self, key: str, data: ArrowData, *, mode: Union[str, PutMode] = "overwrite") -> dict:
        """Store ``data`` under ``key``, atomically.  ``mode="create"`` fails with
        ``AlreadyExistsError`` if the key exists.  Returns ``{"rows", "batches", "bytes"}``.

        A Table or RecordBatch is retried on transient errors; a RecordBatchReader or iterator
        is streamed once (memory bounded by one batch on streaming backends) and not retried.
        """
        validate_key(key, backend=self.scheme, op="put")
        mode = self._check_mode(_mode(mode), key)
        info: dict = {}
        o = self.options
        replayable = isinstance(data, (pa.Table, pa.RecordBatch))

        def attempt():
            chunks = codec.encode(data, compression=o.compression, segment_size=o.segment_size,
                                  stats=info)
            if not self.adapter.capabilities.streaming_put:
                chunks = list(chunks)
            return self.adapter.put(key, chunks, mode)

        if replayable:
            codec._as_reader(data)  # type errors before any I/O
        written = self._retrying(attempt, idempotent=replayable and mode is PutMode.OVERWRITE)
        self._stats.count("put")
        self._stats.sent(written)
        return info

    def get(self, key: str) -> pa.Table:
        """The table stored under ``key``, verified against its checksums (zero-copy decode)."""
        validate_key(key, backend=self.scheme, op="get")
        buf = self._retrying(lambda: self.adapter.get(key), idempotent=True)
        self._stats.count("get")
        self._stats.received(len(memoryview(buf)))
        return codec.decode(buf, self._where("get", key))

    def get_batches(self, key: str) -> pa.RecordBatchReader:
        """Stream the table under ``key`` batch by batch; memory stays bounded by one segment
        (``segment_size``) plus one batch.  The object is pinned to the version first seen: if it
        is replaced mid-read the reader raises instead of mixing versions."""
        validate_key(key, backend=self.scheme, op="get")
        meta = self.head(key)
        where = self._where("get", key)
        ranged = self.adapter.capabilities.byte_ranges
        if not ranged:
            return self.get(key).to_reader()

        def read_range(start, end):
            buf = self._retrying(
                lambda: self.adapter.get(key, byte_range=(start, end), if_version=meta.version or None),
                idempotent=True)
            self._stats.count("get")
            self._stats.received(end - start)
            return buf

        tail_len = min(meta.size, 64 << 10)
        tail = read_range(meta.size - tail_len, meta.size)
        footer_len = codec.parse_tail(memoryview(tail)[-codec.TAIL_SIZE:], meta.size, where)
        if footer_len + codec.TAIL_SIZE > tail_len:
            tail = read_range(meta.size - footer_len - codec.TAIL_SIZE, meta.size)
        footer = codec.parse_footer(tail, meta.size, where)
        source = codec.SegmentReader(footer, read_range, where)
        stream = pa.ipc.open_stream(pa.PythonFile(source, mode="r"))
        return stream

    # -- conveniences built on the contract ---------------------------------------------
    def head(self, key: str) -> ObjectMeta:
        validate_key(key, backend=self.scheme, op="head")
        meta = self._retrying(lambda: self.adapter.head(key), idempotent=True)
        self._stats.count("head")
        return meta

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
            return True
        except NotFoundError:
            return False

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        self.delete_many([key])

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = [validate_key(k, backend=self.scheme, op="delete") for k in keys]
        if not keys:
            return
        self._retrying(lambda: self.adapter.delete_many(keys), idempotent=True)
        self._stats.count("delete", len(keys))

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (a plain string prefix), sorted."""
        return [m.key for m in self.list_meta(prefix)]

    def list_meta(self, prefix: str = "") -> builtins.list[ObjectMeta]:
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a str, not {type(prefix).__name__}")
        if not _could_start_a_key(prefix):
            return []  # ('../', '/etc', 'a//', NUL): never sent to a backend
        metas = self._retrying(lambda: self.adapter.list(prefix), idempotent=True)
        self._stats.count("list")
        return sorted(metas, key=lambda m: m.key)

    def put_bytes(self, key: str, data, *, mode: Union[str, PutMode] = "overwrite",
                  notify: Optional[builtins.list[tuple[str, bytes]]] = None) -> int:
        """Raw bytes (no Arrow framing); used for control records and by the communicator.
        ``notify``: (channel, message) pairs announced once the object is written (in the same
        round trip where the backend can: Redis); overwrite only."""
        validate_key(key, backend=self.scheme, op="put")
        mode = self._check_mode(_mode(mode), key)
        chunks = data if isinstance(data, (list, tuple)) else [data]
        if notify:
            if mode is not PutMode.OVERWRITE:
                raise ConfigError("put_bytes(notify=...) overwrites; create-if-absent cannot "
                                  "announce in the same request")
            pairs = [(validate_key(ch, backend=self.scheme, op="notify"), bytes(m))
                     for ch, m in notify]
            self._require_notify("notify", pairs[0][0])
            # Retried as a whole (idempotent: a receiver keeps announced keys in a set).
            written, _ = self._retrying(lambda: self.adapter.put_notify(key, chunks, pairs),
                                        idempotent=True)
            self._stats.count("put")
            self._stats.count("notify", len(pairs))
            self._stats.sent(written)
            return written
        written = self._retrying(lambda: self.adapter.put(key, chunks, mode),
                                 idempotent=mode is PutMode.OVERWRITE)
        self._stats.count("put")
        self._stats.sent(written)
        return written

    def get_bytes(self, key: str, byte_range: Optional[tuple[int, int]] = None):
        """Raw bytes, or the range ``[start, end)`` of them (clipped to the object's size); on a
        backend without native byte ranges the whole object is read and sliced here."""
        validate_key(key, backend=self.scheme, op="get")
        byte_range = _check_range(byte_range, self.scheme, key)
        native = byte_range is None or self.adapter.capabilities.byte_ranges
        buf = self._retrying(lambda: self.adapter.get(key, byte_range=byte_range if native else None),
                             idempotent=True)
        if not native:
            assert byte_range is not None  # native is True when there is no range
            start, end = byte_range
            whole = buf if isinstance(buf, pa.Buffer) else pa.py_buffer(buf)
            end = min(end, whole.size)
            start = min(start, end)
            buf = whole.slice(start, end - start)
        self._stats.count("get")
        self._stats.received(len(memoryview(buf)))
        return buf

    # -- optional abilities, by capability (validated, counted; retried where idempotent) ----
    def notify(self, channel: str, message: bytes = b"") -> None:
        """Leave ``message`` on ``channel`` for a ``wait`` (backends with ``notification``).
        Not retried: a second delivery would duplicate the message."""
        validate_key(channel, backend=self.scheme, op="notify")
        self._require_notify("notify", channel)
        self.adapter.notify(channel, bytes(message))
        self._stats.count("notify")

    def notify_many(self, messages: Iterable[tuple[str, bytes]]) -> builtins.list[bool]:
        """``notify`` of several ``(channel, message)`` pairs, in one round trip where the
        backend has them (Redis); for each, whether it was delivered (only a ``doorbell`` can
        tell that it was not: nobody listening on this machine).  Not retried, as ``notify``."""
        pairs = [(validate_key(ch, backend=self.scheme, op="notify"), bytes(m)) for ch, m in messages]
        if not pairs:
            return []
        self._require_notify("notify", pairs[0][0])
        delivered = self.adapter.notify_many(pairs)
        self._stats.count("notify", len(pairs))
        return delivered

    def wait(self, channel: str, timeout: float) -> builtins.list[bytes]:
        """Take every message on ``channel``, blocking up to ``timeout`` s for the first; ``[]``
        on timeout. Not retried: the messages taken by a failed attempt may be gone."""
        validate_key(channel, backend=self.scheme, op="wait")
        self._require_notify("wait", channel)
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise ConfigError(f"wait timeout must be a number of seconds >= 0, got {timeout!r}")
        got = self.adapter.wait(channel, float(timeout))
        self._stats.count("wait")
        return got

    def incr(self, key: str) -> int:
        """Add one to the atomic counter ``key`` (created at 0) and return the new value
        (backends with ``atomic_counter``). Not retried: it is not idempotent."""
        validate_key(key, backend=self.scheme, op="incr")
        self._require("atomic_counter", "incr", key)
        value = self.adapter.incr(key)
        self._stats.count("incr")
        return value

    def delete_counter(self, key: str) -> None:
        """Remove the counter ``key``; a missing one is not an error (retried: idempotent)."""
        validate_key(key, backend=self.scheme, op="delete_counter")
        self._require("atomic_counter", "delete_counter", key)
        self._retrying(lambda: self.adapter.delete_counter(key), idempotent=True)
        self._stats.count("delete")

    def sweep(self, prefix: str = "") -> int:
        """Remove what a crashed writer or rank left under ``prefix`` that ``list`` does not
        show (temporary files, orphaned chunks, open multipart uploads, notification channels,
        counters; see each backend).  For cleaning up after a crashed job: objects of a job
        still running under ``prefix`` could lose chunks being written."""
        if not _could_start_a_key(prefix) and prefix:
            return 0
        n = self._retrying(lambda: self.adapter.sweep(prefix), idempotent=True)
        self._stats.count("sweep")
        return n

    def _require_notify(self, op: str, key: str) -> None:
        caps = self.adapter.capabilities
        if not (caps.notification or caps.doorbell):
            self._require("notification", op, key)

    def _require(self, capability: str, op: str, key: str) -> None:
        if not getattr(self.adapter.capabilities, capability):
            raise NotSupportedError(f"this backend does not declare {capability}", backend=self.scheme,
                                    op=op, key=key)

    def stats(self) -> dict:
        """Requests by kind, bytes out/in and retries since the store was opened."""
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()


def _check_range(byte_range, scheme: str, key: str) -> Optional[tuple[int, int]]:
    """``(start, end)``: two non-negative ints, checked once here for every backend. As with a
    Python slice, an end past the object is clipped and an end before the start reads nothing
    (normalised here to ``(start, start)``)."""
    if byte_range is None:
        return None
    try:
        start, end = byte_range
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, end))
    except (TypeError, ValueError):
        ok = False
    if not ok or start < 0 or end < 0:
        raise ConfigError(f"byte_range must be (start, end), two integers >= 0, got "
                          f"{byte_range!r}", backend=scheme, op="get", key=key)
    return int(start), max(int(start), int(end))


def _mode(mode) -> PutMode:
    if isinstance(mode, PutMode):
        return mode
    try:
        return PutMode(mode)
    except ValueError:
        raise ConfigError(f"put mode must be 'overwrite' or 'create', got {mode!r}") from None


def open_store(url: Union[str, Store], **options) -> Store:
    """Open the store at ``url`` (``memory://``, ``file:///path``, ``s3://bucket/prefix``, ...).

    Options come from ``options``, the URL query and ``CYLON_STORE_*`` environment variables."""
    if isinstance(url, Store):
        if options:
            raise ConfigError("options cannot be applied to an already open Store")
        return url
    return Store(url, **options)
