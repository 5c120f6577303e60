"""Byte layouts and routing of the request-efficient exchanges, and their request model.

Three exchange strategies move the same data (``parts[d]`` of every rank ``s`` to rank ``d``):

``direct``
    one object per (sender, receiver) pair: P(P-1) PUTs and P(P-1) GETs.
``combined`` (write-combining)
    one object per sender: ``[header][slot 0][slot 1]...`` with a slot per rank.  The slot sizes
    also travel in the object's *key* (the "size tag", see ``encode_tag``), and receivers find
    the keys with the LIST they poll anyway, so a receiver reads its slot with **one** ranged GET
    per sender: P PUTs + P(P-1) GETs.  The header (with a checksum) stays in the object: it is
    read only when the tag does not fit in a key (``tag_fits``).
``twolevel`` (the two-level exchange of Lambada, Müller et al., SIGMOD 2020)
    ranks sit on a grid of ``g = ceil(sqrt(P))`` columns.  Stage 1: each rank writes one
    combined object whose slots go to the ranks of its own row, one per column: the slot for
    the rank in column ``c`` holds every piece bound for a rank in column ``c``.  Stage 2: each
    rank forwards what it holds, again as one combined object, to the ranks of its column.
    Pieces are forwarded as the bytes they arrived as (no decode, no re-encode).  Requests:
    2P PUTs + about 2P(sqrt(P)-1) GETs; for a square P exactly 2P*sqrt(P) in all.  When the last
    row is short, a rank of that row sends the pieces for a missing column to the rank of that
    column one row up (``Grid.mid``).

A slot of the two-level exchange is a *piece bundle*: ``[magic][u64 n][n x (u32 src, u32 dst,
u64 length)][u64 xxh3]`` then the pieces, each a whole stored object of ``codec`` (its own
segment checksums are verified where it is finally decoded).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable

import xxhash

from .errors import ConfigError, IntegrityError

STRATEGIES = ("auto", "direct", "combined", "twolevel")

_COMBINED_MAGIC = b"CYLXCMB1"
_PIECES_MAGIC = b"CYLXPCS1"

# ---------------------------------------------------------------------------------------------
# Combined object: header with one (offset, length) per slot
# ---------------------------------------------------------------------------------------------


def combined_header_size(slots: int) -> int:
    return 8 + 8 + 16 * slots + 8


def combined_header(sizes: list[int]) -> bytes:
    """[magic][u64 n][n x (u64 offset, u64 length)][u64 xxh3 of what precedes]."""
    n = len(sizes)
    offset = combined_header_size(n)
    flat: list[int] = []
    for size in sizes:
        flat += (offset, size)
        offset += size
    body = _COMBINED_MAGIC + struct.pack(f"<Q{2 * n}Q", n, *flat)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def parse_combined_header(buf, slots: int, index: int, where: Callable[[], dict]) -> tuple[int, int]:
    """(offset, length) of slot ``index`` from a header read back."""
    raw = bytes(memoryview(buf))
    if len(raw) != combined_header_size(slots) or raw[:8] != _COMBINED_MAGIC:
        raise IntegrityError("not a combined exchange object (bad header)", **where())
    (digest,) = struct.unpack("<Q", raw[-8:])
    if xxhash.xxh3_64_intdigest(raw[:-8]) != digest:
        raise IntegrityError("combined exchange header checksum mismatch", **where())
    (n,) = struct.unpack("<Q", raw[8:16])
    if n != slots:
        raise IntegrityError(f"combined object has {n} slots, expected {slots}", **where())
    return struct.unpack("<QQ", raw[16 + 16 * index:32 + 16 * index])


def slot_range(sizes: list[int], index: int) -> tuple[int, int]:
    """(offset, length) of slot ``index`` of a combined object whose slot sizes are ``sizes``."""
    return combined_header_size(len(sizes)) + sum(sizes[:index]), sizes[index]


# ---------------------------------------------------------------------------------------------
# Size tag: slot sizes carried in the object's key
# ---------------------------------------------------------------------------------------------

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
#: Longest key segment a tag segment may make: POSIX NAME_MAX (255) minus room for the source.
TAG_SEGMENT = 200
#: Characters a size is assumed to take in the model (base 36: sizes below 2.8 TB).
TAG_CHARS_PER_SLOT = 9


def _b36(n: int) -> str:
    if n == 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_DIGITS[r])
    return "".join(reversed(out))


def encode_tag(sizes: list[int]) -> str:
    """Base-36 sizes joined by '.', cut into '/'-separated segments of <= TAG_SEGMENT chars."""
    segments, current = [], ""
    for word in (_b36(s) for s in sizes):
        if current and len(current) + 1 + len(word) > TAG_SEGMENT:
            segments.append(current)
            current = word
        else:
            current = f"{current}.{word}" if current else word
    segments.append(current)
    return "/".join(segments)


def decode_tag(tag: str) -> list[int]:
    return [int(w, 36) for w in tag.replace("/", ".").split(".")]


def tag_fits(prefix_len: int, slots: int, max_key_bytes: int = 1024) -> bool:
    """Whether the model may assume the sizes of ``slots`` slots fit in a key after a prefix."""
    return prefix_len + 8 + slots * TAG_CHARS_PER_SLOT <= max_key_bytes


# ---------------------------------------------------------------------------------------------
# Piece bundle: the slot format of the two-level exchange
# ---------------------------------------------------------------------------------------------

_PIECE_ENTRY = struct.Struct("<IIQ")


def pieces_header(entries: list[tuple[int, int, int]]) -> bytes:
    """Header of a bundle of pieces; ``entries`` are (src, dst, length) in payload order."""
    body = _PIECES_MAGIC + struct.pack("<Q", len(entries)) + \
        b"".join(_PIECE_ENTRY.pack(*e) for e in entries)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def parse_pieces(buf, where: Callable[[], dict]) -> list[tuple[int, int, object]]:
    """Split a bundle (a ``pyarrow.Buffer``) into (src, dst, piece buffer) without copying."""
    size = buf.size
    if size < 24 or buf.slice(0, 8).to_pybytes() != _PIECES_MAGIC:
        raise IntegrityError("not a piece bundle of the two-level exchange", **where())
    (n,) = struct.unpack("<Q", buf.slice(8, 8).to_pybytes())
    hlen = 16 + n * _PIECE_ENTRY.size + 8
    if hlen > size:
        raise IntegrityError("piece bundle is shorter than its header says", **where())
    raw = buf.slice(0, hlen).to_pybytes()
    (digest,) = struct.unpack("<Q", raw[-8:])
    if xxhash.xxh3_64_intdigest(raw[:-8]) != digest:
        raise IntegrityError("piece bundle header checksum mismatch", **where())
    out, offset = [], hlen
    for i in range(n):
        src, dst, length = _PIECE_ENTRY.unpack_from(raw, 16 + i * _PIECE_ENTRY.size)
        if offset + length > size:
            raise IntegrityError("piece bundle is shorter than its entries say", **where())
        out.append((src, dst, buf.slice(offset, length)))
        offset += length
    if offset != size:
        raise IntegrityError("piece bundle is longer than its entries say", **where())
    return out


# ---------------------------------------------------------------------------------------------
# Grid routing of the two-level exchange
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """Ranks 0..P-1 row-major on ``cols`` columns; the last row may be short."""

    size: int

    @property
    def cols(self) -> int:
        return max(1, math.ceil(math.sqrt(self.size)))

    @property
    def rows(self) -> int:
        return math.ceil(self.size / self.cols)

    def row(self, r: int) -> int:
        return r // self.cols

    def col(self, r: int) -> int:
        return r % self.cols

    def mid(self, src: int, dst: int) -> int:
        """The rank that forwards src's piece for dst: src's row, dst's column (one row up when
        src's row has no rank in that column)."""
        g = self.cols
        m = self.row(src) * g + self.col(dst)
        return m if m < self.size else m - g

    def stage1_targets(self, src: int) -> list[int]:
        """Ranks src writes a slot for in stage 1 (every column but its own)."""
        return sorted({self.mid(src, c) for c in range(min(self.cols, self.size))} - {src})

    def stage1_sources(self, m: int) -> list[int]:
        """Ranks whose stage-1 object has a slot for ``m``."""
        g, out = self.cols, []
        for row in (self.row(m), self.row(m) + 1):
            for s in range(row * g, min((row + 1) * g, self.size)):
                if s != m and self.mid(s, self.col(m)) == m:
                    out.append(s)
        return out

    def column(self, r: int) -> list[int]:
        """The other ranks of r's column (stage 2 sends to and receives from them)."""
        return [x for x in range(self.col(r), self.size, self.cols) if x != r]


# ---------------------------------------------------------------------------------------------
# Request model and price
# ---------------------------------------------------------------------------------------------

def request_model(world_size: int, strategy: str, *, tags: bool = True) -> dict:
    """Logical store requests of one exchange among ``world_size`` ranks, polling LISTs aside.

    ``tags``: whether slot sizes fit in the keys (``tag_fits``); if not, a receiver reads a
    header range before each slot (one more GET per slot read).
    """
    P = world_size
    if strategy not in STRATEGIES[1:]:
        raise ConfigError(f"unknown exchange strategy {strategy!r}")
    if P <= 1:
        return {"put": 0, "get": 0, "delete": 0}
    per_read = 1 if tags else 2
    if strategy == "direct":
        return {"put": P * (P - 1), "get": P * (P - 1), "delete": P * (P - 1)}
    if strategy == "combined":
        return {"put": P, "get": per_read * P * (P - 1), "delete": P}
    grid = Grid(P)
    put = sum(1 for r in range(P) if grid.stage1_targets(r)) + \
        sum(1 for r in range(P) if grid.column(r))
    get = sum(len(grid.stage1_sources(r)) + len(grid.column(r)) for r in range(P))
    return {"put": put, "get": per_read * get, "delete": put}


def request_cost_usd(requests: dict, put_per_1000: float = 0.005, get_per_1000: float = 0.0004) -> float:
    """Dollars at S3 list prices (DELETE is free; LIST is billed like PUT)."""
    return (requests.get("put", 0) + requests.get("list", 0)) * put_per_1000 / 1000 + \
        requests.get("get", 0) * get_per_1000 / 1000


def cheapest_strategy(world_size: int, billing: str) -> str:
    """The strategy ``exchange="auto"`` picks on a backend that bills use (``Capabilities.billing``).

    ``"requests"`` (S3 and compatibles: a flat price per request): the cheapest of the models
    at S3 prices (combined from P = 3; two-level once its ~2P√P requests undercut combined's
    P PUTs + P(P-1) GETs: from P = 21 on).  ``"units"`` (DynamoDB: a write unit per KiB of every
    item): the two-level exchange writes every byte twice, so there it stays combined.
    ``"none"``: direct (requests are free; the fewest round trips win).
    """
    if billing == "none" or world_size < 3:
        return "direct"
    if billing != "requests":
        return "combined"
    costs = {s: request_cost_usd(request_model(world_size, s)) for s in ("combined", "twolevel")}
    return "twolevel" if costs["twolevel"] < costs["combined"] else "combined"


def find_slot(targets: list[int], rank: int, where: Callable[[], dict]) -> int:
    try:
        return targets.index(rank)
    except ValueError:
        raise IntegrityError(f"rank {rank} has no slot in this object", **where()) from None


def expect_slot(buf, length: int, where: Callable[[], dict]):
    if buf.size != length:
        raise IntegrityError(f"slot read back {buf.size} bytes, its key says {length}", **where())
    return buf


__all__ = ["STRATEGIES", "Grid", "combined_header", "combined_header_size",
           "parse_combined_header", "slot_range", "encode_tag", "decode_tag", "tag_fits",
           "pieces_header", "parse_pieces", "request_model", "request_cost_usd",
           "cheapest_strategy", "find_slot", "expect_slot"]
