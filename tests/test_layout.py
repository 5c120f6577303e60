"""Routing, byte layouts and request model of the request-efficient exchanges (no store)."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from hypothesis import given, strategies as st

import cylon_store as cs
from cylon_store import keys as K
from cylon_store.layout import (Grid, cheapest_strategy, combined_header, decode_tag, encode_tag,
                                parse_combined_header, parse_pieces, pieces_header,
                                request_model, slot_range, tag_fits)

WHERE = lambda: {"backend": "test"}  # noqa: E731


@pytest.mark.parametrize("P", list(range(1, 40)) + [63, 64, 65, 100, 257, 400])
def test_grid_routes_every_pair_once(P):
    grid = Grid(P)
    for s in range(P):
        targets = grid.stage1_targets(s)
        assert s not in targets and targets == sorted(set(targets))
        for m in targets:
            assert s in grid.stage1_sources(m)
        for d in range(P):
            m = grid.mid(s, d)
            assert 0 <= m < P
            assert m == s or m in targets                  # stage 1 reaches the forwarder
            assert m == d or d in grid.column(m)           # stage 2 reaches the destination
            assert grid.col(m) == grid.col(d)
    for m in range(P):
        for s in grid.stage1_sources(m):
            assert m in grid.stage1_targets(s)
        assert all(m in grid.column(x) for x in grid.column(m))


@pytest.mark.parametrize("P", [4, 9, 16, 25, 64, 100, 256, 1024])
def test_twolevel_requests_are_2p_sqrt_p_for_square_p(P):
    m = request_model(P, "twolevel")
    assert m["put"] + m["get"] == 2 * P * math.isqrt(P)


@pytest.mark.parametrize("P", range(2, 200))
def test_twolevel_within_the_target_asymptotically(P):
    m = request_model(P, "twolevel")
    # 2P*sqrt(P) exactly for squares; a short last row adds at most P requests.
    assert m["put"] + m["get"] <= 2 * P * math.sqrt(P) + P
    c = request_model(P, "combined")
    assert c == {"put": P, "get": P * (P - 1), "delete": P}
    assert request_model(P, "combined", tags=False)["get"] == 2 * P * (P - 1)


def test_auto_picks_by_price():
    assert cheapest_strategy(2, "requests") == "direct"
    assert [cheapest_strategy(P, "requests") for P in (3, 8, 16, 20)] == ["combined"] * 4
    assert [cheapest_strategy(P, "requests") for P in (21, 64, 1000)] == ["twolevel"] * 3
    assert cheapest_strategy(1000, "units") == "combined"   # bytes are billed there (DynamoDB)
    assert cheapest_strategy(1000, "none") == "direct"


@given(st.lists(st.integers(0, 36 ** 8 - 1), min_size=1, max_size=300))
def test_tag_roundtrip_and_key_parse(sizes):
    tag = encode_tag(sizes)
    assert decode_tag(tag) == sizes
    assert all(len(seg) <= 200 for seg in tag.split("/"))
    key = K.msg_key("job", "0123456789abcdef", 7, None, 3, group=K.row_group(2), tag=tag)
    mk = K.parse_msg_key(key)
    assert (mk.seq, mk.src, mk.dst, mk.group, mk.tag) == (7, 3, None, "h000002", tag)
    if tag_fits(len(key) - len(tag) - 8, len(sizes)):
        assert len(key) <= 1024


def test_slot_range_matches_header():
    sizes = [5, 0, 17, 3]
    header = combined_header(sizes)
    for i in range(4):
        assert parse_combined_header(header, 4, i, WHERE) == slot_range(sizes, i)
    with pytest.raises(cs.IntegrityError, match="bad header"):
        parse_combined_header(header, 5, 0, WHERE)
    with pytest.raises(cs.IntegrityError, match="checksum"):
        parse_combined_header(header[:20] + b"\xff" + header[21:], 4, 0, WHERE)


def test_pieces_roundtrip_and_corruption():
    bodies = [b"abc", b"", b"0123456789"]
    entries = [(0, 5, 3), (2, 5, 0), (7, 1, 10)]
    buf = pa.py_buffer(pieces_header(entries) + b"".join(bodies))
    got = parse_pieces(buf, WHERE)
    assert [(s, d, b.to_pybytes()) for s, d, b in got] == \
        [(s, d, body) for (s, d, _), body in zip(entries, bodies)]
    with pytest.raises(cs.IntegrityError, match="shorter"):
        parse_pieces(buf.slice(0, buf.size - 1), WHERE)
    with pytest.raises(cs.IntegrityError, match="longer"):
        parse_pieces(pa.py_buffer(buf.to_pybytes() + b"x"), WHERE)
    raw = bytearray(buf.to_pybytes())
    raw[20] ^= 1
    with pytest.raises(cs.IntegrityError, match="checksum"):
        parse_pieces(pa.py_buffer(bytes(raw)), WHERE)
    with pytest.raises(cs.IntegrityError, match="not a piece bundle"):
        parse_pieces(pa.py_buffer(b"x" * 40), WHERE)


def test_strategy_names_checked():
    with pytest.raises(cs.ConfigError, match="strategy"):
        request_model(4, "threelevel")
    with cs.open_store("memory://") as store, pytest.raises(cs.ConfigError, match="exchange"):
        cs.connect(store, job="j", rank=0, world_size=1, exchange="threelevel")
