"""The codec on its own: Arrow tables <-> stored bytes, with checksums.

Property tests (hypothesis) over generated tables, batchings, segment sizes and compressions:
round trips are exact (whole and streamed), encoding is deterministic, and any damage — one
flipped byte anywhere, any truncation — is an IntegrityError, never wrong data.
"""

from __future__ import annotations

import datetime as dt
import decimal

import msgpack
import numpy as np
import pyarrow as pa
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cylon_store import codec
from cylon_store.errors import ConfigError, IntegrityError

from conformance.tables import all_types_table, batched


def where():
    return {"backend": "test", "op": "get", "key": "k"}


def encode(data, **kw) -> bytes:
    return b"".join(bytes(memoryview(c)) for c in codec.encode(data, **kw))


def stream_decode(blob: bytes) -> list[pa.RecordBatch]:
    """What ``Store.get_batches`` does, over an in-memory object."""
    size = len(blob)
    footer_len = codec.parse_tail(blob[-codec.TAIL_SIZE:], size, where)
    footer = codec.parse_footer(blob[size - footer_len - codec.TAIL_SIZE:], size, where)
    source = codec.SegmentReader(footer, lambda s, e: blob[s:e], where)
    return list(pa.ipc.open_stream(pa.PythonFile(source, mode="r")))


# -- strategies ---------------------------------------------------------------------------------
def _ints(bits, signed=True):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return st.integers(lo, hi)


_text = st.text(max_size=12)
_COLUMN_KINDS = {
    # name: (arrow type, strategy of non-null Python values)
    "int8": (pa.int8(), _ints(8)),
    "int64": (pa.int64(), _ints(64)),
    "uint32": (pa.uint32(), _ints(32, signed=False)),
    "uint64": (pa.uint64(), _ints(64, signed=False)),
    "float32": (pa.float32(), st.floats(allow_nan=False, width=32)),
    "float64": (pa.float64(), st.floats(allow_nan=False)),
    "bool": (pa.bool_(), st.booleans()),
    "string": (pa.string(), _text),
    "large_string": (pa.large_string(), _text),
    "binary": (pa.binary(), st.binary(max_size=12)),
    "decimal": (pa.decimal128(12, 3), st.decimals(min_value=-10**8, max_value=10**8, places=3,
                                                  allow_nan=False, allow_infinity=False)),
    "date32": (pa.date32(), st.dates()),
    "timestamp": (pa.timestamp("us", "Europe/Paris"),
                  st.datetimes(timezones=st.just(dt.timezone.utc))),
    "duration": (pa.duration("ns"), st.timedeltas(min_value=dt.timedelta(days=-999),
                                                  max_value=dt.timedelta(days=999))),
    "list": (pa.list_(pa.int32()), st.lists(st.none() | _ints(32), max_size=4)),
    "large_list": (pa.large_list(pa.string()), st.lists(st.none() | _text, max_size=4)),
    "struct": (pa.struct([("a", pa.int16()), ("b", pa.string())]),
               st.fixed_dictionaries({"a": st.none() | _ints(16), "b": st.none() | _text})),
    "map": (pa.map_(pa.string(), pa.int64()),
            st.lists(st.tuples(_text, st.none() | _ints(64)), max_size=3)),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), st.sampled_from(["x", "yy", "ζ", ""])),
    "null": (pa.null(), st.nothing()),
}


@st.composite
def tables(draw, max_rows=40):
    rows = draw(st.integers(0, max_rows))
    kinds = draw(st.lists(st.sampled_from(sorted(_COLUMN_KINDS)), max_size=5))
    arrays, fields = [], []
    for i, kind in enumerate(kinds):
        typ, values = _COLUMN_KINDS[kind]
        col = draw(st.lists(st.none() | values, min_size=rows, max_size=rows))
        if isinstance(typ, pa.DictionaryType):
            arr = pa.array(col, pa.string()).dictionary_encode()
        else:
            arr = pa.array(col, typ)
        arrays.append(arr)
        meta = draw(st.none() | st.dictionaries(_text, _text, max_size=2))
        fields.append(pa.field(f"c{i}_{kind}", arr.type, metadata=meta or None))
    meta = draw(st.none() | st.dictionaries(_text, _text, max_size=3))
    schema = pa.schema(fields, metadata=meta or None)
    if not arrays:
        return pa.table({}).replace_schema_metadata(meta or None)
    table = pa.Table.from_arrays(arrays, schema=schema)
    cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=4)))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [rows])]
    return pa.Table.from_batches(batched(table, sizes), schema=schema)


encodings = st.fixed_dictionaries({
    "segment_size": st.sampled_from([1, 7, 64, 1000, 4096, 8 << 20]),
    "compression": st.sampled_from([None, "lz4", "zstd"]),
})
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- properties ---------------------------------------------------------------------------------
@PROPERTY
@given(tables(), encodings)
def test_round_trip(table, enc):
    stats: dict = {}
    blob = b"".join(bytes(memoryview(c)) for c in codec.encode(table, stats=stats, **enc))
    got = codec.decode(blob, where)
    assert got.equals(table, check_metadata=True)
    assert got.schema.equals(table.schema, check_metadata=True)
    streamed = stream_decode(blob)
    assert [b.num_rows for b in streamed] == [b.num_rows for b in table.to_batches()]
    assert pa.Table.from_batches(streamed, schema=table.schema).equals(table, check_metadata=True)
    assert stats == {"rows": table.num_rows, "batches": len(table.to_batches()), "bytes": len(blob)}


@PROPERTY
@given(tables(max_rows=15), encodings)
def test_encoding_is_deterministic(table, enc):
    # A retried put rewrites the very same bytes (idempotent writes).
    assert encode(table, **enc) == encode(table, **enc)


@PROPERTY
@given(tables(max_rows=20), encodings, st.data())
def test_any_flipped_byte_is_detected(table, enc, data):
    blob = encode(table, **enc)
    pos = data.draw(st.integers(0, len(blob) - 1), label="position")
    bit = data.draw(st.integers(1, 255), label="xor")
    damaged = bytearray(blob)
    damaged[pos] ^= bit
    damaged = bytes(damaged)
    with pytest.raises(IntegrityError) as info:
        codec.decode(damaged, where)
    assert info.value.key == "k" and info.value.backend == "test"
    with pytest.raises(IntegrityError):
        stream_decode(damaged)


@PROPERTY
@given(tables(max_rows=20), encodings, st.data())
def test_any_truncation_or_extension_is_detected(table, enc, data):
    blob = encode(table, **enc)
    cut = data.draw(st.integers(0, len(blob) - 1), label="length")
    extra = data.draw(st.binary(min_size=1, max_size=16), label="appended")
    for damaged in (blob[:cut], blob + extra, extra + blob):
        with pytest.raises(IntegrityError):
            codec.decode(damaged, where)
        with pytest.raises(IntegrityError):
            stream_decode(damaged)


@settings(max_examples=25, deadline=None)
@given(tables(max_rows=20), st.sampled_from([1, 13, 512]), st.sampled_from([None, "zstd"]))
def test_segment_size_does_not_change_the_data(table, seg, comp):
    a = codec.decode(encode(table, segment_size=seg, compression=comp), where)
    b = codec.decode(encode(table, segment_size=8 << 20, compression=comp), where)
    assert a.equals(b, check_metadata=True)


# -- examples -----------------------------------------------------------------------------------
def test_every_type_round_trips_with_compression():
    table = all_types_table(500, seed=11)
    parts = batched(table, [0, 100, 0, 400])
    for comp in (None, "lz4", "zstd"):
        blob = encode(parts, compression=comp, segment_size=4096)
        assert codec.decode(blob, where).equals(table, check_metadata=True)
        streamed = stream_decode(blob)
        assert [b.num_rows for b in streamed] == [0, 100, 0, 400]


def test_body_buffers_are_not_copied():
    # "a put costs one copy": the table's own data buffer is handed to the backend as a chunk.
    table = pa.table({"a": np.arange(1 << 17)})
    chunks = list(codec.encode(table))
    data = table.column(0).chunks[0].buffers()[1]
    assert any(isinstance(c, pa.Buffer) and c.address == data.address for c in chunks)


def test_encode_streams_lazily():
    pulled = []

    def batches():
        for i in range(100):
            pulled.append(i)
            yield pa.record_batch({"a": np.full(1 << 15, i)})

    chunks = codec.encode(batches())
    first = next(chunks)
    assert len(memoryview(first)) and len(pulled) <= 2
    rest = list(chunks)
    assert len(pulled) == 100 and rest


def test_compression_shrinks_compressible_data():
    table = pa.table({"a": np.zeros(1 << 18, dtype=np.int64)})
    plain = encode(table)
    for comp in ("lz4", "zstd"):
        packed = encode(table, compression=comp)
        assert len(packed) < len(plain) / 20
        assert codec.decode(packed, where).equals(table)


def test_footer_of_other_format_version_is_refused():
    blob = encode(pa.table({"a": [1, 2]}))
    size = len(blob)
    footer_len = codec.parse_tail(blob[-codec.TAIL_SIZE:], size, where)
    meta = msgpack.unpackb(blob[size - codec.TAIL_SIZE - footer_len:size - codec.TAIL_SIZE])
    meta["v"] = codec.FORMAT_VERSION + 1
    footer = msgpack.packb(meta)
    tail = codec._TAIL.pack(len(footer), xxhash.xxh3_64_intdigest(footer), codec.MAGIC)
    other = blob[:meta["ipc"]] + footer + tail
    with pytest.raises(IntegrityError, match="format version"):
        codec.decode(other, where)


def test_messages_say_what_is_wrong():
    blob = encode(pa.table({"a": list(range(1000))}), segment_size=1024)
    cases = {
        "bad magic": blob[:-1] + b"X",
        "too short": b"abc",
        "checksum mismatch in segment 1": blob[:1500] + bytes([blob[1500] ^ 1]) + blob[1501:],
        "footer checksum": blob[:-codec.TAIL_SIZE - 2] + b"\xff\xff" + blob[-codec.TAIL_SIZE:],
        "size mismatch": b"\0" * 8 + blob,
    }
    for words, damaged in cases.items():
        with pytest.raises(IntegrityError, match=words) as info:
            codec.decode(damaged, where)
        assert str(info.value).startswith("test get 'k': ")


@pytest.mark.parametrize("data", ["text", b"bytes", None, 3, {"a": [1]}, [], [1, 2], iter([])])
def test_unencodable_input_is_a_config_error(data):
    with pytest.raises(ConfigError):
        encode(data)


def test_batches_must_share_one_schema():
    a = pa.record_batch({"a": [1]})
    b = pa.record_batch({"a": ["x"]})
    with pytest.raises(ConfigError, match="different schema"):
        encode([a, b])
    with pytest.raises(ConfigError, match="RecordBatch"):
        encode([a, "nope"])


def test_decimal_and_temporal_extremes():
    table = pa.table({
        "d": pa.array([decimal.Decimal("9" * 38), decimal.Decimal("-" + "9" * 38), None],
                      pa.decimal128(38, 0)),
        "t": pa.array([-(2**63) + 1, 2**63 - 1, None], pa.int64()).cast(pa.timestamp("ns", "UTC")),
    })
    assert codec.decode(encode(table, compression="zstd"), where).equals(table)
