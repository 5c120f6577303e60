"""Direct transports (``mpi://``, ``ucx://``): what the MPI and UCX communicators share.

Tables travel as Arrow IPC streams, never pickled.  A sender hands the stream to the transport
as the list of buffers pyarrow's writer produces — the table's own column buffers, by
reference, plus small metadata pieces — so sending costs no serialisation copy; a receiver
places the pieces back to back in one 64-byte aligned buffer and decodes it zero-copy.  Every
wait has a deadline and ends with an error naming the ranks that did not deliver; a failure
sticks (later calls re-raise it).  This module imports neither mpi4py nor ucxx.

Direct transports move data between live processes; they hold no data of their own, so
``put``/``get`` are not offered here: :class:`DirectTransportAdapter` makes
``open_store("mpi://")`` fail with a ``NotSupportedError`` that names the alternatives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from ..collective import Communicator, assemble, empty_like
from ..config import redact_url
from ..errors import ConfigError, ExchangeTimeoutError, NotSupportedError

#: Received streams start on this boundary, so Arrow buffers decode zero-copy and aligned.
ALIGN = 64
#: Writes smaller than this are coalesced (IPC metadata, padding) into one message piece.
COALESCE = 64 << 10
#: Largest piece handed to a transport in one message: below MPI's int32 count limit
#: (2**31 - 1 elements of MPI_BYTE), and a sensible unit for UCX's rendezvous protocol.
MAX_MESSAGE = 1 << 30


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class _PieceSink:
    """Write-only file for pyarrow's IPC writer: keeps large writes (column buffers) by
    reference and coalesces small ones, so the stream is a list of pieces, not one copy."""

    def __init__(self, max_piece: int):
        self.max_piece = max_piece
        self.pieces: list = []
        self._small = bytearray()
        self.position = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        self.position += n
        if n < COALESCE:
            self._small += view
            if len(self._small) >= COALESCE:
                self._flush_small()
        else:
            self._flush_small()
            # Keep the pyarrow Buffer itself: it owns the memory the transport will read.
            buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(view)
            for start in range(0, n, self.max_piece):
                self.pieces.append(buf.slice(start, min(self.max_piece, n - start)))
        return n

    def _flush_small(self):
        if self._small:
            self.pieces.append(pa.py_buffer(bytes(self._small)))
            self._small = bytearray()

    def flush(self):
        pass

    def close(self):
        self._flush_small()
        self.closed = True

    def writable(self):
        return True

    def tell(self):
        return self.position


def ipc_pieces(table: Optional[pa.Table], max_piece: int = MAX_MESSAGE) -> tuple[list[pa.Buffer], int]:
    """The Arrow IPC stream of ``table`` as a list of buffers (no copy of column data) and its
    length.  ``None`` (no schema at all) is the empty stream: no pieces, length 0."""
    if table is None:
        return [], 0
    sink = _PieceSink(max_piece)
    with pa.PythonFile(sink, mode="w") as f:
        writer = pa.ipc.new_stream(f, table.schema)
        writer.write_table(table)
        writer.close()
    sink.close()
    return sink.pieces, sink.position


def ipc_size(table: Optional[pa.Table]) -> int:
    """Length of the IPC stream of ``table`` without writing it."""
    if table is None:
        return 0
    mock = pa.MockOutputStream()
    writer = pa.ipc.new_stream(mock, table.schema)
    writer.write_table(table)
    writer.close()
    return mock.size()


def write_ipc_into(table: pa.Table, view: np.ndarray) -> None:
    """Serialise ``table`` into ``view`` (a writable uint8 array of exactly its IPC size)."""
    writer = pa.ipc.new_stream(pa.FixedSizeBufferWriter(pa.py_buffer(view)), table.schema)
    writer.write_table(table)
    writer.close()


def new_region(nbytes: int) -> tuple[pa.Buffer, np.ndarray]:
    """A 64-byte aligned buffer to receive into, and a writable uint8 view of it."""
    buf = pa.allocate_buffer(max(int(nbytes), 1), resizable=False)
    return buf, np.frombuffer(buf, np.uint8)[:nbytes]


def decode(buf: Optional[pa.Buffer], nbytes: int) -> Optional[pa.Table]:
    """Zero-copy decode of a received stream; length 0 means "no schema" (None)."""
    if nbytes == 0 or buf is None:
        return None
    with pa.ipc.open_stream(buf.slice(0, nbytes)) as reader:
        return reader.read_all()


def header_of(pieces: Sequence, nbytes: int) -> np.ndarray:
    """The first message of a table transfer: piece count, then each piece's length."""
    lens = [memoryview(p).nbytes for p in pieces]
    assert sum(lens) == nbytes
    return np.array([len(lens), *lens], dtype=np.int64)


class DirectCommunicator(Communicator):
    """Sequencing, sticky failures and argument checks shared by the MPI and UCX
    communicators; subclasses implement ``_exchange``, ``_allgather``, ``_gather``, ``_bcast``,
    ``_barrier`` (and may override ``allreduce``) and ``_shutdown``."""

    scheme = "direct"

    def __init__(self, *, job: str, rank: int, world_size: int, timeout: float):
        if timeout is None or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.job = job
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.timeout = float(timeout)
        self.stats = {"exchanges": 0, "rows_sent": 0, "rows_received": 0, "bytes_sent": 0,
                      "bytes_received": 0}

    # -- plumbing -----------------------------------------------------------------------
    def _timeout_error(self, what: str, seq: int, missing: Sequence[int], detail: str = ""):
        missing = sorted(set(int(m) for m in missing))
        who = (f"rank(s) {missing}" if missing else
               "the other ranks (the transport cannot tell which rank did not join)")
        return ExchangeTimeoutError(
            f"{what} {seq} of job {self.job!r}: rank {self.rank} timed out after {self.timeout:g}s "
            f"waiting for {who}{detail}", seq=seq, missing=missing, backend=self.scheme)

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    # -- collectives: the base class checks and sequences; tables travel as IPC streams ----
    def _exchange_impl(self, seq, schema, parts):
        me = self.rank
        # A None part still carries the schema when other parts have one.
        wire = [None if d == me else (parts[d] if parts[d] is not None else
                                      (empty_like(schema) if schema is not None else None))
                for d in range(self.world_size)]
        received = self._exchange(seq, wire)
        out = assemble("exchange", seq, me, self.world_size, schema, parts[me], received,
                       check=self._check_schemas)
        self.stats["exchanges"] += 1
        self.stats["rows_sent"] += sum(t.num_rows for d, t in enumerate(wire) if t is not None)
        self.stats["rows_received"] += sum(t.num_rows for s, t in enumerate(out) if s != me)
        return out

    def _allgather_impl(self, seq, table):
        return assemble("allgather", seq, self.rank, self.world_size,
                        table.schema if table is not None else None, table,
                        self._allgather(seq, table))

    def _gather_impl(self, seq, table, root):
        received = self._gather(seq, table, root)
        if self.rank != root:
            return None
        return assemble("gather", seq, self.rank, self.world_size,
                        table.schema if table is not None else None, table, received)

    def _bcast_impl(self, seq, table, root):
        return self._bcast(seq, table, root)

    def _barrier_impl(self, seq):
        self._barrier(seq)

    # -- to implement -------------------------------------------------------------------
    def _exchange(self, seq: int, wire: list) -> dict:
        """Send ``wire[d]`` (a Table or None) to every other rank d; return {src: Table|None}."""
        raise NotImplementedError

    def _allgather(self, seq: int, table: Optional[pa.Table]) -> dict:
        raise NotImplementedError

    def _gather(self, seq: int, table: Optional[pa.Table], root: int) -> dict:
        raise NotImplementedError

    def _bcast(self, seq: int, table: Optional[pa.Table], root: int) -> pa.Table:
        raise NotImplementedError

    def _barrier(self, seq: int) -> None:
        raise NotImplementedError

    def _shutdown(self, healthy: bool) -> None:
        raise NotImplementedError

    # -- shutdown: Communicator.close runs the final barrier, then _release ------------------
    def _release(self, healthy: bool) -> None:
        self._shutdown(healthy)


class _NoOptions:
    pass


class DirectTransportAdapter:
    """Base of the store-registry entries for ``mpi://`` and ``ucx://``: opening one as a store
    explains itself instead of reporting an unknown scheme.  ``Config`` is the transport's
    options class, so the registry also knows its ``CYLON_STORE_*`` variables."""

    Config: type = _NoOptions

    def __init__(self, url: str, *args, **kwargs):
        scheme = url.split("://", 1)[0]
        raise NotSupportedError(
            f"{scheme}:// is a direct transport between running ranks and stores nothing, so it "
            f"has no put/get: use cs.connect({redact_url(url)!r}, job=...) for exchange and collectives, and "
            f"a blob store (file:// on a shared filesystem, redis://, s3://, memory://) for "
            f"put/get", backend=scheme)
