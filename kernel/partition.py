"""Deterministic, vectorised hash partitioning of Arrow tables, and the one-pass split.

A row's hash depends only on its key *values* (and their Arrow type), never on the process, the
machine, the chunking, the slice offset or the backend: every rank of every run sends equal keys
to the same destination.  The hash is our own, written out below and computed with numpy on the
Arrow buffers (no per-row Python); Arrow's internal hashing is not exposed as a stable function.

Definition (all arithmetic modulo 2**64, ``fmix`` is MurmurHash3's 64-bit finaliser):

* fixed-width values become one 64-bit word: integers, dates, times, timestamps and durations
  their integer value (sign-extended to 64 bits), booleans 0/1, floats their float64 bit pattern
  after mapping -0.0 to 0.0 and every NaN to the canonical quiet NaN; ``h = fmix(word + C0)``.
* byte strings (string, binary, their large and view variants, fixed-size binary, decimals as
  their little-endian bytes) are cut into little-endian 64-bit words ``w_q`` (the last one
  zero-padded); ``h = fmix(sum_q fmix(w_q + (q + 1) * C1)  XOR  fmix(len * C2 + C0))``.  The sum
  is order-sensitive through ``q`` and is computed for all rows at once with a cumulative sum.
* dictionary arrays hash their dictionary once and gather; structs combine their fields.
* null is the constant ``NULL_HASH`` whatever the type.
* several key columns: ``h = fmix(h * C3 + h_col)`` from h = C4, in key order.
* destination of a row among P ranks: ``((h >> 32) * P) >> 32`` (multiply-shift, no modulo bias
  worth mentioning for P << 2**32).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from .types import take

__all__ = ["hash_array", "hash_columns", "destinations", "split_by_destination",
           "hash_partition", "hashable_type", "HASH_VERSION"]

#: Bump when the definition above changes: ranks must agree on it (it is part of the preflight).
HASH_VERSION = 1

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
C0 = np.uint64(0x9E3779B97F4A7C15)
C1 = np.uint64(0xD6E8FEB86659FD93)
C2 = np.uint64(0xA0761D6478BD642F)
C3 = np.uint64(0xE7037ED1A0B428DB)
C4 = np.uint64(0x8EBC6AF09C88C6E3)
NULL_HASH = np.uint64(0x5BD1E9955BD1E995)
_CANONICAL_NAN = np.array([np.nan], dtype=np.float64).view(np.uint64)[0]
_BLOCK_ROWS = 1 << 20  # bounds the temporaries of the byte-string path


def _fmix(x: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """MurmurHash3 fmix64, in place on a uint64 array (returned for chaining); ``tmp`` is an
    optional scratch array of the same shape (no temporaries are allocated then)."""
    if tmp is None:
        tmp = np.empty_like(x)
    np.right_shift(x, np.uint64(33), out=tmp)
    x ^= tmp
    x *= _M1
    np.right_shift(x, np.uint64(33), out=tmp)
    x ^= tmp
    x *= _M2
    np.right_shift(x, np.uint64(33), out=tmp)
    x ^= tmp
    return x


def _values(arr: pa.Array, dtype) -> np.ndarray:
    """The value buffer of a fixed-width array as numpy, zero-copy, offset applied."""
    buf = arr.buffers()[1]
    n, off = len(arr), arr.offset
    if buf is None or n == 0:
        return np.zeros(n, dtype=dtype)
    return np.frombuffer(buf, dtype=dtype, count=off + n)[off:]


def _nulls(arr: pa.Array) -> np.ndarray | None:
    if arr.null_count == 0:
        return None
    return arr.is_null().to_numpy(zero_copy_only=False)


_INT_VIEW = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _int_dtype(t: pa.DataType) -> np.dtype:
    """numpy dtype of an integer type (``DataType.to_pandas_dtype()`` imports pandas on
    pyarrow < 22, which a Lambda zip for Python 3.11 gets, and pandas is no dependency)."""
    return np.dtype(f"{'u' if pa.types.is_unsigned_integer(t) else ''}int{t.bit_width}")


def _int_like_storage(t: pa.DataType):
    """numpy dtype of a type whose values are plain integers, else None."""
    if pa.types.is_integer(t):
        return _int_dtype(t)
    if (pa.types.is_date32(t) or pa.types.is_time32(t)):
        return np.dtype(np.int32)
    if (pa.types.is_date64(t) or pa.types.is_time64(t) or pa.types.is_timestamp(t)
            or pa.types.is_duration(t)):
        return np.dtype(np.int64)
    return None


def hashable_type(t: pa.DataType) -> bool:
    """Whether ``hash_array`` supports keys of this type."""
    if pa.types.is_dictionary(t):
        return hashable_type(t.value_type)
    if pa.types.is_struct(t):
        return all(hashable_type(t.field(i).type) for i in range(t.num_fields))
    if isinstance(t, pa.ExtensionType):
        return hashable_type(t.storage_type)
    return (_int_like_storage(t) is not None or pa.types.is_boolean(t) or pa.types.is_floating(t)
            or pa.types.is_null(t) or _is_bytes_like(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_decimal(t))


def _is_bytes_like(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t)
            or pa.types.is_large_binary(t) or _is_view(t))


def _is_view(t: pa.DataType) -> bool:
    return t in (pa.string_view(), pa.binary_view())


def _hash_words(words: np.ndarray, owned: bool = False) -> np.ndarray:
    """``fmix(word + C0)``; in place when ``owned`` (a fresh uint64 array nobody else uses)."""
    if owned and words.dtype == np.uint64:
        h = words
    else:
        h = words.astype(np.uint64, copy=True)
    h += C0
    return _fmix(h)


def _hash_bytes(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Hash of each byte string ``data[offsets[i]:offsets[i+1]]`` (offsets int64, absolute)."""
    n = len(offsets) - 1
    out = np.empty(n, dtype=np.uint64)
    for b0 in range(0, n, _BLOCK_ROWS):
        b1 = min(n, b0 + _BLOCK_ROWS)
        out[b0:b1] = _hash_bytes_block(offsets[b0:b1 + 1], data)
    return out


def _hash_bytes_block(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    lo, hi = int(offsets[0]), int(offsets[-1])
    starts = offsets[:-1] - lo
    lengths = offsets[1:] - offsets[:-1]
    # Copy the block's bytes with 8 bytes of zero padding, so an unaligned 8-byte read at any
    # string start stays inside the buffer; then view it as "a uint64 starting at every byte".
    padded = np.zeros(hi - lo + 8, dtype=np.uint8)
    padded[:hi - lo] = data[lo:hi]
    at = np.ndarray(shape=(hi - lo + 1,), dtype="<u8", buffer=padded, strides=(1,))
    nwords = (lengths + 7) >> 3
    first = np.cumsum(nwords) - nwords          # index of each row's first word
    total = int(nwords.sum())
    if total:
        k = np.arange(total, dtype=np.int64)
        row_first = np.repeat(first, nwords)
        q = k - row_first                        # word number inside its string
        pos = np.repeat(starts, nwords) + (q << 3)
        words = at[pos].astype(np.uint64)
        remaining = np.repeat(starts + lengths, nwords) - pos
        short = remaining < 8
        if short.any():
            shift = (remaining[short] * 8).astype(np.uint64)
            words[short] &= (np.uint64(1) << shift) - np.uint64(1)
        mixed = q.astype(np.uint64)
        mixed += np.uint64(1)
        mixed *= C1
        mixed += words
        _fmix(mixed)
        csum = np.empty(total + 1, dtype=np.uint64)
        csum[0] = 0
        np.cumsum(mixed, out=csum[1:])
        acc = csum[first + nwords] - csum[first]  # wraps modulo 2**64, exactly
    else:
        acc = np.zeros(len(lengths), dtype=np.uint64)
    tail = lengths.astype(np.uint64)
    tail *= C2
    tail += C0
    _fmix(tail)
    acc ^= tail
    return _fmix(acc)


def _hash_chunk(arr: pa.Array) -> np.ndarray:
    t = arr.type
    n = len(arr)
    if isinstance(t, pa.ExtensionType):
        return _hash_chunk(arr.storage)
    if pa.types.is_null(t):
        return np.full(n, NULL_HASH, dtype=np.uint64)
    if pa.types.is_dictionary(t):
        dict_h = _hash_chunk(arr.dictionary) if len(arr.dictionary) else np.zeros(0, np.uint64)
        idx = _values(arr.indices, _int_dtype(arr.indices.type))
        nulls = _nulls(arr.indices)
        if nulls is not None:
            idx = np.where(nulls, 0, idx)
        h = dict_h[idx] if len(dict_h) else np.zeros(n, np.uint64)
    elif pa.types.is_struct(t):
        h = np.full(n, C4, dtype=np.uint64)
        for child in arr.flatten():
            h *= C3
            h += _hash_chunk(child)
            _fmix(h)
    elif pa.types.is_boolean(t):
        h = _hash_words(arr.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint64),
                        owned=True)
    elif pa.types.is_floating(t):
        if t == pa.float16():
            v = _values(arr, np.float16).astype(np.float64)
        else:
            v = _values(arr, np.float32 if t == pa.float32() else np.float64).astype(np.float64)
        v[v == 0] = 0.0                            # -0.0 -> 0.0
        bits = v.view(np.uint64)
        bits[np.isnan(v)] = _CANONICAL_NAN
        h = _hash_words(bits, owned=True)
    elif (dt := _int_like_storage(t)) is not None:
        v = _values(arr, dt)
        if dt.itemsize == 8:   # the 64-bit word is the value's own bits: add C0 while copying
            h = _fmix(np.add(v.view(np.uint64), C0))
        else:                  # smaller ints sign-extend (unsigned zero-extend) to 64 bits
            words = v.astype(np.uint64) if dt.kind == "u" else v.astype(np.int64).view(np.uint64)
            h = _hash_words(words, owned=True)
    elif _is_bytes_like(t):
        if _is_view(t):
            arr = arr.cast(pa.large_string() if t == pa.string_view() else pa.large_binary())
            t = arr.type
        bufs = arr.buffers()
        odt = np.int64 if (pa.types.is_large_string(t) or pa.types.is_large_binary(t)) else np.int32
        offsets: np.ndarray
        if bufs[1] is None or n == 0:
            offsets = np.zeros(n + 1, dtype=np.int64)
        else:
            offsets = np.frombuffer(bufs[1], dtype=odt, count=arr.offset + n + 1)[arr.offset:]
            offsets = offsets.astype(np.int64)
        data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
        h = _hash_bytes(offsets, data)
    elif pa.types.is_fixed_size_binary(t) or pa.types.is_decimal(t):
        width = t.byte_width
        buf = arr.buffers()[1]
        data = (np.frombuffer(buf, dtype=np.uint8, count=(arr.offset + n) * width)[arr.offset * width:]
                if buf is not None and n else np.zeros(0, np.uint8))
        h = _hash_bytes(np.arange(n + 1, dtype=np.int64) * width, data)
    else:
        raise TypeError(f"cannot hash keys of type {t}")
    nulls = _nulls(arr)
    if nulls is not None:
        h[nulls] = NULL_HASH
    return h


def hash_array(arr) -> np.ndarray:
    """uint64 hash of every value of an Array or ChunkedArray (see the module docstring); always
    a fresh array the caller owns."""
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            return _hash_chunk(arr.chunk(0))
        if arr.num_chunks == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([_hash_chunk(c) for c in arr.chunks])
    return _hash_chunk(arr)


_C4C3 = np.uint64((int(C4) * int(C3)) % (1 << 64))


def hash_columns(table: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """Row hashes of ``table`` over the key ``columns`` (order matters)."""
    if not columns:
        return np.full(table.num_rows, C4, dtype=np.uint64)
    h = None
    tmp = None
    for name in columns:
        hc = hash_array(table.column(name))
        if h is None:        # fmix(C4 * C3 + h_0), in place: hash_array's result is fresh
            h = hc
            h += _C4C3
            tmp = np.empty_like(h)
        else:
            h *= C3
            h += hc
        _fmix(h, tmp)
    assert h is not None  # columns is not empty
    return h


def destinations(hashes: np.ndarray, world_size: int) -> np.ndarray:
    """Destination rank of each hash: ``((h >> 32) * P) >> 32``, as the smallest unsigned type."""
    dtype = np.uint16 if world_size <= 1 << 16 else np.uint32
    if world_size & (world_size - 1) == 0:
        # P = 2**k: ((h >> 32) * 2**k) >> 32 is h >> (64 - k), one pass fewer over the hashes.
        k = world_size.bit_length() - 1
        return (hashes >> np.uint64(64 - k)).astype(dtype) if k else np.zeros(len(hashes), dtype)
    d = hashes >> np.uint64(32)
    d *= np.uint64(world_size)
    d >>= np.uint64(32)
    return d.astype(dtype)


def split_by_destination(table: pa.Table, dest: np.ndarray, world_size: int) -> list[pa.Table]:
    """``parts[d]`` = the rows with ``dest == d``, in their original order.

    One stable reorder (a radix sort of the small destination integers) and one ``take``; the
    parts are zero-copy slices of the reordered table.
    """
    if world_size == 1:
        return [table]
    counts = np.bincount(dest, minlength=world_size)
    if len(counts) > world_size:
        raise ValueError(f"destination {len(counts) - 1} outside a world of {world_size}")
    busy = np.flatnonzero(counts)
    if len(busy) <= 1:   # everything goes to one rank (or nowhere): no reorder at all
        empty = table.slice(0, 0)
        return [table if d in busy else empty for d in range(world_size)]
    order = np.argsort(dest, kind="stable")
    ordered = take(table, pa.array(order))   # any type (views have no take kernel)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [ordered.slice(int(s), int(c)) for s, c in zip(starts, counts)]


def hash_partition(table: pa.Table, columns: Sequence[str], world_size: int) -> list[pa.Table]:
    """Split ``table`` by the hash of ``columns`` into ``world_size`` parts."""
    if world_size == 1:
        return [table]
    return split_by_destination(table, destinations(hash_columns(table, columns), world_size),
                                world_size)
