"""The byte-level contract every blob backend implements in full.

Five operations (put, get, head, delete_many, list) plus capabilities declared as data.  The
facade (``cylon_store.store``) builds everything convenient on top, once: Arrow encoding,
checksums, retries, exists/delete-one, streaming reads.  Optional abilities (blocking
notification, an atomic counter) are methods guarded by a capability flag; calling one the
backend does not declare raises ``NotSupportedError``.

Semantics every adapter guarantees:

==================  ============================================================================
put                 atomic: a reader sees the old object, the new one, or nothing; never a mix.
                    ``PutMode.CREATE`` fails with ``AlreadyExistsError`` if the key exists, and
                    of concurrent creators exactly one wins.  An exception from the payload
                    iterator aborts the put: nothing becomes visible, nothing is left behind.
get                 the whole object or a byte range ``[start, end)``; ``if_version`` makes the
                    read fail with ``PreconditionError`` if the object changed since ``head``.
head                size and an opaque version string; ``NotFoundError`` if absent.
delete_many         missing keys are not an error (idempotent).
list                every key starting with ``prefix`` (plain string prefix), order unspecified.
==================  ============================================================================
"""

from __future__ import annotations

import abc
import builtins
import enum
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Literal, Optional, Sequence, Union

from cylon_store.errors import NotSupportedError

if TYPE_CHECKING:
    import pyarrow

    from cylon_store.config import StoreOptions

#: What ``put`` accepts as one chunk of payload: anything with the buffer protocol.
BufferLike = Union[bytes, bytearray, memoryview, "pyarrow.Buffer"]


class PutMode(enum.Enum):
    """Conditional writes as a mode, not a separate method."""

    OVERWRITE = "overwrite"
    CREATE = "create"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, as data the facade and the communicator read.

    Defaults are the conservative ones: an adapter that does not declare an ability is not
    assumed to have it (a forgotten ``conditional_create`` must not make a racy overwrite pass
    for an atomic create).
    """

    #: ``PutMode.CREATE`` is atomic (exactly one concurrent creator wins).
    conditional_create: bool = False
    #: ``get(key, byte_range=...)`` reads only the range (otherwise the facade reads it all).
    byte_ranges: bool = False
    #: Largest object one put may write, in bytes (None: no limit but memory/disk).
    max_object_size: Optional[int] = None
    #: ``notify``/``wait`` implemented: waiters block instead of polling.
    notification: bool = False
    #: ``notify``/``wait`` implemented between the processes of one machine, but a message may
    #: be lost (its receiver not listening yet, or on another host of a shared filesystem):
    #: waiters still poll, and a message only ends a poll's sleep early (and may carry a copy of
    #: small data, sparing the read).  A backend declares ``notification`` or this, not both.
    doorbell: bool = False
    #: ``incr`` implemented: an atomic counter (rendezvous by increment).
    atomic_counter: bool = False
    #: The payload iterator is consumed incrementally (memory bounded by one chunk).
    streaming_put: bool = False
    #: How the backend bills use: ``"none"`` (provisioned, or free), ``"requests"`` (every
    #: request at a flat price, like S3: the exchange picks the strategy with the fewest
    #: requests and polls less often) or ``"units"`` (by the size each request moves, like
    #: DynamoDB's capacity units: fewer requests, but never a strategy that moves bytes twice).
    billing: Literal["none", "requests", "units"] = "none"

    def __post_init__(self) -> None:
        if self.billing not in ("none", "requests", "units"):
            raise ValueError(f"Capabilities.billing must be 'none', 'requests' or 'units', "
                             f"got {self.billing!r}")

    @property
    def request_priced(self) -> bool:
        return self.billing != "none"


@dataclass(frozen=True)
class ObjectMeta:
    key: str
    size: int
    #: Opaque; changes whenever the object is replaced.
    version: str = ""


class Stats:
    """Thread-safe request and byte counters; ``snapshot()`` is what ``store.stats()`` returns.

    The facade counts logical operations; adapters add backend requests (e.g. multipart parts,
    write units) under their own names with ``count``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        # Amounts may be fractional (e.g. capacity units); int-valued until a float is added,
        # as a Counter was.
        self._extra: defaultdict[str, float] = defaultdict(int)
        self.bytes_out = 0   # written to the backend
        self.bytes_in = 0    # read from the backend

    def count(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._requests[kind] += n

    def add(self, name: str, amount: float) -> None:
        with self._lock:
            self._extra[name] += amount

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_out += nbytes

    def received(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_in += nbytes

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            # Adapters that count their backend's own requests name them "<scheme>.<KIND>";
            # where they do, those are the billable total, not the facade's logical operations.
            backend = [n for k, n in self._requests.items()
                       if "." in k and k.split(".", 1)[1][:1].isupper()]
            logical = [n for k, n in self._requests.items() if "." not in k and k != "retries"]
            return {
                "requests": dict(self._requests),
                "requests_total": sum(backend) if backend else sum(logical),
                "bytes_out": self.bytes_out,
                "bytes_in": self.bytes_in,
                **{k: v for k, v in self._extra.items()},
            }

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._extra.clear()
            self.bytes_out = self.bytes_in = 0


class BlobAdapter(abc.ABC):
    """Base of blob adapters: subclasses set ``scheme``, ``Config``, ``capabilities`` and
    implement the five operations.  Constructed by the facade with the URL location, the
    adapter's frozen config, the store's ``Stats`` and (keyword ``options``) its ``StoreOptions``; must not do network I/O in ``__init__``
    beyond what it needs to fail fast on a bad configuration.
    """

    scheme: ClassVar[str] = ""
    #: Frozen dataclass of this backend's own options (beyond ``StoreOptions``).
    Config: ClassVar[type]
    capabilities: Capabilities = Capabilities()

    def __init__(self, location: str, config: Any, stats: Stats,
                 options: Optional[StoreOptions] = None) -> None:
        self.location = location
        self.config = config
        self.stats = stats
        #: The store's ``StoreOptions`` (retries, concurrency) for adapters that retry or fan
        #: out internally (multipart parts, batch writes).
        self.options = options

    # -- the contract -------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, key: str, chunks: Iterable[BufferLike], mode: PutMode = PutMode.OVERWRITE) -> int:
        """Write the concatenation of ``chunks`` under ``key``; return the bytes written."""
        raise NotImplementedError

    @abc.abstractmethod
    def get(self, key: str, byte_range: Optional[tuple[int, int]] = None,
            if_version: Optional[str] = None) -> BufferLike:
        raise NotImplementedError

    @abc.abstractmethod
    def head(self, key: str) -> ObjectMeta:
        raise NotImplementedError

    @abc.abstractmethod
    def delete_many(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def list(self, prefix: str) -> builtins.list[ObjectMeta]:
        raise NotImplementedError

    def close(self) -> None:
        """Release clients and pools. Idempotent."""

    # -- optional, by capability --------------------------------------------------------
    def notify(self, channel: str, message: bytes = b"") -> Optional[bool]:
        """Leave ``message`` on ``channel`` (messages persist until a ``wait`` takes them; the
        communicator sends the key of what it just wrote, so receivers need not LIST).  A
        doorbell returns False when the message was not delivered (nobody listening)."""
        raise NotSupportedError("blocking notification is not available; waiters poll",
                                backend=self.scheme, op="notify")

    def put_notify(self, key: str, chunks: Iterable[BufferLike],
                   messages: Sequence[tuple[str, bytes]]) -> tuple[int, builtins.list[bool]]:
        """``put`` (overwrite) then ``notify_many``; backends with round trips may send both in
        one.  Returns the bytes written and the notifications' delivery."""
        written = self.put(key, chunks, PutMode.OVERWRITE)
        return written, self.notify_many(messages)

    def notify_many(self, messages: Sequence[tuple[str, bytes]]) -> builtins.list[bool]:
        """``notify`` of several (channel, message) pairs (backends with round trips send them
        in one); for each, whether it was delivered (a doorbell can tell it was not)."""
        return [self.notify(channel, message) is not False for channel, message in messages]

    def wait(self, channel: str, timeout: float) -> builtins.list[bytes]:
        """Take every message on ``channel`` (bytes, in the order left), blocking up to
        ``timeout`` s for the first; ``[]`` on timeout."""
        raise NotSupportedError("blocking notification is not available; waiters poll",
                                backend=self.scheme, op="wait")

    def incr(self, key: str) -> int:
        """Atomically add one to the counter ``key`` (created at 0) and return the new value."""
        raise NotSupportedError("no atomic counter; use the store rendezvous (create-if-absent)",
                                backend=self.scheme, op="incr", key=key)

    def delete_counter(self, key: str) -> None:
        raise NotSupportedError("no atomic counter", backend=self.scheme, op="delete_counter",
                                key=key)

    def sweep(self, prefix: str) -> int:
        """Remove what ``list`` cannot see under ``prefix`` and a crashed writer or rank may
        have left: temporary files, chunks no commit names, open multipart uploads,
        notification channels, counters.  Returns how many things went.  Called by
        ``cylon-store clean`` (run it when no job under ``prefix`` is running); the default
        has nothing to remove."""
        return 0

    def describe(self) -> str:
        return f"{self.scheme}://{self.location.split('://', 1)[-1]}"
