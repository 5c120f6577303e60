"""What every operator shares: its errors, argument checks, and the collective preflight.

The preflight is one allgather of a one-row table per rank (error, schemas, row counts, sizes,
an optional payload such as sort samples, and a fingerprint of the arguments).  Every rank
decides from the same gathered rows, so either every rank raises the same error or none does,
and no rank is ever left waiting in an exchange that another rank skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa

from ..errors import ConfigError
from . import partition

__all__ = ["KernelError", "ColumnNotFoundError", "KeyTypeError", "UnsupportedAggregationError",
           "RankMismatchError", "preflight", "Preflight", "column_list", "exchange_tables"]


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

    try:
        schemas = _agree(op, inputs, gathered, P)
    except KernelError as exc:
        # Every rank raises.  First make sure every rank has read the gathered rows: a rank that
        # leaves a ``with connect(...)`` block on an error removes what it wrote.
        comm.barrier()
        if error is not None:
            raise exc from error
        raise
    if any(t is None for t in tables):
        tables = [t if t is not None else schemas[i].empty_table() for i, t in enumerate(tables)]
        if prepare is not None:
            local, payload = prepare(tables)
    return Preflight(schemas,
                     [gathered[f"rows{i}"] for i in range(n_in)],
                     [gathered[f"bytes{i}"] for i in range(n_in)],
                     gathered["payload"], tables, local)


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
        arrays = [c.chunk(0) if c.num_chunks == 1 else c.combine_chunks() for c in t.columns]
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
