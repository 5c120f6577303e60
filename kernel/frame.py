"""A thin pycylon-style DataFrame: one rank's part of a distributed table plus its Communicator,
with the method names Cylon and pandas users know.  Every method is a kernel operator."""

from __future__ import annotations

from typing import Optional, Sequence

import pyarrow as pa

from ._common import KernelError
from .groupby import groupby as _groupby
from .join import join as _join
from .setops import difference, intersect, union, unique
from .shuffle import repartition, shuffle
from .sort import sort as _sort

__all__ = ["DataFrame", "GroupBy"]


class DataFrame:
    """``cs.DataFrame(comm, table)``: this rank's ``table`` as part of a distributed frame.

    Methods are collective: every rank calls them in the same order, as with MPI.
    """

    def __init__(self, comm, table):
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise KernelError(f"DataFrame needs a pyarrow Table, got {type(table).__name__}")
        self.comm = comm
        self._table = table

    # -- local views --------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        """This rank's rows."""
        return self._table

    to_arrow = to_table

    def to_pandas(self):
        return self._table.to_pandas()

    @property
    def columns(self) -> list[str]:
        return self._table.column_names

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    def __len__(self) -> int:
        return self._table.num_rows

    def __repr__(self):
        return (f"DataFrame(rank={self.comm.rank}/{self.comm.world_size}, "
                f"rows={self._table.num_rows}, columns={self.columns})")

    def _wrap(self, table: pa.Table) -> "DataFrame":
        return DataFrame(self.comm, table)

    # -- collective ---------------------------------------------------------------------
    def num_rows(self) -> int:
        """Rows across all ranks (collective)."""
        return int(self.comm.allreduce(self._table.num_rows, "sum"))

    def merge(self, right: "DataFrame", how: str = "inner", on=None, left_on=None, right_on=None,
              suffixes=("_x", "_y"), **options) -> "DataFrame":
        """pandas/pycylon ``merge``: how in inner, left, right, outer (also semi, anti)."""
        other = right.to_table() if isinstance(right, DataFrame) else right
        return self._wrap(_join(self.comm, self._table, other, on=on, how=how, left_on=left_on,
                                right_on=right_on, suffixes=suffixes, **options))

    def groupby(self, by) -> "GroupBy":
        return GroupBy(self, by)

    def sort_values(self, by, ascending=True, na_position: str = "last") -> "DataFrame":
        names = [by] if isinstance(by, str) else list(by)
        asc = [ascending] * len(names) if isinstance(ascending, bool) else list(ascending)
        if len(asc) != len(names):
            raise KernelError(f"sort_values: {len(names)} columns but {len(asc)} ascending flags")
        if na_position not in ("first", "last"):
            raise KernelError(f"sort_values: na_position must be 'first' or 'last', got "
                              f"{na_position!r}")
        keys = [(n, "ascending" if a else "descending") for n, a in zip(names, asc)]
        placement = "at_end" if na_position == "last" else "at_start"
        return self._wrap(_sort(self.comm, self._table, keys, null_placement=placement))

    def drop_duplicates(self, subset=None, keep: str = "first") -> "DataFrame":
        return self._wrap(unique(self.comm, self._table, on=subset, keep=keep))

    unique = drop_duplicates

    def union(self, other: "DataFrame") -> "DataFrame":
        return self._wrap(union(self.comm, self._table, _table_of(other)))

    def intersect(self, other: "DataFrame") -> "DataFrame":
        return self._wrap(intersect(self.comm, self._table, _table_of(other)))

    def subtract(self, other: "DataFrame") -> "DataFrame":
        return self._wrap(difference(self.comm, self._table, _table_of(other)))

    difference = subtract

    def shuffle(self, on) -> "DataFrame":
        return self._wrap(shuffle(self.comm, self._table, on))

    def repartition(self, rows_per_rank: Optional[Sequence[int]] = None) -> "DataFrame":
        return self._wrap(repartition(self.comm, self._table, rows_per_rank))


class GroupBy:
    """``df.groupby(by).agg({"col": "sum"})`` or ``.agg([("col", "mean")])``; also ``.sum()``,
    ``.mean()`` and friends over every non-key column."""

    def __init__(self, frame: DataFrame, by):
        self._frame = frame
        self._by = [by] if isinstance(by, str) else list(by)

    def agg(self, aggs) -> DataFrame:
        f = self._frame
        return f._wrap(_groupby(f.comm, f.to_table(), self._by, aggs))

    aggregate = agg

    def _all(self, func: str) -> DataFrame:
        cols = [c for c in self._frame.columns if c not in self._by]
        return self.agg([(c, func) for c in cols])

    def sum(self): return self._all("sum")            # noqa: E704
    def min(self): return self._all("min")            # noqa: E704
    def max(self): return self._all("max")            # noqa: E704
    def mean(self): return self._all("mean")          # noqa: E704
    def count(self): return self._all("count")        # noqa: E704
    def std(self): return self._all("std")            # noqa: E704
    def var(self): return self._all("var")            # noqa: E704
    def nunique(self): return self._all("count_distinct")  # noqa: E704
    def first(self): return self._all("first")        # noqa: E704
    def last(self): return self._all("last")          # noqa: E704


def _table_of(x) -> pa.Table:
    return x.to_table() if isinstance(x, DataFrame) else x
