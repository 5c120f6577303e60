"""Hash partitioning: determinism (values, not layout, decide), pinned values, and the
split invariants as properties."""

from __future__ import annotations

import decimal
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute in _AS_TYPE)
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cylon_store.kernel import partition as P

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def test_pinned_hashes():
    # A change here changes where rows go: bump partition.HASH_VERSION with it.
    assert P.hash_array(pa.array([0, 1, -1, None], pa.int64())).tolist() == [
        11286133854226296554, 16572613472718614229, 2717770620714153248, int(P.NULL_HASH)]
    assert P.hash_array(pa.array(["", "a", "hello world!", None])).tolist() == [
        7175312947680778460, 5806353248284791906, 14428062223268775326, int(P.NULL_HASH)]
    assert P.hash_array(pa.array([1.5, 0.0], pa.float64())).tolist() == [
        8667687477201839709, 11286133854226296554]


def test_integer_widths_and_temporal_agree():
    h = P.hash_array(pa.array([1, -3, None], pa.int64()))
    for t in (pa.int8(), pa.int16(), pa.int32()):
        assert (P.hash_array(pa.array([1, -3, None], t)) == h).all()
    assert (P.hash_array(pa.array([1, 7], pa.uint8())) == P.hash_array(pa.array([1, 7]))).all()
    days = pa.array([0, 19000], pa.int32())
    assert (P.hash_array(days.cast(pa.date32())) == P.hash_array(days)).all()


def test_float_normalisation():
    odd_nan = np.frombuffer(np.uint64(0x7FF8000000000123).tobytes(), np.float64)[0]
    h = P.hash_array(pa.array([0.0, -0.0, np.nan, odd_nan, -np.nan], pa.float64()))
    assert h[0] == h[1]
    assert h[2] == h[3] == h[4]
    f32 = P.hash_array(pa.array([0.5, -0.0, np.nan], pa.float32()))
    assert (f32 == P.hash_array(pa.array([0.5, 0.0, np.nan], pa.float64()))).all()
    f16 = P.hash_array(pa.array(np.array([0.5, -0.0], np.float16)))
    assert (f16 == P.hash_array(pa.array([0.5, 0.0]))).all()


def test_layout_does_not_matter():
    words = ["", "a", None, "βeta" * 7, "x" * 8, "x" * 9, "a\0"]
    s = pa.array(words)
    h = P.hash_array(s)
    assert len(set(h.tolist())) == len(words)
    for variant in (s.cast(pa.large_string()), s.cast(pa.string_view()), s.dictionary_encode(),
                    pa.chunked_array([s[:2], s[2:5], s[5:]]), s.cast(pa.binary())):
        assert (P.hash_array(variant) == h).all()
    assert (P.hash_array(s.slice(3)) == h[3:]).all()
    assert (P.hash_array(pa.concat_arrays([pa.array(["pad"]), s]).slice(1)) == h).all()


def test_other_types():
    for arr in (pa.array([True, False, None]),
                pa.array([decimal.Decimal("1.25"), None, decimal.Decimal("-3")], pa.decimal128(9, 2)),
                pa.array([b"abc", None, b""], pa.binary()),
                pa.array([b"abc", None, b"xyz"], pa.binary(3)),
                pa.array([1, None, 5], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                pa.array([1, None], pa.int64()).cast(pa.duration("s")),
                pa.nulls(3),
                pa.StructArray.from_arrays([pa.array([1, 2, 1]), pa.array(["a", "b", "a"])],
                                           names=["x", "y"])):
        h = P.hash_array(arr)
        assert h.dtype == np.uint64 and len(h) == len(arr)
        assert (P.hash_array(arr.slice(1)) == h[1:]).all()
    st_ = P.hash_array(pa.StructArray.from_arrays([pa.array([1, 2, 1]), pa.array(["a", "b", "a"])],
                                                  names=["x", "y"]))
    assert st_[0] == st_[2] != st_[1]
    assert not P.hashable_type(pa.list_(pa.int32()))


def test_multi_column_order_matters():
    t = pa.table({"a": [1, 2], "b": [2, 1]})
    h_ab = P.hash_columns(t, ["a", "b"])
    h_ba = P.hash_columns(t, ["b", "a"])
    assert h_ab[0] == h_ba[1] and h_ab[0] != h_ab[1]


def test_same_in_another_process():
    code = ("import pyarrow as pa; from cylon_store.kernel.partition import hash_columns;"
            "t = pa.table({'a': [1, None, 3], 's': ['x', 'yy', None], 'f': [0.5, -0.0, None]});"
            "print(hash_columns(t, ['a', 's', 'f']).tolist())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    t = pa.table({"a": [1, None, 3], "s": ["x", "yy", None], "f": [0.5, 0.0, None]})
    assert eval(out) == P.hash_columns(t, ["a", "s", "f"]).tolist()


@SETTINGS
@given(dest=st.lists(st.integers(0, 6), max_size=200), world=st.integers(1, 7))
def test_split_invariants(dest, world):
    dest = np.array([d % world for d in dest], dtype=np.uint16)
    t = pa.table({"i": np.arange(len(dest)), "s": [str(x) for x in range(len(dest))]})
    parts = P.split_by_destination(t, dest, world)
    assert len(parts) == world
    seen = []
    for d, part in enumerate(parts):
        assert part.schema == t.schema
        idx = part.column("i").to_numpy()
        assert (dest[idx] == d).all()               # every row where it belongs
        assert (np.diff(idx) > 0).all()             # original order kept
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(dest)))   # every row exactly once


@SETTINGS
@given(values=st.lists(st.one_of(st.none(), st.integers(-50, 50)), max_size=150),
       texts=st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=150, max_size=150),
       world=st.integers(1, 8))
def test_equal_keys_meet(values, texts, world):
    n = len(values)
    t = pa.table({"k": pa.array(values, pa.int64()), "s": pa.array(texts[:n], pa.string()),
                  "i": pa.array(np.arange(n))})
    parts = P.hash_partition(t, ["k", "s"], world)
    home = {}
    for d, part in enumerate(parts):
        for k, s in zip(part.column("k").to_pylist(), part.column("s").to_pylist()):
            assert home.setdefault((k, s), d) == d
    assert sum(p.num_rows for p in parts) == n
    # Rechunked input lands on the same destinations.
    again = P.hash_partition(pa.concat_tables([t.slice(0, n // 2), t.slice(n // 2)]), ["k", "s"], world)
    assert [p.column("i").to_pylist() for p in again] == [p.column("i").to_pylist() for p in parts]


@SETTINGS
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=100))
def test_float_hash_is_a_function_of_value(xs):
    h = P.hash_array(pa.array(xs, pa.float64()))
    by_value = {}
    for x, v in zip(xs, h.tolist()):
        key = "nan" if x != x else (0.0 if x == 0 else x)
        assert by_value.setdefault(key, v) == v


@SETTINGS
@given(st.lists(st.binary(max_size=40), max_size=60))
def test_bytes_hash_is_a_function_of_value(bs):
    h = P.hash_array(pa.array(bs, pa.binary()))
    seen = {}
    for b, v in zip(bs, h.tolist()):
        assert seen.setdefault(b, v) == v
    assert len(set(seen.values())) == len(seen)     # no collision among these few


def test_destinations_spread():
    h = P.hash_array(pa.array(np.arange(100_000)))
    for world in (2, 3, 4, 7):
        counts = np.bincount(P.destinations(h, world), minlength=world)
        assert counts.min() > 0.9 * 100_000 / world


def test_large_strings_in_blocks(monkeypatch):
    s = pa.array([f"row-{i}" * (i % 5) for i in range(5000)])
    whole = P.hash_array(s)
    monkeypatch.setattr(P, "_BLOCK_ROWS", 97)
    assert (P.hash_array(s) == whole).all()


@pytest.mark.parametrize("world", [1, 2, 5])
def test_split_all_to_one(world):
    t = pa.table({"a": [1, 2, 3]})
    parts = P.split_by_destination(t, np.full(3, world - 1, np.uint16), world)
    assert parts[world - 1].equals(t)
    assert all(p.num_rows == 0 for p in parts[:-1])


_AS_TYPE = {
    "int32": lambda a: a.cast(pa.int32()),
    "uint64": lambda a: pa.compute.abs(a).cast(pa.uint64()),
    "float32": lambda a: a.cast(pa.float32()),
    "bool": lambda a: pa.compute.greater(a, 0),
    "string": lambda a: a.cast(pa.string()),
    "dictionary": lambda a: a.cast(pa.string()).dictionary_encode(),
    "view": lambda a: a.cast(pa.string()).cast(pa.string_view()),
    "decimal": lambda a: a.cast(pa.decimal128(22, 2)),
    "timestamp": lambda a: a.cast(pa.timestamp("us")),
    "fixed": lambda a: pa.array([None if x is None else f"{x:+08d}".encode() for x in a.to_pylist()],
                                pa.binary(8)),
}


@SETTINGS
@given(values=st.lists(st.one_of(st.none(), st.integers(-10**6, 10**6)), min_size=1, max_size=80),
       kind=st.sampled_from(sorted(_AS_TYPE)), data=st.data())
def test_slices_and_chunks_hash_like_the_whole(values, kind, data):
    arr = _AS_TYPE[kind](pa.array(values, pa.int64()))
    whole = P.hash_array(arr)
    off = data.draw(st.integers(0, len(values)))
    ln = data.draw(st.integers(0, len(values) - off))
    assert (P.hash_array(arr.slice(off, ln)) == whole[off:off + ln]).all()
    chunked = pa.chunked_array([arr.slice(0, off), arr.slice(off)], type=arr.type)
    assert (P.hash_array(chunked) == whole).all()
    by_value = {}
    for v, h in zip(values, whole.tolist()):
        assert by_value.setdefault(v, h) == h


def test_hash_columns_is_the_definition():
    # hash_columns works in place on fresh arrays: it must still be h = fmix(h * C3 + h_col)
    # from h = C4, column by column, and must not write into the table's own buffers.
    rng = np.random.default_rng(3)
    a = rng.integers(-2**63, 2**63 - 1, 5000, dtype=np.int64)
    t = pa.table({"a": a, "b": pa.array(rng.integers(-9, 9, 5000).astype(np.int16)),
                  "c": pa.array(rng.random(5000), mask=rng.random(5000) < 0.1)})
    before = a.copy()
    mask = np.uint64(2**64 - 1)
    for cols in (["a"], ["b", "c"], ["c", "a", "b"]):
        want = [int(P.C4)] * t.num_rows
        for c in cols:
            hc = P.hash_array(t.column(c)).tolist()
            want = [(w * int(P.C3) + x) & int(mask) for w, x in zip(want, hc)]
            want = P._fmix(np.array(want, dtype=np.uint64)).tolist()
        assert P.hash_columns(t, cols).tolist() == want
    assert (t.column("a").to_numpy() == before).all()
    assert (P.hash_columns(t.slice(0, 0), ["a"]) == np.zeros(0, np.uint64)).all()


def test_argsort_stable_is_numpys():
    # The sort kernel's bucketed argsort must give exactly numpy's stable order (ties in row
    # order) for every numeric distribution, including the float corner cases.
    from cylon_store.kernel.sort import _BUCKET_MIN_ROWS, argsort_stable
    rng = np.random.default_rng(5)
    n = _BUCKET_MIN_ROWS * 2 + 17
    f = rng.normal(size=n) * 1e6
    for frac, val in ((0.05, np.nan), (0.05, -0.0), (0.05, 0.0), (0.01, np.inf), (0.01, -np.inf)):
        f[rng.random(n) < frac] = val
    f[:50] = -np.nan
    halfzero = rng.integers(0, 1 << 40, n)
    halfzero[rng.random(n) < 0.5] = 0
    cases = {
        "uniform": rng.integers(0, 1 << 62, n), "full": rng.integers(-2**63, 2**63 - 1, n),
        "few": rng.integers(-5, 5, n), "int16": rng.integers(-300, 300, n).astype(np.int16),
        "int32": rng.integers(-2**31, 2**31 - 1, n).astype(np.int32),
        "uint64": rng.integers(0, 2**64 - 1, n, dtype=np.uint64),
        "zipf": rng.zipf(1.5, n).astype(np.int64), "constant": np.full(n, 7),
        "halfzero": halfzero, "float64": f, "float32": f.astype(np.float32), "negated": -f,
        "sorted": np.arange(n), "reversed": np.arange(n)[::-1].copy(),
    }
    for name, v in cases.items():
        got = argsort_stable(v)
        assert np.array_equal(got, np.argsort(v, kind="stable")), name


def test_destinations_formula_for_every_world_size():
    # Powers of two take a one-shift path; every world size must match the documented formula.
    rng = np.random.default_rng(8)
    h = rng.integers(0, 2**64 - 1, 20000, dtype=np.uint64)
    h[:5] = [0, 2**64 - 1, 2**63, 2**32 - 1, 2**32]
    for world in (1, 2, 3, 4, 5, 8, 12, 16, 1024, 1 << 16, (1 << 16) + 1):
        want = ((h >> np.uint64(32)) * np.uint64(world)) >> np.uint64(32)
        got = P.destinations(h, world)
        assert got.dtype == (np.uint16 if world <= 1 << 16 else np.uint32)
        assert (got == want).all(), world
