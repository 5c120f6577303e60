"""``file:///path``: any POSIX directory — a local disk, tmpfs, NFS or Amazon EFS.

Guarantees: a put becomes visible atomically (write a temporary file in the store's own
``.cylon-tmp`` directory, optionally fsync, then ``rename``); create-if-absent is atomic through
``link(2)``, which fails with EEXIST when the name exists and is atomic on local filesystems, NFSv3
and NFSv4.1 (EFS); readers open one inode, so they never see a torn object.  Errors map by errno.

Doorbells (``doorbell``, on by default on Linux): ``notify``/``wait`` through Unix datagram
sockets in the abstract namespace, named after the store's root and the channel, so the rank
processes of one machine wake each other instead of sleeping between polls.  They are hints: a
message to a channel nobody listens on yet, or to a process on another host of an NFS/EFS
mount, is dropped, and waiters poll anyway (``Capabilities.doorbell``).
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import hashlib
import os
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence
from urllib.parse import quote

import pyarrow as pa

from cylon_store.errors import (AlreadyExistsError, ConfigError, InvalidKeyError, NotFoundError,
                                PayloadTooLargeError, PermissionDeniedError, PreconditionError,
                                StoreError, TransientError)

from .base import BlobAdapter, BufferLike, Capabilities, ObjectMeta, PutMode, Stats

if TYPE_CHECKING:
    from cylon_store.config import StoreOptions

#: Reserved top-level directory for in-flight temporary files (same filesystem as the data, so
#: rename is atomic).  Keys may not start with it.
TMP_DIR = ".cylon-tmp"
#: POSIX NAME_MAX on ext4, xfs, NFS and EFS.
NAME_MAX = 255
#: Characters of the quoted key in a temporary file's name (+ "." + 32 hex digits <= NAME_MAX).
_TMP_KEY_CHARS = 200

_TRANSIENT = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ESTALE, errno.ETIMEDOUT, errno.EBUSY}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
#: Abstract-namespace Unix sockets are Linux's.
DOORBELLS = sys.platform.startswith("linux")
#: Largest doorbell message (one datagram; a longer one is sent empty: a bare wake-up).
DOORBELL_MAX = 60 * 1024


def map_os_error(exc: OSError, *, op: str, key: Optional[str], backend: str = "file") -> StoreError:
    """Translate an OSError into the project's hierarchy by errno, keeping the text of the cause."""
    code = exc.errno
    detail = exc.strerror or str(exc)
    if code in (errno.ENOENT, errno.ENOTDIR) or (code == errno.EISDIR and op != "put"):
        return NotFoundError("no such key", backend=backend, op=op, key=key)
    if code in (errno.EISDIR, errno.ENOTDIR):
        return InvalidKeyError("key collides with a prefix of other keys (a filesystem cannot hold "
                               "both 'a' and 'a/b')", backend=backend, op=op, key=key)
    if code == errno.EEXIST:
        return AlreadyExistsError("key already exists", backend=backend, op=op, key=key)
    if code in _DENIED:
        return PermissionDeniedError(f"permission denied ({detail})", backend=backend, op=op, key=key)
    if code in _NO_SPACE:
        return PayloadTooLargeError(f"no space for the object ({detail})", backend=backend, op=op, key=key)
    if code == errno.ENAMETOOLONG:
        return InvalidKeyError(f"key too long for this filesystem ({detail})", backend=backend, op=op, key=key)
    if code in _TRANSIENT:
        return TransientError(f"transient I/O error ({detail})", backend=backend, op=op, key=key)
    return StoreError(f"I/O error ({detail})", backend=backend, op=op, key=key)


@dataclass(frozen=True)
class FileConfig:
    #: fsync each object before it is renamed into place (durability across a crash of the
    #: host; visibility is atomic either way).
    fsync: bool = True
    #: Create the root directory if it does not exist.
    mkdir: bool = True
    #: Wake waiters of this machine through Unix datagram sockets (see the module docstring).
    doorbell: bool = True


class FileAdapter(BlobAdapter):
    scheme = "file"
    Config = FileConfig
    capabilities = Capabilities(conditional_create=True, byte_ranges=True, max_object_size=None,
                                notification=False, streaming_put=True, doorbell=DOORBELLS)

    def __init__(self, location: str, config: FileConfig, stats: Stats, *,
                 root: Optional[str] = None, backend: str = "file",
                 options: Optional[StoreOptions] = None) -> None:
        super().__init__(location, config, stats, options)
        self.backend = backend
        if root is None:
            path = location.split("://", 1)[1]
            if not path.startswith("/"):
                raise ConfigError(f"file URL needs an absolute path (file:///mnt/efs/x), got {location!r}")
            root = path
        self.root = os.path.abspath(root)
        if config.mkdir:
            os.makedirs(self.root, exist_ok=True)
        elif not os.path.isdir(self.root):
            raise ConfigError(f"store root {self.root!r} is not a directory (mkdir=false)")
        self.tmp = os.path.join(self.root, TMP_DIR)
        os.makedirs(self.tmp, exist_ok=True)
        self._bells: dict[str, Optional[socket.socket]] = {}
        self._bell_out: Optional[socket.socket] = None
        self._bell_lock = threading.Lock()
        if not config.doorbell and self.capabilities.doorbell:
            self.capabilities = dataclasses.replace(self.capabilities, doorbell=False)

    # -- doorbells ---------------------------------------------------------------------
    def _bell_address(self, channel: str) -> bytes:
        digest = hashlib.blake2b(f"{self.root}\0{channel}".encode(), digest_size=20).hexdigest()
        return b"\0cylon-store-" + digest.encode()

    def notify(self, channel: str, message: bytes = b"") -> Optional[bool]:
        """False when the doorbell was not delivered (nobody listens on this machine, or its
        queue is full); True when it is in the receiver's queue."""
        if not self.capabilities.doorbell:
            return super().notify(channel, message)
        with self._bell_lock:
            out = self._bell_out
            if out is None:
                out = self._bell_out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                out.setblocking(False)
        if len(message) > DOORBELL_MAX:
            return False
        try:
            out.sendto(message, self._bell_address(channel))
        except OSError:
            return False   # nobody listening (yet), or its queue is full: the receiver polls
        return True

    def wait(self, channel: str, timeout: float) -> builtins.list[bytes]:
        if not self.capabilities.doorbell:
            return super().wait(channel, timeout)
        with self._bell_lock:
            if channel not in self._bells:
                sock: Optional[socket.socket] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    sock.bind(self._bell_address(channel))   # type: ignore[union-attr]
                    sock.setblocking(False)                   # type: ignore[union-attr]
                except OSError:   # another waiter of this channel on the machine: sleep instead
                    sock.close()                              # type: ignore[union-attr]
                    sock = None
                self._bells[channel] = sock
            sock = self._bells[channel]
        if sock is None:
            if timeout > 0:
                time.sleep(timeout)
            return []
        if timeout > 0:
            # poll, not select: a long-lived process may hold descriptors above FD_SETSIZE.
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.poll(timeout * 1000)
        got = []
        while True:
            try:
                got.append(sock.recv(DOORBELL_MAX + 1))
            except (BlockingIOError, InterruptedError):
                return got

    def close(self) -> None:
        with self._bell_lock:
            socks = [s for s in self._bells.values() if s is not None]
            if self._bell_out is not None:
                socks.append(self._bell_out)
            self._bells, self._bell_out = {}, None
        for s in socks:
            s.close()

    def describe(self) -> str:
        return f"{self.backend}://{self.root}"

    # -- helpers -----------------------------------------------------------------------
    def _path(self, key: str) -> str:
        for part in key.split("/"):
            if len(part.encode()) > NAME_MAX:
                raise InvalidKeyError(f"a key segment is longer than {NAME_MAX} bytes", backend=self.backend, key=key)
        if key == TMP_DIR or key.startswith(TMP_DIR + "/"):
            raise InvalidKeyError(f"keys may not start with the reserved {TMP_DIR!r}", backend=self.backend, key=key)
        return os.path.join(self.root, key)

    def _err(self, exc: OSError, op: str, key: Optional[str]) -> StoreError:
        return map_os_error(exc, op=op, key=key, backend=self.backend)

    def sweep(self, prefix: str) -> int:
        """Temporary files of writers that died before their rename, for keys under
        ``prefix`` (run it when no job under ``prefix`` is running)."""
        q = quote(prefix, safe="")[:_TMP_KEY_CHARS]
        removed = 0
        try:
            names = os.listdir(self.tmp)
        except FileNotFoundError:
            return 0
        for name in names:
            if name.startswith(q):
                _unlink_quiet(os.path.join(self.tmp, name))
                removed += 1
        return removed

    # -- contract -----------------------------------------------------------------------
    def put(self, key: str, chunks: Iterable[BufferLike], mode: PutMode = PutMode.OVERWRITE) -> int:
        path = self._path(key)
        # Named after the key (quoted, cut to fit a file name) so that `cylon-store clean` can
        # find a killed writer's temporary file by the key prefix of its job (``sweep``).
        tmp = os.path.join(self.tmp, f"{quote(key, safe='')[:_TMP_KEY_CHARS]}.{uuid.uuid4().hex}")
        written = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise self._err(exc, "put", key) from exc
        try:
            try:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        written += n
                if self.config.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, path, key, mode)
        except StoreError:  # already ours (AlreadyExistsError is also an OSError)
            _unlink_quiet(tmp)
            raise
        except OSError as exc:
            _unlink_quiet(tmp)
            raise self._err(exc, "put", key) from exc
        except BaseException:
            _unlink_quiet(tmp)
            raise
        return written

    def _publish(self, tmp: str, path: str, key: str, mode: PutMode) -> None:
        parent = os.path.dirname(path)
        for _ in range(100):  # a concurrent delete may remove an emptied parent in between
            try:
                os.makedirs(parent, exist_ok=True)
            except FileNotFoundError:
                continue  # an ancestor was removed by a concurrent delete while we created it
            except (FileExistsError, NotADirectoryError) as exc:
                raise InvalidKeyError("a prefix of this key is itself a key (a filesystem cannot "
                                      "hold both 'a' and 'a/b')", backend=self.backend, op="put",
                                      key=key) from exc
            try:
                if mode is PutMode.CREATE:
                    try:
                        os.link(tmp, path)
                    except FileExistsError as exc:
                        raise AlreadyExistsError("key already exists (create-if-absent)",
                                                 backend=self.backend, op="put", key=key) from exc
                    _unlink_quiet(tmp)
                else:
                    os.replace(tmp, path)
                return
            except FileNotFoundError:
                if not os.path.exists(tmp):
                    raise
                continue
        raise TransientError("parent directory kept disappearing", backend=self.backend, op="put", key=key)

    def get(self, key: str, byte_range: Optional[tuple[int, int]] = None,
            if_version: Optional[str] = None) -> BufferLike:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                if if_version is not None and _version(st) != if_version:
                    raise PreconditionError("object changed since it was first read",
                                            backend=self.backend, op="get", key=key)
                start, end = 0, st.st_size
                if byte_range is not None:
                    start, end = byte_range
                    end = min(end, st.st_size)
                    start = min(start, end)
                n = end - start
                buf = pa.allocate_buffer(n)
                view = memoryview(buf).cast("B")
                got = 0
                while got < n:
                    r = os.preadv(f.fileno(), [view[got:]], start + got)
                    if r == 0:
                        raise TransientError("object shrank while being read", backend=self.backend,
                                             op="get", key=key)
                    got += r
                return buf
        except StoreError:
            raise
        except OSError as exc:
            raise self._err(exc, "get", key) from exc

    def head(self, key: str) -> ObjectMeta:
        try:
            st = os.stat(self._path(key))
        except OSError as exc:
            raise self._err(exc, "head", key) from exc
        if not _is_file(st):
            raise NotFoundError("no such key (a prefix of other keys)", backend=self.backend, op="head", key=key)
        return ObjectMeta(key, st.st_size, _version(st))

    def delete_many(self, keys: Sequence[str]) -> None:
        parents: set[str] = set()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue  # missing: a parent is a key ("a" for "a/b") or it is only a prefix
            except OSError as exc:
                raise self._err(exc, "delete", key) from exc
            parents.add(os.path.dirname(path))
        # Remove directories the deletes emptied, deepest first, so nothing is left behind.
        for parent in sorted(parents, key=len, reverse=True):
            while parent != self.root and parent.startswith(self.root + os.sep):
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = os.path.dirname(parent)

    def list(self, prefix: str) -> builtins.list[ObjectMeta]:
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        # The prefix's complete segments name the directory to walk.  If no valid key can have
        # them ('', '.', '..', NUL, the temp area), nothing matches, and the walk must not
        # leave the root ('../', '/etc/').
        if base and (base == TMP_DIR or base.startswith(TMP_DIR + "/") or
                     any(seg in ("", ".", "..") or "\0" in seg for seg in base.split("/"))):
            return []
        start = os.path.join(self.root, base) if base else self.root
        out: list[ObjectMeta] = []
        stack = [(start, base)]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = os.scandir(directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise self._err(exc, "list", prefix) from exc
            with entries:
                for entry in entries:
                    key = f"{rel}/{entry.name}" if rel else entry.name
                    if not rel and entry.name == TMP_DIR:
                        continue
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if is_dir:
                        if key.startswith(prefix) or prefix.startswith(key + "/"):
                            stack.append((entry.path, key))
                    elif key.startswith(prefix):
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        out.append(ObjectMeta(key, st.st_size, _version(st)))
        return out


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _is_file(st: os.stat_result) -> bool:
    import stat as _stat
    return _stat.S_ISREG(st.st_mode)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
