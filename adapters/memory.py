"""``memory://[name]``: the reference backend, every capability, and the embedded default.

In one process, stores opened with the same name (or unpickled from one) share one dict guarded
by a lock, with blocking notification and an atomic counter.  With ``shared=true`` the objects
live in POSIX shared memory (``/dev/shm``, a tmpfs: RAM, not disk) through the file adapter's
atomic-rename protocol, so rank *processes* share one in-memory store; ``cs.launch`` does that
for ``memory://`` by itself.
"""

from __future__ import annotations

import builtins
import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import pyarrow as pa

from cylon_store.errors import AlreadyExistsError, ConfigError, NotFoundError, PreconditionError

from .base import BlobAdapter, BufferLike, Capabilities, ObjectMeta, PutMode, Stats
from .file import FileAdapter, FileConfig

if TYPE_CHECKING:
    from cylon_store.config import StoreOptions

#: Where ``shared=true`` stores live (tmpfs on Linux).
SHM_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else None


@dataclass(frozen=True)
class MemoryConfig:
    #: Keep objects in /dev/shm so that several processes share the store.
    shared: bool = False
    #: With ``shared``: wake the other processes through doorbells (see adapters/file.py).
    doorbell: bool = True


class _State:
    """One named in-process store."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.objects: dict[str, tuple[pa.Buffer, str]] = {}
        self.tokens: dict[str, list[bytes]] = {}
        self.counters: dict[str, int] = {}


_STATES: "weakref.WeakValueDictionary[str, _State]" = weakref.WeakValueDictionary()
_STATES_LOCK = threading.Lock()


def _state(name: str) -> _State:
    with _STATES_LOCK:
        st = _STATES.get(name)
        if st is None:
            st = _State()
            _STATES[name] = st
        return st


def memory_name(location: str) -> str:
    return location.split("://", 1)[1].strip("/")


def shm_path(name: str) -> str:
    if SHM_ROOT is None:
        raise ConfigError("shared memory stores need /dev/shm (Linux)", backend="memory")
    return os.path.join(SHM_ROOT, "cylon-store", name)


class MemoryAdapter(BlobAdapter):
    scheme = "memory"
    Config = MemoryConfig
    capabilities = Capabilities(conditional_create=True, byte_ranges=True, max_object_size=None,
                                notification=True, atomic_counter=True, streaming_put=False)

    def __init__(self, location: str, config: MemoryConfig, stats: Stats, *,
                 name: Optional[str] = None, options: Optional[StoreOptions] = None) -> None:
        super().__init__(location, config, stats, options)
        self.name = name or memory_name(location)
        if not self.name:
            raise ConfigError("an anonymous memory store has no name yet", backend="memory")
        for ch in self.name:
            if not (ch.isalnum() or ch in "-_."):
                raise ConfigError(f"memory store name {self.name!r} may only hold letters, digits, "
                                  f"'-', '_' and '.'", backend="memory")
        self._shared: Optional[FileAdapter] = None
        if config.shared:
            self._shared = FileAdapter(location, FileConfig(fsync=False, doorbell=config.doorbell), stats,
                                       root=shm_path(self.name), backend="memory")
            self.capabilities = Capabilities(conditional_create=True, byte_ranges=True,
                                             notification=False, streaming_put=True,
                                             doorbell=self._shared.capabilities.doorbell)
            self._state: Optional[_State] = None
        else:
            self._state = _state(self.name)

    def _local(self) -> _State:
        """The in-process state (every caller has returned already if the store is shared)."""
        st = self._state
        assert st is not None, "a shared memory store keeps no in-process state"
        return st

    def close(self) -> None:
        if self._shared:
            self._shared.close()

    def describe(self) -> str:
        return f"memory://{self.name}" + ("?shared=true" if self._shared else "")

    # -- contract -----------------------------------------------------------------------
    def put(self, key: str, chunks: Iterable[BufferLike], mode: PutMode = PutMode.OVERWRITE) -> int:
        if self._shared:
            return self._shared.put(key, chunks, mode)
        # One copy into an immutable buffer: callers may reuse their chunks afterwards.
        parts = [memoryview(c).cast("B") for c in chunks]
        total = sum(p.nbytes for p in parts)
        buf = pa.allocate_buffer(total)
        view = memoryview(buf).cast("B")
        pos = 0
        for p in parts:
            view[pos:pos + p.nbytes] = p
            pos += p.nbytes
        version = uuid.uuid4().hex
        st = self._local()
        with st.lock:
            if mode is PutMode.CREATE and key in st.objects:
                raise AlreadyExistsError("key already exists (create-if-absent)", backend="memory",
                                         op="put", key=key)
            st.objects[key] = (buf, version)
        return total

    def get(self, key: str, byte_range: Optional[tuple[int, int]] = None,
            if_version: Optional[str] = None) -> BufferLike:
        if self._shared:
            return self._shared.get(key, byte_range, if_version)
        st = self._local()
        with st.lock:
            item = st.objects.get(key)
        if item is None:
            raise NotFoundError("no such key", backend="memory", op="get", key=key)
        buf, version = item
        if if_version is not None and version != if_version:
            raise PreconditionError("object changed since it was first read", backend="memory",
                                    op="get", key=key)
        if byte_range is None:
            return buf
        start, end = byte_range
        end = min(end, buf.size)
        start = min(start, end)
        return buf.slice(start, end - start)

    def head(self, key: str) -> ObjectMeta:
        if self._shared:
            return self._shared.head(key)
        st = self._local()
        with st.lock:
            item = st.objects.get(key)
        if item is None:
            raise NotFoundError("no such key", backend="memory", op="head", key=key)
        return ObjectMeta(key, item[0].size, item[1])

    def delete_many(self, keys: Sequence[str]) -> None:
        if self._shared:
            return self._shared.delete_many(keys)
        st = self._local()
        with st.lock:
            for key in keys:
                st.objects.pop(key, None)

    def list(self, prefix: str) -> builtins.list[ObjectMeta]:
        if self._shared:
            return self._shared.list(prefix)
        st = self._local()
        with st.lock:
            items = [(k, v) for k, v in st.objects.items() if k.startswith(prefix)]
        return [ObjectMeta(k, b.size, ver) for k, (b, ver) in items]

    def sweep(self, prefix: str) -> int:
        return self._shared.sweep(prefix) if self._shared else 0

    # -- notification and counter -------------------------------------------------------
    def notify(self, channel: str, message: bytes = b"") -> Optional[bool]:
        if self._shared:
            return self._shared.notify(channel, message)
        st = self._local()
        with st.lock:
            st.tokens.setdefault(channel, []).append(bytes(message))
            st.lock.notify_all()
        return True

    def wait(self, channel: str, timeout: float) -> builtins.list[bytes]:
        if self._shared:
            return self._shared.wait(channel, timeout)
        st = self._local()
        with st.lock:
            if not st.tokens.get(channel):
                st.lock.wait_for(lambda: bool(st.tokens.get(channel)), timeout=max(0.0, timeout))
            return st.tokens.pop(channel, [])

    def incr(self, key: str) -> int:
        if self._shared:
            return super().incr(key)
        st = self._local()
        with st.lock:
            st.counters[key] = st.counters.get(key, 0) + 1
            return st.counters[key]

    def delete_counter(self, key: str) -> None:
        if self._shared:
            return super().delete_counter(key)
        st = self._local()
        with st.lock:
            st.counters.pop(key, None)
