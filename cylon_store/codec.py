"""Arrow tables <-> stored bytes: an Arrow IPC stream followed by a checksummed footer.

Layout of one object::

    [Arrow IPC stream][msgpack footer][u64 footer length][u64 xxh3 of footer][8-byte magic]

The IPC stream starts at offset 0, so a whole-object read decodes zero-copy with 64-byte
alignment intact.  The footer holds one xxh3-64 per ``segment_size`` bytes of the stream: a
whole read verifies them all before decoding, a streaming read verifies each segment before
feeding it to the decoder.  Encoding hands the table's own buffers to the backend (pyarrow passes
body buffers to a Python sink without copying), so a put costs one copy: the backend's own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Union

import msgpack
import pyarrow as pa
import xxhash

from .errors import ConfigError, IntegrityError

if TYPE_CHECKING:
    from .adapters.base import BufferLike

MAGIC = b"CYLSTOR1"
_TAIL = struct.Struct("<QQ8s")
TAIL_SIZE = _TAIL.size
FORMAT_VERSION = 1
#: Small writes (IPC metadata, padding) are coalesced into chunks of about this size.
_COALESCE = 64 << 10


@dataclass(frozen=True)
class Footer:
    ipc_len: int
    segment_size: int
    hashes: tuple
    rows: int
    batches: int
    compression: Optional[str]

    @property
    def total_len(self) -> int:
        return self.ipc_len + self._packed_len + TAIL_SIZE

    _packed_len: int = 0


def _as_reader(data) -> pa.RecordBatchReader:
    """Normalise what ``Store.put`` accepts into one RecordBatchReader (schema known up front)."""
    if isinstance(data, pa.Table):
        return pa.RecordBatchReader.from_batches(data.schema, data.to_batches())
    if isinstance(data, pa.RecordBatch):
        return pa.RecordBatchReader.from_batches(data.schema, [data])
    if isinstance(data, pa.RecordBatchReader):
        return data
    if hasattr(data, "__arrow_c_stream__") and not isinstance(data, (list, tuple)):
        return pa.RecordBatchReader.from_stream(data)
    if isinstance(data, (str, bytes, bytearray, memoryview, dict)) or not hasattr(data, "__iter__"):
        raise ConfigError(f"cannot store a {type(data).__name__}: pass a pyarrow Table, RecordBatch, "
                          f"RecordBatchReader or an iterable of RecordBatches")
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        raise ConfigError("cannot store an empty iterable of batches: its schema is unknown "
                          "(pass an empty pa.Table or a RecordBatchReader instead)") from None
    if isinstance(first, pa.Table):
        first_batches = first.to_batches()
        schema = first.schema
    elif isinstance(first, pa.RecordBatch):
        first_batches = [first]
        schema = first.schema
    else:
        raise ConfigError(f"an iterable passed to put must yield RecordBatches, got {type(first).__name__}")

    def batches():
        yield from first_batches
        for i, b in enumerate(it, start=1):
            items = b.to_batches() if isinstance(b, pa.Table) else [b]
            for item in items:
                if not isinstance(item, pa.RecordBatch):
                    raise ConfigError(f"item {i} of the batches passed to put is a "
                                      f"{type(item).__name__}, not a RecordBatch")
                if not item.schema.equals(schema):
                    raise ConfigError(f"batch {i} has a different schema than the first batch:\n"
                                      f"first: {schema}\nbatch {i}: {item.schema}")
                yield item
    return pa.RecordBatchReader.from_batches(schema, batches())


class _SegmentSink:
    """A write-only file object for pyarrow's IPC writer: keeps chunk references (no copy for
    body buffers), coalesces small writes, and hashes the stream segment by segment."""

    def __init__(self, segment_size: int):
        self.segment_size = segment_size
        self.ready: list = []            # chunks waiting to be handed to the backend
        self._small = bytearray()
        self.hashes: list[int] = []
        self._hasher = xxhash.xxh3_64()
        self._seg_fill = 0
        self.position = 0
        self.closed = False

    # file protocol used by pa.PythonFile
    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        self._hash(view)
        self.position += n
        if n < _COALESCE:
            self._small += view
            if len(self._small) >= _COALESCE:
                self._flush_small()
        else:
            self._flush_small()
            self.ready.append(data)
        return n

    def _hash(self, view: memoryview) -> None:
        while view.nbytes:
            room = self.segment_size - self._seg_fill
            part = view[:room]
            self._hasher.update(part)
            self._seg_fill += part.nbytes
            view = view[part.nbytes:]
            if self._seg_fill == self.segment_size:
                self.hashes.append(self._hasher.intdigest())
                self._hasher.reset()
                self._seg_fill = 0

    def _flush_small(self):
        if self._small:
            self.ready.append(bytes(self._small))
            self._small = bytearray()

    def drain(self) -> list:
        self._flush_small()
        out, self.ready = self.ready, []
        return out

    def finish_hashes(self) -> list[int]:
        if self._seg_fill:
            self.hashes.append(self._hasher.intdigest())
            self._hasher.reset()
            self._seg_fill = 0
        return self.hashes

    def flush(self):
        pass

    def close(self):
        self.closed = True

    def writable(self):
        return True

    def tell(self):
        return self.position


def encode(data, *, compression: Optional[str] = None, segment_size: int = 8 << 20,
           stats: Optional[dict] = None) -> Iterator:
    """Yield the chunks of one stored object for ``data`` (see ``Store.put`` for what it takes).

    A generator: chunks come out batch by batch, so a RecordBatchReader is encoded with memory
    bounded by one batch.  ``stats`` (a dict) receives ``rows``, ``batches`` and ``bytes``.
    """
    if (compression is None and isinstance(data, (pa.Table, pa.RecordBatch))
            and data.nbytes <= _SMALL_TABLE <= segment_size):
        yield from _encode_small(data, segment_size, stats)
        return
    reader = _as_reader(data)
    sink = _SegmentSink(segment_size)
    options = pa.ipc.IpcWriteOptions(compression=compression) if compression else None
    rows = batches = 0
    with pa.PythonFile(sink, mode="w") as f:
        writer = pa.ipc.new_stream(f, reader.schema, options=options)
        try:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
                batches += 1
                yield from sink.drain()
        finally:
            writer.close()
    ipc_len = sink.position
    footer = msgpack.packb({"v": FORMAT_VERSION, "ipc": ipc_len, "seg": segment_size,
                            "h": sink.finish_hashes(), "rows": rows, "batches": batches,
                            "comp": compression})
    tail = _TAIL.pack(len(footer), xxhash.xxh3_64_intdigest(footer), MAGIC)
    for chunk in sink.drain():
        yield chunk
    yield footer + tail
    if stats is not None:
        stats.update(rows=rows, batches=batches, bytes=ipc_len + len(footer) + TAIL_SIZE)


#: Tables up to this many bytes are encoded in one piece by Arrow's own sink (the collectives'
#: tiny messages: no Python callback per IPC write).
_SMALL_TABLE = 64 << 10


def _encode_small(data, segment_size: int, stats: Optional[dict]) -> Iterator:
    """``encode`` of a small Table or RecordBatch: the same format (one segment)."""
    batches = data.to_batches() if isinstance(data, pa.Table) else [data]
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, data.schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    ipc = out.getvalue()
    if ipc.size > segment_size:   # cannot happen below _SMALL_TABLE; kept exact anyway
        raise AssertionError("small-table encoding outgrew one segment")
    footer = msgpack.packb({"v": FORMAT_VERSION, "ipc": ipc.size, "seg": segment_size,
                            "h": [xxhash.xxh3_64_intdigest(ipc)], "rows": data.num_rows,
                            "batches": len(batches), "comp": None})
    yield ipc
    yield footer + _TAIL.pack(len(footer), xxhash.xxh3_64_intdigest(footer), MAGIC)
    if stats is not None:
        stats.update(rows=data.num_rows, batches=len(batches),
                     bytes=ipc.size + len(footer) + TAIL_SIZE)


def parse_tail(tail: Union[bytes, bytearray, memoryview], total_size: int, where: Callable[[], dict]) -> int:
    """Return the footer length from the last ``TAIL_SIZE`` bytes; check the magic."""
    if total_size < TAIL_SIZE or len(tail) < TAIL_SIZE:
        raise IntegrityError(f"object of {total_size} bytes is too short to be a cylon-store object",
                             **where())
    footer_len, _, magic = _TAIL.unpack(bytes(tail[-TAIL_SIZE:]))
    if magic != MAGIC:
        raise IntegrityError("not a cylon-store object (bad magic; written by another tool, "
                             "or truncated)", **where())
    if footer_len + TAIL_SIZE > total_size:
        raise IntegrityError("footer length exceeds the object size (truncated object)", **where())
    return footer_len


def parse_footer(footer_and_tail, total_size: int, where: Callable[[], dict]) -> Footer:
    view = memoryview(footer_and_tail).cast("B")
    footer_len, footer_hash, _ = _TAIL.unpack(bytes(view[-TAIL_SIZE:]))
    raw = view[-TAIL_SIZE - footer_len:-TAIL_SIZE]
    if xxhash.xxh3_64_intdigest(raw) != footer_hash:
        raise IntegrityError("footer checksum mismatch (corrupted object)", **where())
    try:
        meta = msgpack.unpackb(raw)
        footer = Footer(ipc_len=meta["ipc"], segment_size=meta["seg"], hashes=tuple(meta["h"]),
                        rows=meta["rows"], batches=meta["batches"], compression=meta.get("comp"),
                        _packed_len=footer_len)
    except Exception as exc:  # malformed msgpack or missing fields
        raise IntegrityError(f"unreadable footer ({exc})", **where()) from exc
    if meta.get("v") != FORMAT_VERSION:
        raise IntegrityError(f"unsupported format version {meta.get('v')}", **where())
    if footer.total_len != total_size:
        raise IntegrityError(f"size mismatch: footer says {footer.total_len} bytes, object has "
                             f"{total_size} (truncated or appended)", **where())
    expected = -(-footer.ipc_len // footer.segment_size) if footer.ipc_len else 0
    if len(footer.hashes) != expected:
        raise IntegrityError("footer segment count does not match the stream length", **where())
    return footer


def verify_segment(footer: Footer, index: int, data, where: Callable[[], dict]) -> None:
    if xxhash.xxh3_64_intdigest(data) != footer.hashes[index]:
        raise IntegrityError(f"checksum mismatch in segment {index} (bytes "
                             f"{index * footer.segment_size}..): the object is corrupted", **where())


def decode(buf, where: Callable[[], dict]) -> pa.Table:
    """Verify and decode one whole object (zero-copy over ``buf``)."""
    buf = buf if isinstance(buf, pa.Buffer) else pa.py_buffer(buf)
    size = buf.size
    tail = buf.slice(max(0, size - TAIL_SIZE)).to_pybytes()
    footer_len = parse_tail(tail, size, where)
    footer = parse_footer(buf.slice(size - TAIL_SIZE - footer_len), size, where)
    seg = footer.segment_size
    for i in range(len(footer.hashes)):
        verify_segment(footer, i, buf.slice(i * seg, min(seg, footer.ipc_len - i * seg)), where)
    try:
        return pa.ipc.open_stream(buf.slice(0, footer.ipc_len)).read_all()
    except pa.ArrowException as exc:
        raise IntegrityError(f"checksums match but the Arrow stream does not decode ({exc})",
                             **where()) from exc


class SegmentReader:
    """A read-only file object over verified segments, for ``pa.ipc.open_stream``: memory stays
    bounded by one segment plus the batch being decoded."""

    def __init__(self, footer: Footer, read_range: Callable[[int, int], BufferLike],
                 where: Callable[[], dict]):
        self.footer = footer
        self._read_range = read_range
        self._where = where
        self._next_segment = 0
        self._current = memoryview(b"")
        self._pos = 0
        self.closed = False

    def _load(self) -> bool:
        f = self.footer
        i = self._next_segment
        if i >= len(f.hashes):
            return False
        start = i * f.segment_size
        end = min(start + f.segment_size, f.ipc_len)
        # An exhausted view still pins its segment: drop it first, so that one segment is held.
        self._current = memoryview(b"")
        data = self._read_range(start, end)
        view = memoryview(data).cast("B")
        if view.nbytes != end - start:
            raise IntegrityError(f"short read of segment {i}", **self._where())
        verify_segment(f, i, view, self._where)
        self._current = view
        self._next_segment += 1
        return True

    def read(self, n: int = -1) -> bytearray:
        remaining = self.footer.ipc_len - self._pos
        want = remaining if n is None or n < 0 else min(n, remaining)
        # Copy into one result as we go: holding slices until a final join would keep the
        # previous segment alive while the next one loads (two segments instead of one).
        out = bytearray(want)
        got = 0
        while got < want:
            if not self._current.nbytes and not self._load():
                break
            k = min(want - got, self._current.nbytes)
            out[got:got + k] = self._current[:k]
            self._current = self._current[k:]
            got += k
        self._pos += got
        return out if got == want else out[:got]

    def readable(self):
        return True

    def seekable(self):
        return False

    def tell(self):
        return self._pos

    def close(self):
        self.closed = True
