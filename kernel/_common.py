"""What every operator shares: its errors, argument checks, and the collective agreement.

Every rank checks its inputs and arguments locally, then all ranks agree on the verdict from
the same records (error, schemas, row counts, sizes, an optional payload such as sort samples,
and a fingerprint of the arguments), so either every rank raises the same error or none does,
and no rank is ever left waiting in an exchange that another rank skipped.

The records travel inside the operator's own data exchange (``agreed_exchange``: in the schema
metadata of each part, so a join, groupby, shuffle, unique or set operation is one round), or
in an allgather before it (``preflight``) where the data's destinations depend on every rank's
answer: the sort's samples, the repartition's row counts, the join's broadcast decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import msgpack
import pyarrow as pa

from ..errors import ConfigError
from . import partition

__all__ = ["KernelError", "ColumnNotFoundError", "KeyTypeError", "UnsupportedAggregationError",
           "RankMismatchError", "preflight", "Preflight", "agreed_exchange", "Agreed", "column_list",
           "exchange_tables"]


class KernelError(ConfigError):
    """Bad input to a distributed operator; raised on every rank alike (also a ``ValueError``)."""


class ColumnNotFoundError(KernelError, KeyError):
    """A column named in the arguments is not in the table."""


class KeyTypeError(KernelError, TypeError):
    """Key columns of a type that cannot be used, or join keys of incompatible types."""


class UnsupportedAggregationError(KernelError):
    """An aggregation that is unknown, or not defined for the column's type."""


class RankMismatchError(KernelError):
    """Ranks called the same operator with different arguments or table schemas."""


_ERRORS = {c.__name__: c for c in (KernelError, ColumnNotFoundError, KeyTypeError,
                                   UnsupportedAggregationError, RankMismatchError)}


def as_input(table: Any, what: str) -> Optional[pa.Table]:
    """A Table (RecordBatch accepted), or None for "this rank has no rows"."""
    if table is None or isinstance(table, pa.Table):
        return table
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    raise KernelError(f"{what} must be a pyarrow Table or RecordBatch (or None for no rows), got "
                      f"{type(table).__name__}")


def column_list(cols, schema: pa.Schema, what: str, *, allow_empty: bool = False) -> list[str]:
    """Normalise a column name or list of names and check each exists exactly once."""
    if isinstance(cols, str):
        cols = [cols]
    elif cols is None:
        raise KernelError(f"{what}: no columns given")
    else:
        try:
            cols = list(cols)
        except TypeError:
            raise KernelError(f"{what}: expected a column name or a list of names, got "
                              f"{type(cols).__name__}") from None
    for c in cols:
        if not isinstance(c, str):
            raise KernelError(f"{what}: column names are strings, got {c!r}")
    if not cols and not allow_empty:
        raise KernelError(f"{what}: no columns given")
    if len(set(cols)) != len(cols):
        raise KernelError(f"{what}: a column is named twice in {cols}")
    names = schema.names
    for c in cols:
        n = names.count(c)
        if n == 0:
            raise ColumnNotFoundError(f"{what}: unknown column {c!r}; the table has "
                                      f"{names}")
        if n > 1:
            raise KernelError(f"{what}: column {c!r} appears {n} times in the table; names must "
                              f"be unique to be used as keys")
    return cols


def check_hashable(schema: pa.Schema, cols: Sequence[str], what: str) -> None:
    for c in cols:
        t = schema.field(c).type
        if not partition.hashable_type(t):
            raise KeyTypeError(f"{what}: column {c!r} of type {t} cannot be a key (supported: "
                               f"integers, floats, decimals, booleans, strings, binary, dates, "
                               f"times, timestamps, durations, dictionaries and structs of these)")


def _schema_bytes(schema: Optional[pa.Schema]) -> Optional[bytes]:
    return None if schema is None else schema.serialize().to_pybytes()


def _schema_from(b: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(b))


def table_to_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(b: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(b)).read_all()


@dataclass
class Preflight:
    """What every rank knows after the preflight: per input, the agreed schema and each rank's
    row count and size; each rank's payload; and this rank's (possibly deferred) local result."""

    schemas: list[pa.Schema]
    rows: list[list[int]]     # rows[i][r]: rows of input i on rank r
    nbytes: list[list[int]]
    payloads: list[Optional[bytes]]
    tables: list[pa.Table]    # this rank's inputs (None replaced by an empty table)
    local: Any                # what ``prepare`` returned on this rank

    def total_rows(self, i: int = 0) -> int:
        return sum(self.rows[i])

    def total_bytes(self, i: int = 0) -> int:
        return sum(self.nbytes[i])


def preflight(comm, op: str, inputs: Sequence[tuple[str, Any]], args: Any = None,
              prepare: Optional[Callable[[list[pa.Table]], tuple[Any, Optional[bytes]]]] = None
              ) -> Preflight:
    """Check and prepare this rank's inputs, then agree collectively.

    ``prepare(tables)`` validates the arguments against the schemas and does the local work that
    could fail on data (casts, pre-aggregation, sampling); it returns (local result, payload).
    It runs before the allgather, so a failure on any rank is reported to all.  A rank that
    passed None for an input runs it after the allgather on empty tables of the agreed schema.
    """
    fingerprint = repr((op, partition.HASH_VERSION, args))
    error: Optional[BaseException] = None
    tables: list[Optional[pa.Table]] = []
    local, payload = None, None
    try:
        tables = [as_input(t, f"{op}: {name}") for name, t in inputs]
        if prepare is not None and all(t is not None for t in tables):
            local, payload = prepare(tables)
    except Exception as exc:  # reported to every rank below
        error = exc
    P = comm.world_size
    n_in = len(inputs)
    if P == 1:
        if isinstance(error, KernelError):
            raise error
        if error is not None:
            raise KernelError(f"{op}: {type(error).__name__}: {error}") from error
        ready = [t for t in tables if t is not None]
        if len(ready) < len(tables):
            missing = [inputs[i][0] for i, t in enumerate(tables) if t is None]
            raise KernelError(f"{op}: no rank passed a table for {missing}")
        return Preflight([t.schema for t in ready], [[t.num_rows] for t in ready],
                         [[t.nbytes] for t in ready], [payload], ready, local)

    row = {
        "args": pa.array([fingerprint], pa.string()),
        "error_kind": pa.array([None if error is None else _kind(error)], pa.string()),
        "error_msg": pa.array([None if error is None else _message(error)], pa.string()),
        "payload": pa.array([payload], pa.binary()),
    }
    for i in range(n_in):
        t = tables[i] if i < len(tables) else None
        row[f"schema{i}"] = pa.array([_schema_bytes(t.schema if t is not None else None)], pa.binary())
        row[f"rows{i}"] = pa.array([t.num_rows if t is not None else 0], pa.int64())
        row[f"bytes{i}"] = pa.array([t.nbytes if t is not None else 0], pa.int64())
    gathered = pa.concat_tables(comm.allgather(pa.table(row))).to_pydict()
    schemas = _verdict(comm, op, inputs, gathered, error)
    if any(t is None for t in tables):
        tables = [t if t is not None else schemas[i].empty_table() for i, t in enumerate(tables)]
        if prepare is not None:
            local, payload = prepare(tables)
    return Preflight(schemas,
                     [gathered[f"rows{i}"] for i in range(n_in)],
                     [gathered[f"bytes{i}"] for i in range(n_in)],
                     gathered["payload"], tables, local)


#: Schema metadata key of the agreement record a part carries (``agreed_exchange``).
AGREE_KEY = b"cylon.agree"


@dataclass
class Agreed(Preflight):
    """A ``Preflight`` whose records came with the data: ``received[i]`` is this rank's share
    of exchanged table i (every rank's part for it, in source-rank order)."""

    received: list[pa.Table]
    #: pieces[i][s]: what rank s sent this rank of table i (None: s passed None or failed).
    pieces: list[list[Optional[pa.Table]]]


def agreed_exchange(comm, op: str, inputs: Sequence[tuple[str, Any]], args: Any,
                    prepare: Callable[[list[pa.Table]], tuple[Any, Optional[bytes]]],
                    split: Callable[[Any, list[pa.Table]], list[list[pa.Table]]]) -> Agreed:
    """Check and prepare this rank's inputs, then move them in one exchange that also carries
    every rank's agreement record: the same verdict as ``preflight`` on every rank, without its
    round.

    ``split(local, tables)``: per table to exchange, its part for each rank (several tables
    travel nested in one exchange, see ``_nest``).  A rank whose checks failed, or that passed
    None for an input, sends its record alone (a table without columns); after the verdict,
    a rank that passed None prepares and splits empty tables of the agreed schemas, so its
    share has the right schema even when no rank sent rows.  ``world_size == 1``: the checks
    only, ``received`` is the split's own part.
    """
    me, P = comm.rank, comm.world_size
    if P == 1:
        pf = preflight(comm, op, inputs, args, prepare)
        own = [parts[0] for parts in split(pf.local, pf.tables)]
        return Agreed(pf.schemas, pf.rows, pf.nbytes, pf.payloads, pf.tables, pf.local, own,
                      [[t] for t in own])
    fingerprint = repr((op, partition.HASH_VERSION, args))
    error: Optional[BaseException] = None
    tables: list[Optional[pa.Table]] = []
    local, payload, parts = None, None, None
    try:
        tables = [as_input(t, f"{op}: {name}") for name, t in inputs]
        if all(t is not None for t in tables):
            local, payload = prepare(tables)
            parts = split(local, tables)    
    except Exception as exc:  # reported to every rank below
        error, parts = exc, None
    given = tables + [None] * (len(inputs) - len(tables))
    record = msgpack.packb({
        "args": fingerprint,
        "error_kind": None if error is None else _kind(error),
        "error_msg": None if error is None else _message(error),
        "payload": payload,
        "schemas": [_schema_bytes(t.schema if t is not None else None) for t in given],
        "rows": [t.num_rows if t is not None else 0 for t in given],
        "bytes": [t.nbytes if t is not None else 0 for t in given],
    })
    if parts is None:
        wire = [pa.table({}) for _ in range(P)]
    elif len(parts) == 1:
        wire = list(parts[0])
    else:
        wire = [_nest([p[d].slice(0, 0) if d == me else p[d] for p in parts]) for d in range(P)]
    wire = [_with_record(t, record) for t in wire]
    received = comm.exchange(wire, check_schemas=False)
    records = []
    for r in range(P):
        meta = {AGREE_KEY: record} if r == me else (received[r].schema.metadata or {})
        if AGREE_KEY not in meta:
            raise KernelError(f"{op}: rank {r} sent data without its agreement record (a rank "
                              f"running another version of cylon-store?)")
        records.append(msgpack.unpackb(meta[AGREE_KEY]))
    gathered: dict[str, list] = {k: [rec[k] for rec in records]
                                 for k in ("args", "error_kind", "error_msg", "payload")}
    for i in range(len(inputs)):
        gathered[f"schema{i}"] = [rec["schemas"][i] for rec in records]
        gathered[f"rows{i}"] = [rec["rows"][i] for rec in records]
        gathered[f"bytes{i}"] = [rec["bytes"][i] for rec in records]
    schemas = _verdict(comm, op, inputs, gathered, error)
    if any(t is None for t in tables):
        tables = [t if t is not None else schemas[i].empty_table() for i, t in enumerate(tables)]
        local, payload = prepare(tables)
        parts = split(local, tables)
    assert parts is not None
    k = len(parts)

    def unpack(t: pa.Table, i: int, schema: pa.Schema) -> Optional[pa.Table]:
        if t.num_columns == 0:
            return None   # a rank that passed None: no rows
        if k == 1:
            return _without_record(t)
        got = _unnest(t, i, schema)
        return got[0] if len(got) == 1 else pa.concat_tables(got) if got else schema.empty_table()

    by_source = [[p[me] if s == me else unpack(received[s], i, p[me].schema) for s in range(P)]
                 for i, p in enumerate(parts)]
    # A rank that passed None for one input but rows for another could not split them before
    # it knew the missing input's schema: it sends them now, in a second exchange.
    late = [r for r in range(P)
            if received[r].num_columns == 0 and any(gathered[f"rows{i}"][r] for i in range(len(inputs)))]
    if late:
        out = parts if me in late else [[t.slice(0, 0) for t in p] for p in parts]
        wire = out[0] if k == 1 else [_nest([p[d].slice(0, 0) if d == me else p[d] for p in out])
                                      for d in range(P)]
        again = comm.exchange(wire)
        for i, p in enumerate(parts):
            for r in late:
                by_source[i][r] = p[me] if r == me else unpack(again[r], i, p[me].schema)
    shares = []
    for pieces in by_source:
        present = [t for t in pieces if t is not None]
        shares.append(pa.concat_tables(present) if len(present) > 1 else present[0])
    return Agreed(schemas,
                  [gathered[f"rows{i}"] for i in range(len(inputs))],
                  [gathered[f"bytes{i}"] for i in range(len(inputs))],
                  gathered["payload"], tables, local, shares, by_source)


def _with_record(table: pa.Table, record: bytes) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), AGREE_KEY: record})


def _without_record(table: pa.Table) -> pa.Table:
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != AGREE_KEY}
    return table.replace_schema_metadata(meta or None)


def _verdict(comm, op, inputs, gathered, error: Optional[BaseException]) -> list[pa.Schema]:
    """``_agree``; on a failed verdict every rank raises, after a barrier: every rank has then
    read what it was sent (a rank that leaves a ``with connect(...)`` block on an error removes
    what it wrote)."""
    try:
        return _agree(op, inputs, gathered, comm.world_size)
    except KernelError as exc:
        comm.barrier()
        if error is not None:
            raise exc from error
        raise


def _agree(op, inputs, gathered, P) -> list[pa.Schema]:
    """The collective verdict from the gathered rows: the first rank's error, different
    arguments or schemas between ranks; else the agreed schema of each input."""
    failed = [r for r in range(P) if gathered["error_kind"][r] is not None]
    if failed:
        r = failed[0]
        cls = _ERRORS.get(gathered["error_kind"][r], KernelError)
        raise cls(f"{gathered['error_msg'][r]} (raised on rank {r} of {P}; every rank raises it)")
    if len(set(gathered["args"])) != 1:
        bad = [r for r in range(P) if gathered["args"][r] != gathered["args"][0]]
        raise RankMismatchError(f"{op}: ranks {bad} were called with different arguments than "
                                f"rank 0: {gathered['args'][0]} vs {gathered['args'][bad[0]]}")
    schemas = []
    for i in range(len(inputs)):
        ref, ref_rank = None, None
        for r in range(P):
            b = gathered[f"schema{i}"][r]
            if b is None:
                continue
            s = _schema_from(b)
            if ref is None:
                ref, ref_rank = s, r
            elif not s.equals(ref, check_metadata=False):
                raise RankMismatchError(
                    f"{op}: the {inputs[i][0]} tables of rank {ref_rank} and rank {r} have "
                    f"different schemas:\nrank {ref_rank}: {ref}\nrank {r}: {s}")
        if ref is None:
            raise KernelError(f"{op}: no rank passed a table for {inputs[i][0]}")
        schemas.append(ref)
    return schemas


def _kind(exc: BaseException) -> str:
    return type(exc).__name__ if type(exc).__name__ in _ERRORS else "KernelError"


def _message(exc: BaseException) -> str:
    if isinstance(exc, KernelError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def exchange_tables(comm, parts: list[pa.Table]) -> pa.Table:
    """All-to-all of ``parts`` (one per destination), concatenated in source-rank order."""
    if comm.world_size == 1:
        return parts[0]
    received = comm.exchange(parts)
    return pa.concat_tables(received)


_NESTED = "__cylon_t{}"


def _nest(tables: list[pa.Table]) -> pa.Table:
    """One row holding each table whole: column i is a large_list<struct<table i's columns>>
    with one element per row of table i.  Zero-copy (the struct's children are the tables' own
    arrays, slices included), and the schema depends only on the tables' schemas, so the packs
    of all destinations share it and travel in one ordinary exchange."""
    cols = []
    for t in tables:
        arrays = [c.chunk(0) if c.num_chunks == 1 else
                  c.combine_chunks() if c.num_chunks else pa.nulls(0, c.type) for c in t.columns]
        rows = pa.StructArray.from_arrays(arrays, fields=[f.remove_metadata() for f in t.schema])
        cols.append(pa.LargeListArray.from_arrays(pa.array([0, t.num_rows], pa.int64()), rows))
    return pa.Table.from_arrays(cols, names=[_NESTED.format(i) for i in range(len(tables))])


def _unnest(packed: pa.Table, i: int, schema: pa.Schema) -> list[pa.Table]:
    """Table i of a pack from ``_nest`` (its chunks, zero-copy), with ``schema``."""
    out = []
    for chunk in packed.column(_NESTED.format(i)).chunks:
        if len(chunk) == 0:
            continue
        lo, hi = chunk.offsets[0].as_py(), chunk.offsets[len(chunk)].as_py()
        rows = chunk.values.slice(lo, hi - lo)
        out.append(pa.Table.from_arrays(rows.flatten(), schema=schema))
    return out


def _nestable(schema: pa.Schema) -> bool:
    return len(schema) > 0


def exchange_many(comm, parts_per_table: list[list[pa.Table]]) -> list[pa.Table]:
    """Several all-to-alls of tables with different schemas in one exchange round.

    Each destination gets one table of one row whose column i holds its part of table i as a
    list of structs (``_nest``): no serialisation or copy beyond the exchange's own, and one
    round trip instead of one per table (what a join of two tables needs).  Measured on 4
    ranks, 10M x 1M join parts: 0.05-0.12 s against 0.09-0.39 s for an Arrow IPC stream per
    table inside a binary column, and 0.06-0.17 s for two exchanges.  Rows stay in source-rank
    order, as with ``exchange_tables``.
    """
    me, P = comm.rank, comm.world_size
    if P == 1:
        return [parts[0] for parts in parts_per_table]
    schemas = [parts[me].schema for parts in parts_per_table]
    if not all(_nestable(s) for s in schemas):
        return [exchange_tables(comm, parts) for parts in parts_per_table]
    packed = [_nest([parts[d].slice(0, 0) if d == me else parts[d] for parts in parts_per_table])
              for d in range(P)]
    received = comm.exchange(packed)
    out = []
    for i, parts in enumerate(parts_per_table):
        tables = []
        for s in range(P):
            if s == me:
                tables.append(parts[me])
            else:
                tables.extend(_unnest(received[s], i, schemas[i]))
        out.append(pa.concat_tables(tables))
    return out
