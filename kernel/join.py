"""Distributed join: hash-shuffle both sides on the keys then join locally with Acero, or
broadcast the small side when that moves fewer bytes.

Null keys never match.  Rows whose keys are null cannot meet a partner, so they never travel:
they are dropped when the join would drop them and kept on their own rank otherwise.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import partition
from . import types as _types
from ._common import (KernelError, KeyTypeError, agreed_exchange, check_hashable, column_list,
                      exchange_many, preflight)

__all__ = ["join", "local_join", "BROADCAST_THRESHOLD"]

#: Never broadcast a side larger than this in total (every rank holds all of it).
BROADCAST_THRESHOLD = int(os.environ.get("CYLON_STORE_BROADCAST_THRESHOLD", 64 << 20))
#: Broadcast while small * (P - 1) <= BROADCAST_RATIO * large.  Bytes alone would say 1.0 (an
#: allgather moves S(P-1), a shuffle (L+S)(P-1)/P), but every rank then builds the hash table of
#: the whole small side: measured on 4 ranks (BENCHMARKS.md, kernel section, --sweep), the two
#: break even around S/L = 0.07-0.08 (4 sweeps: shuffle 0.84-0.97x the broadcast time at 0.1,
#: 0.98-1.25x at 0.07, 1.17-1.4x at 0.05), i.e. S(P-1)/L = 0.25; broadcasting wins up to 2x
#: below, loses up to 2x above.  (0.3 before the shuffle path got cheaper hashing and a
#: copy-free two-table exchange.)
BROADCAST_RATIO = float(os.environ.get("CYLON_STORE_BROADCAST_RATIO", 0.25))

_HOW = {"inner": "inner", "left": "left outer", "right": "right outer", "outer": "full outer",
        "semi": "left semi", "anti": "left anti"}
# Sides whose unmatched rows are part of the result (their null-key rows stay home).
_KEEPS = {"inner": (False, False), "left": (True, False), "right": (False, True),
          "outer": (True, True), "semi": (False, False), "anti": (True, False)}
# Which side may be broadcast without duplicating unmatched rows.
_BROADCASTABLE = {"inner": ("left", "right"), "left": ("right",), "right": ("left",),
                  "outer": (), "semi": ("right",), "anti": ("right",)}
_RIGHT_TMP = "__cylon_right_{}"


def _key_names(on, left_on, right_on):
    if on is not None and (left_on is not None or right_on is not None):
        raise KernelError("join: pass either on=... or left_on=/right_on=..., not both")
    if on is not None:
        return on, on
    if left_on is None or right_on is None:
        raise KernelError("join: no keys: pass on=... or both left_on= and right_on=")
    return left_on, right_on


def _common_type(lt: pa.DataType, rt: pa.DataType, lname: str, rname: str) -> pa.DataType:
    if lt == rt:
        return lt
    if pa.types.is_dictionary(lt) or pa.types.is_dictionary(rt):
        return _common_type(lt.value_type if pa.types.is_dictionary(lt) else lt,
                            rt.value_type if pa.types.is_dictionary(rt) else rt, lname, rname)
    if _types.compute_type(lt) != lt or _types.compute_type(rt) != rt:
        # views: pyarrow unifies none with another type; their large variants it does
        return _common_type(_types.compute_type(lt), _types.compute_type(rt), lname, rname)
    try:
        unified = pa.unify_schemas([pa.schema([("k", lt)]), pa.schema([("k", rt)])],
                                   promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        unified = None
    numeric = lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)  # noqa: E731
    textual = lambda t: (pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
                         or t == pa.string_view())
    binary = lambda t: (pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
                        or t == pa.binary_view())
    same_family = ((numeric(lt) and numeric(rt)) or (textual(lt) and textual(rt))
                   or (binary(lt) and binary(rt))
                   or (pa.types.is_timestamp(lt) and pa.types.is_timestamp(rt))
                   or (pa.types.is_decimal(lt) and pa.types.is_decimal(rt))
                   or (pa.types.is_temporal(lt) and pa.types.is_temporal(rt)
                       and type(lt) is type(rt)))
    if unified is None or not same_family:
        raise KeyTypeError(f"join: key {lname!r} ({lt}) and key {rname!r} ({rt}) have incompatible "
                           f"types; cast one side first")
    t = unified.field("k").type
    if t == pa.string_view():
        t = pa.large_string()
    return t


def _cast_keys(table: pa.Table, names: Sequence[str], types: Sequence[pa.DataType], side: str):
    for name, t in zip(names, types):
        i = table.schema.get_field_index(name)
        if table.schema.field(i).type != t:
            try:
                table = table.set_column(i, name, _types.cast(table.column(i), t))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise KeyTypeError(f"join: {side} key {name!r} cannot be cast to {t}: {exc}") from exc
    return table


# Payload types Acero's hash join cannot carry: those columns travel as row indices instead.
_PAYLOAD_OK: dict[pa.DataType, bool] = {}


def _payload_ok(t: pa.DataType) -> bool:
    ok = _PAYLOAD_OK.get(t)
    if ok is None:
        if pa.types.is_null(t):
            ok = False
        else:
            try:
                e = pa.table({"k": pa.array([], pa.int8()), "v": pa.array([], t)})
                e.join(pa.table({"k": pa.array([], pa.int8())}), "k")
                ok = True
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
                ok = False
        _PAYLOAD_OK[t] = ok
    return ok


def _output_names(left: pa.Schema, right: pa.Schema, lk, rk, how, suffixes):
    """Names of the result columns: left's, then right's, merged keys once, overlapping names
    suffixed (pandas' rule: suffixes only where names collide)."""
    merged = {r for l, r in zip(lk, rk) if l == r}
    lnames = list(left.names)
    rnames = [] if how in ("semi", "anti") else [n for n in right.names if n not in merged]
    overlap = set(lnames) & set(rnames)
    ls, rs = suffixes
    out_l = [n + ls if n in overlap else n for n in lnames]
    out_r = [n + rs if n in overlap else n for n in rnames]
    names = out_l + out_r
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise KernelError(f"join: the result would have duplicate column names {dup}; choose "
                          f"other suffixes than {tuple(suffixes)!r}")
    return out_l, rnames, out_r


def local_join(left: pa.Table, right: pa.Table, lk: Sequence[str], rk: Sequence[str], how: str,
               suffixes=("", "_right"), *, use_threads: bool = True) -> pa.Table:
    """Single-process join with this module's semantics (keys already of equal types).

    Columns of types Acero cannot take (views, also nested) join as their equivalent
    (``_types.join_type``) and come back in their own type."""
    L, R = _types.to_join(left), _types.to_join(right)
    out = _local_join(L, R, lk, rk, how, suffixes, use_threads=use_threads)
    if L is left and R is right:
        return out
    merged = {r for l, r in zip(lk, rk) if l == r}
    rnames = [] if how in ("semi", "anti") else [n for n in right.column_names if n not in merged]
    return _types.restore(out, list(left.schema.types)
                         + [right.schema.field(n).type for n in rnames])


def _local_join(left: pa.Table, right: pa.Table, lk: Sequence[str], rk: Sequence[str], how: str,
                suffixes=("", "_right"), *, use_threads: bool = True) -> pa.Table:
    out_l, rnames, out_r = _output_names(left.schema, right.schema, lk, rk, how, suffixes)
    # Acero renames on collisions by its own rules: give it names that cannot collide, and carry
    # columns it cannot hold (lists, structs, maps) as row numbers gathered afterwards.
    carry_l = [n for n in left.column_names
               if n not in lk and not _payload_ok(left.schema.field(n).type)]
    carry_r = [n for n in rnames
               if n not in rk and not _payload_ok(right.schema.field(n).type)]
    L = left
    if carry_l:
        L = L.drop_columns(carry_l).append_column("__cylon_lrow", pa.array(np.arange(left.num_rows)))
    r_cols = list(dict.fromkeys(list(rk) + [n for n in rnames if n not in carry_r]))
    R = right.select(r_cols)
    if carry_r:
        R = R.append_column("__cylon_rrow", pa.array(np.arange(right.num_rows)))
    tmp = {n: _RIGHT_TMP.format(i) for i, n in enumerate(R.column_names)}
    R = R.rename_columns([tmp[n] for n in R.column_names])
    joined = L.join(R, keys=list(lk), right_keys=[tmp[n] for n in rk], join_type=_HOW[how],
                    coalesce_keys=False, use_threads=use_threads)
    cols, names = [], []
    lrow = joined.column("__cylon_lrow") if carry_l else None
    rrow = joined.column(tmp["__cylon_rrow"]) if carry_r else None
    merged = {l: r for l, r in zip(lk, rk) if l == r}
    for n, out in zip(left.column_names, out_l):
        if n in carry_l:
            col = left.column(n).take(lrow)
        else:
            col = joined.column(n)
            if n in merged and how in ("right", "outer"):
                col = pc.coalesce(col, joined.column(tmp[merged[n]]))
        cols.append(col)
        names.append(out)
    for n, out in zip(rnames, out_r):
        cols.append(right.column(n).take(rrow) if n in carry_r else joined.column(tmp[n]))
        names.append(out)
    return pa.Table.from_arrays(cols, names=names)


def _null_key_mask(table: pa.Table, keys: Sequence[str]) -> Optional[np.ndarray]:
    mask = None
    for k in keys:
        col = table.column(k)
        if col.null_count:
            m = col.is_null().to_numpy(zero_copy_only=False)
            mask = m if mask is None else (mask | m)
    return mask


def _drop_null_keys(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    mask = _null_key_mask(table, keys)
    if mask is None or not mask.any():
        return table
    return _types.filter_table(table, pa.array(~mask))


def _split_side(comm, table: pa.Table, keys: Sequence[str], keep_nulls: bool) -> list[pa.Table]:
    P = comm.world_size
    if not keep_nulls:
        table = _drop_null_keys(table, keys)
        dest = partition.destinations(partition.hash_columns(table, keys), P)
    else:
        dest = partition.destinations(partition.hash_columns(table, keys), P)
        mask = _null_key_mask(table, keys)
        if mask is not None:
            dest[mask] = comm.rank  # they match nothing: keep them here
    return partition.split_by_destination(table, dest, P)


def join(comm, left, right, on=None, how: str = "inner", left_on=None, right_on=None,
         suffixes=("", "_right"), *, broadcast="auto",
         broadcast_threshold: Optional[int] = None) -> pa.Table:
    """Join this rank's ``left`` and ``right`` with every other rank's; return this rank's part.

    ``how``: inner, left, right, outer, semi (left rows with a match), anti (without).  Key
    columns of the same name appear once (coalesced for right/outer joins); other overlapping
    names get ``suffixes``.  ``broadcast``: "auto" (default: the small side is broadcast when its
    total size is under ``broadcast_threshold`` bytes and small * (P-1) <= BROADCAST_RATIO * large,
    the measured break-even), True (broadcast whenever ``how`` allows it) or False (always
    shuffle).
    """
    threshold = BROADCAST_THRESHOLD if broadcast_threshold is None else int(broadcast_threshold)
    args = (on, how, left_on, right_on, tuple(suffixes) if isinstance(suffixes, (list, tuple))
            else suffixes, broadcast, threshold)

    def prepare(tables):
        L, R = tables
        if how not in _HOW:
            raise KernelError(f"join: how must be one of {list(_HOW)}, got {how!r}")
        if broadcast not in ("auto", True, False):
            raise KernelError(f"join: broadcast must be 'auto', True or False, got {broadcast!r}")
        if (not isinstance(suffixes, (list, tuple)) or len(suffixes) != 2
                or not all(isinstance(s, str) for s in suffixes)):
            raise KernelError(f"join: suffixes must be two strings, got {suffixes!r}")
        lon, ron = _key_names(on, left_on, right_on)
        lk = column_list(lon, L.schema, "join (left keys)")
        rk = column_list(ron, R.schema, "join (right keys)")
        if len(lk) != len(rk):
            raise KernelError(f"join: {len(lk)} left keys {lk} but {len(rk)} right keys {rk}")
        check_hashable(L.schema, lk, "join (left keys)")
        check_hashable(R.schema, rk, "join (right keys)")
        types = [_common_type(L.schema.field(a).type, R.schema.field(b).type, a, b)
                 for a, b in zip(lk, rk)]
        L = _cast_keys(L, lk, types, "left")
        R = _cast_keys(R, rk, types, "right")
        try:  # every schema-level problem of the local join shows up on empty tables
            local_join(L.schema.empty_table(), R.schema.empty_table(), lk, rk, how, suffixes)
        except KernelError:
            raise
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise KeyTypeError(f"join: {exc}") from exc
        if broadcast is True and not _BROADCASTABLE[how]:
            raise KernelError(f"join: a {how} join cannot broadcast either side; use "
                              f"broadcast='auto' or False")
        return (L, R, lk, rk), None

    P = comm.world_size
    allowed = _BROADCASTABLE.get(how, ())
    keep_l, keep_r = _KEEPS.get(how, (True, True))
    if broadcast is True:
        # The side must be the smaller in total: sizes are agreed first (two rounds).
        pf = preflight(comm, "join", [("left", left), ("right", right)], args, prepare)
        L, R, lk, rk = pf.local
        if P == 1:
            return local_join(L, R, lk, rk, how, suffixes)
        side = _choose_broadcast(how, pf.total_bytes(0), pf.total_bytes(1), P, broadcast,
                                 threshold)
        if side == "right":
            R = pa.concat_tables(comm.allgather(_drop_null_keys(R, rk)))
        else:
            L = pa.concat_tables(comm.allgather(_drop_null_keys(L, lk)))
        return local_join(L, R, lk, rk, how, suffixes)

    # One round: each rank picks a shuffle or a broadcast from its own sizes (as if every rank
    # held as much as it does) and sends accordingly; the choices travel with the data.  When
    # all ranks chose alike, that is the join (any uniform choice is correct; the sizes only
    # make it fast).  When they differ (skewed sizes), a second exchange completes a shuffle.
    def split(local, tables):
        L, R, lk, rk = local
        if P == 1:
            return [[L], [R]]
        choice = (None if broadcast is False or not allowed else
                  _choose_broadcast(how, L.nbytes * P, R.nbytes * P, P, broadcast, threshold))
        if choice == "right":
            small = _drop_null_keys(R, rk)
            return [[L if d == comm.rank else L.slice(0, 0) for d in range(P)], [small] * P]
        if choice == "left":
            small = _drop_null_keys(L, lk)
            return [[small] * P, [R if d == comm.rank else R.slice(0, 0) for d in range(P)]]
        return [_split_side(comm, L, lk, keep_l), _split_side(comm, R, rk, keep_r)]

    def prepare_with_choice(tables):
        local, _ = prepare(tables)
        L, R = local[0], local[1]
        choice = (None if broadcast is False or not allowed or P == 1 else
                  _choose_broadcast(how, L.nbytes * P, R.nbytes * P, P, broadcast, threshold))
        return local, (choice or "shuffle").encode()

    ag = agreed_exchange(comm, "join", [("left", left), ("right", right)], args,
                         prepare_with_choice, split)
    L, R, lk, rk = ag.local
    if P == 1:
        return local_join(L, R, lk, rk, how, suffixes)
    # A rank that passed None has no rows: its choice does not matter.
    choices = [c.decode() if c is not None and rows else None
               for c, rows in zip(ag.payloads, (a + b for a, b in zip(ag.rows[0], ag.rows[1])))]
    chosen = {c for c in choices if c is not None}
    if len(chosen) <= 1:
        return local_join(ag.received[0], ag.received[1], lk, rk, how, suffixes)
    L, R = _complete_shuffle(comm, ag, choices, L, R, lk, rk, keep_l, keep_r)
    return local_join(L, R, lk, rk, how, suffixes)


def _complete_shuffle(comm, ag, choices, L, R, lk, rk, keep_l, keep_r):
    """Ranks chose differently: turn what moved into a shuffle join's inputs.  A rank that
    broadcast one side kept the other at home: it sends it hashed now (one more exchange);
    from a side a rank broadcast, every rank keeps the rows that hash to it."""
    me, P = comm.rank, comm.world_size
    empty_l = [L.slice(0, 0)] * P
    empty_r = [R.slice(0, 0)] * P
    later_l = _split_side(comm, L, lk, keep_l) if choices[me] == "right" else empty_l
    later_r = _split_side(comm, R, rk, keep_r) if choices[me] == "left" else empty_r
    late_l, late_r = exchange_many(comm, [later_l, later_r])
    lefts, rights = [late_l], [late_r]
    for s in range(P):
        got_l, got_r = ag.pieces[0][s], ag.pieces[1][s]
        if choices[s] == "shuffle":
            lefts.append(got_l)
            rights.append(got_r)
        elif choices[s] == "left":   # s sent its whole left side to everyone
            lefts.append(_rows_for(got_l, lk, me, P))
        elif choices[s] == "right":
            rights.append(_rows_for(got_r, rk, me, P))
    lefts = [t for t in lefts if t is not None]
    rights = [t for t in rights if t is not None]
    return pa.concat_tables(lefts), pa.concat_tables(rights)


def _rows_for(table: Optional[pa.Table], keys, rank: int, P: int) -> Optional[pa.Table]:
    """The rows of ``table`` (no null keys) that hash to ``rank``."""
    if table is None or table.num_rows == 0:
        return table
    dest = partition.destinations(partition.hash_columns(table, keys), P)
    return table.filter(pa.array(dest == rank))


def _choose_broadcast(how, left_bytes, right_bytes, P, broadcast, threshold) -> Optional[str]:
    """Which side to broadcast, or None for a shuffle join; the same on every rank."""
    allowed = _BROADCASTABLE[how]
    if broadcast is False or not allowed:
        return None
    sizes = {"left": left_bytes, "right": right_bytes}
    side = min(allowed, key=lambda s: (sizes[s], s))
    if broadcast is True:
        return side
    other = right_bytes if side == "left" else left_bytes
    if sizes[side] <= threshold and sizes[side] * (P - 1) <= BROADCAST_RATIO * other:
        return side
    return None
