"""The DataFrame: this rank's part of a distributed Arrow table, with pycylon's API.

One class serves both ways of using it:

* pycylon's: ``DataFrame(data)`` from a dict of lists, a list of columns, a pandas DataFrame, a
  pyarrow Table or numpy arrays; distributed methods take ``env=`` (a ``CylonEnv`` or a
  Communicator) and, without it, run locally (a world of one), as pycylon's do;
* cylon-store's: ``DataFrame(comm, table)`` binds a Communicator, which then is the default
  ``env`` of every method (and of the frames they return).

Distributed methods are collective: every rank of ``env`` calls them in the same order.  Every
one is a kernel operator (``cylon_store.kernel``).  See docs/pycylon.md for the mapping from
pycylon and the differences.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..collective import Communicator, empty_like
from ..errors import NotSupportedError
from ._common import ColumnNotFoundError, KernelError
from .groupby import groupby as _groupby
from .join import join as _join
from .setops import difference, intersect, union, unique
from .shuffle import repartition as _repartition
from .shuffle import shuffle as _shuffle
from .sort import sort as _sort

__all__ = ["DataFrame", "GroupByDataFrame", "GroupBy", "concat", "LocalCommunicator", "comm_of"]


# -- environments --------------------------------------------------------------------------------

class LocalCommunicator(Communicator):
    """A world of one rank in this process: what a DataFrame method uses without ``env``."""

    scheme = "local"

    def __init__(self, job: str = "local"):
        self.rank = 0
        self.world_size = 1
        self.job = job

    def _exchange_impl(self, seq, schema, parts):
        return [parts[0] if parts[0] is not None else empty_like(schema)]

    def _allgather_impl(self, seq, table):
        return [table if table is not None else pa.table({})]

    def _gather_impl(self, seq, table, root):
        return [table if table is not None else pa.table({})]

    def _bcast_impl(self, seq, table, root):
        return table

    def _barrier_impl(self, seq):
        return None

    def _release(self, healthy):
        return None


def _is_comm_like(obj: Any) -> bool:
    return (not isinstance(obj, (pa.Table, pa.RecordBatch, dict, list, tuple, np.ndarray))
            and hasattr(obj, "rank") and hasattr(obj, "world_size"))


def comm_of(env: Any) -> Optional[Any]:
    """The Communicator of ``env``: a ``CylonEnv`` (its ``.comm``), a Communicator, or None."""
    if env is None:
        return None
    inner = getattr(env, "comm", None)
    if inner is not None and _is_comm_like(inner):
        return inner
    if _is_comm_like(env):
        return env
    raise KernelError(f"env must be a CylonEnv or a Communicator, got {type(env).__name__}")


# -- construction ----------------------------------------------------------------------------

def _default_names(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def _rename(table: pa.Table, columns) -> pa.Table:
    if columns is None:
        return table
    if isinstance(columns, dict):
        return table.rename_columns([columns.get(c, c) for c in table.column_names])
    columns = [str(c) for c in columns]
    if len(columns) != table.num_columns:
        raise KernelError(f"DataFrame: data has {table.num_columns} column(s) but "
                          f"{len(columns)} column name(s) were given: {columns}")
    return table.rename_columns(columns)


def _to_table(data, columns=None) -> pa.Table:
    """pycylon's constructor forms as a pyarrow Table."""
    if data is None:
        return _rename(pa.table({}), columns) if columns else pa.table({})
    if isinstance(data, DataFrame):
        return _rename(data._table, columns)
    if isinstance(data, pa.RecordBatch):
        return _rename(pa.Table.from_batches([data]), columns)
    if isinstance(data, pa.Table):
        return _rename(data, columns)
    if isinstance(data, dict):
        table = pa.table({str(k): (v if isinstance(v, (pa.Array, pa.ChunkedArray, np.ndarray))
                                   else list(v)) for k, v in data.items()})
        return _rename(table, columns)
    if type(data).__module__.split(".")[0] == "pandas" and hasattr(data, "columns"):
        table = pa.Table.from_pandas(data, preserve_index=False)
        return _rename(table.rename_columns([str(c) for c in table.column_names]), columns)
    if isinstance(data, np.ndarray):
        if data.ndim == 1:
            arrays = [data]
        elif data.ndim == 2:
            arrays = [np.ascontiguousarray(data[:, i]) for i in range(data.shape[1])]
        else:
            raise KernelError(f"DataFrame: a numpy array must have 1 or 2 dimensions, got {data.ndim}")
        names = [str(c) for c in columns] if columns is not None else _default_names(len(arrays))
        if len(names) != len(arrays):
            raise KernelError(f"DataFrame: data has {len(arrays)} column(s) but {len(names)} "
                              f"column name(s) were given")
        return pa.table(dict(zip(names, arrays)))
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            return _rename(pa.table({}), columns) if columns else pa.table({})
        first = data[0]
        if isinstance(first, (list, tuple, np.ndarray, pa.Array, pa.ChunkedArray)):
            cols = [c if isinstance(c, (np.ndarray, pa.Array, pa.ChunkedArray)) else list(c)
                    for c in data]
            lengths = {len(c) for c in cols}
            if len(lengths) > 1:
                raise KernelError(f"DataFrame: a list of columns needs columns of one length, got "
                                  f"lengths {sorted(lengths)}")
        else:
            cols = [list(data)]
        names = [str(c) for c in columns] if columns is not None else _default_names(len(cols))
        if len(names) != len(cols):
            raise KernelError(f"DataFrame: data has {len(cols)} column(s) but {len(names)} column "
                              f"name(s) were given")
        return pa.table(dict(zip(names, cols)))
    raise KernelError(f"DataFrame: cannot build a table from {type(data).__name__}; pass a dict of "
                      f"lists, a list of columns, a pandas DataFrame, a pyarrow Table or numpy")


def _names(table: pa.Table, cols, what: str) -> list[str]:
    """Column names from names or positions (pycylon takes both)."""
    if cols is None:
        return []
    items = [cols] if isinstance(cols, (str, int, np.integer)) else list(cols)
    out = []
    for c in items:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not -table.num_columns <= int(c) < table.num_columns:
                raise ColumnNotFoundError(f"{what}: column index {int(c)} is out of range for "
                                          f"{table.num_columns} column(s) {table.column_names}")
            out.append(table.column_names[int(c)])
        elif isinstance(c, str):
            if c not in table.column_names:
                raise ColumnNotFoundError(f"{what}: no column {c!r}; columns are "
                                          f"{table.column_names}")
            out.append(c)
        else:
            raise KernelError(f"{what}: columns are given by name or position, got {c!r}")
    return out


# -- the DataFrame ------------------------------------------------------------------------------

class DataFrame:
    """pycylon's ``DataFrame(data=None, index=None, columns=None, copy=False)``, or
    cylon-store's ``DataFrame(comm, table)`` (methods then default to ``env=comm``)."""

    def __init__(self, data=None, index=None, columns=None, copy: bool = False, *, env=None):
        if _is_comm_like(data):  # DataFrame(comm, table)
            if env is not None:
                raise KernelError("DataFrame(comm, table): env= given twice")
            env, data, index = data, index, None
            if not isinstance(data, (pa.Table, pa.RecordBatch)):
                raise KernelError(f"DataFrame needs a pyarrow Table, got {type(data).__name__}")
        if index is not None:
            raise NotSupportedError("DataFrame(index=...): cylon-store frames have no index; "
                                    "keep the index values as a column")
        table = _to_table(data, columns)
        if copy:
            table = pa.concat_tables([table]).combine_chunks() if table.num_columns else table
        self._table: pa.Table = table
        self._env = env
        self.comm = comm_of(env)
        self._index_columns: list[str] = []

    # -- environment ---------------------------------------------------------------------
    def _comm(self, env=None):
        c = comm_of(env)
        if c is not None:
            return c
        return self.comm if self.comm is not None else LocalCommunicator()

    def _wrap(self, table: pa.Table) -> "DataFrame":
        out = DataFrame(table)
        out._env, out.comm = self._env, self.comm
        return out

    # -- local views ---------------------------------------------------------------------
    def to_arrow(self) -> pa.Table:
        """This rank's rows as a pyarrow Table."""
        return self._table

    to_table = to_arrow

    def to_pandas(self):
        return self._table.to_pandas()

    def to_dict(self) -> dict:
        return self._table.to_pydict()

    def to_numpy(self, order: str = "F", zero_copy_only: bool = True, writable: bool = False) -> np.ndarray:
        if self._table.num_columns == 0:
            return np.empty((self._table.num_rows, 0))
        cols = [c.to_numpy() for c in self._table.columns]
        out = np.asarray(np.column_stack(cols), order="F" if order == "F" else "C")
        if writable and not out.flags.writeable:
            out = out.copy(order="F" if order == "F" else "C")
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return self._table.shape

    @property
    def columns(self) -> list[str]:
        return self._table.column_names

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    @property
    def dtypes(self) -> dict:
        return dict(zip(self._table.column_names, self._table.schema.types))

    def __len__(self) -> int:
        return self._table.num_rows

    def __repr__(self):
        head = (f"DataFrame(rank={self.comm.rank}/{self.comm.world_size}, " if self.comm is not None
                else "DataFrame(")
        return f"{head}rows={self._table.num_rows}, columns={self.columns})"

    def __str__(self):
        return repr(self) + "\n" + self._table.slice(0, 10).to_string(preview_cols=10)

    # -- selection -----------------------------------------------------------------------
    def __getitem__(self, item) -> "DataFrame":
        t = self._table
        if isinstance(item, str):
            return self._wrap(t.select(_names(t, item, "df[...]")))
        if isinstance(item, slice):
            start, stop, step = item.indices(t.num_rows)
            if step == 1:
                return self._wrap(t.slice(start, max(0, stop - start)))
            return self._wrap(t.take(pa.array(range(start, stop, step), pa.int64())))
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item) + (t.num_rows if item < 0 else 0)
            if not 0 <= i < t.num_rows:
                raise IndexError(f"row {int(item)} is out of range for {t.num_rows} row(s)")
            return self._wrap(t.slice(i, 1))
        if isinstance(item, DataFrame):
            mask = item._table
            if mask.num_columns == 1 and pa.types.is_boolean(mask.schema.types[0]):
                return self._wrap(t.filter(mask.column(0)))
            return self.where(item)
        if isinstance(item, (pa.Array, pa.ChunkedArray, np.ndarray)) or (
                isinstance(item, list) and item and all(isinstance(x, (bool, np.bool_)) for x in item)):
            arr = item if isinstance(item, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(item))
            if not pa.types.is_boolean(arr.type):
                raise KernelError(f"df[mask]: a row mask must be boolean, got {arr.type}")
            return self._wrap(t.filter(arr))
        if isinstance(item, (list, tuple)):
            return self._wrap(t.select(_names(t, list(item), "df[...]")))
        raise KernelError(f"df[...]: cannot select with {type(item).__name__}")

    def __setitem__(self, key, value) -> None:
        if not isinstance(key, str):
            raise KernelError(f"df[key] = value: key must be a column name, got {key!r}")
        n = self._table.num_rows
        if isinstance(value, DataFrame):
            if value._table.num_columns != 1:
                raise KernelError("df[key] = DataFrame: the value must have one column")
            col: Any = value._table.column(0)
        elif isinstance(value, (pa.Array, pa.ChunkedArray)):
            col = value
        elif isinstance(value, (list, np.ndarray)):
            col = pa.array(value)
        else:
            col = pa.array([value] * n)
        if len(col) != n:
            raise KernelError(f"df[{key!r}] = ...: {len(col)} value(s) for {n} row(s)")
        if key in self._table.column_names:
            self._table = self._table.set_column(self._table.column_names.index(key), key, col)
        else:
            self._table = self._table.append_column(key, col)

    def drop(self, column_names) -> "DataFrame":
        return self._wrap(self._table.drop_columns(_names(self._table, column_names, "drop")))

    def rename(self, column_names) -> "DataFrame":
        return self._wrap(_rename(self._table, column_names))

    def add_prefix(self, prefix: str) -> "DataFrame":
        return self._wrap(self._table.rename_columns([prefix + c for c in self.columns]))

    def add_suffix(self, suffix: str) -> "DataFrame":
        return self._wrap(self._table.rename_columns([c + suffix for c in self.columns]))

    def set_index(self, key, indexing_type=None, drop: bool = False) -> "DataFrame":
        """Marks ``key`` column(s) as the index columns ``join`` matches on (no index is
        built: the columns stay columns)."""
        out = self._wrap(self._table)
        out._index_columns = _names(self._table, key, "set_index")
        return out

    def reset_index(self, *args, **kwargs) -> "DataFrame":
        out = self._wrap(self._table)
        out._index_columns = []
        return out

    # -- element-wise ----------------------------------------------------------------------
    def _map(self, fn: Callable[..., Any], other=None, unary: bool = False) -> "DataFrame":
        t = self._table
        if unary:
            cols = [fn(c) for c in t.columns]
        elif isinstance(other, DataFrame):
            o = other._table
            if o.num_columns == 1 and t.num_columns > 1:
                cols = [fn(c, o.column(0)) for c in t.columns]
            elif o.num_columns != t.num_columns:
                raise KernelError(f"element-wise operation: {t.num_columns} column(s) against "
                                  f"{o.num_columns}")
            else:
                cols = [fn(a, b) for a, b in zip(t.columns, o.columns)]
        else:
            cols = [fn(c, other) for c in t.columns]
        return self._wrap(pa.table(dict(zip(t.column_names, cols))))

    def __eq__(self, other): return self._map(pc.equal, other)              # noqa: E704
    def __ne__(self, other): return self._map(pc.not_equal, other)          # noqa: E704
    def __lt__(self, other): return self._map(pc.less, other)               # noqa: E704
    def __gt__(self, other): return self._map(pc.greater, other)            # noqa: E704
    def __le__(self, other): return self._map(pc.less_equal, other)         # noqa: E704
    def __ge__(self, other): return self._map(pc.greater_equal, other)      # noqa: E704
    def __and__(self, other): return self._map(pc.and_kleene, other)        # noqa: E704
    def __or__(self, other): return self._map(pc.or_kleene, other)          # noqa: E704
    def __invert__(self): return self._map(pc.invert, unary=True)           # noqa: E704
    def __neg__(self): return self._map(pc.negate, unary=True)              # noqa: E704
    def __add__(self, other): return self._map(pc.add, other)               # noqa: E704
    def __sub__(self, other): return self._map(pc.subtract, other)          # noqa: E704
    def __mul__(self, other): return self._map(pc.multiply, other)          # noqa: E704

    def __truediv__(self, other):
        return self._map(lambda a, b: pc.divide(pc.cast(a, pa.float64()), b), other)

    __hash__ = None  # type: ignore[assignment]

    def isnull(self) -> "DataFrame":
        return self._map(pc.is_null, unary=True)

    isna = isnull

    def notnull(self) -> "DataFrame":
        return self._map(pc.is_valid, unary=True)

    notna = notnull

    def fillna(self, fill_value) -> "DataFrame":
        return self._map(lambda c: pc.fill_null(c, fill_value), unary=True)

    def where(self, condition: Optional["DataFrame"] = None, other=None) -> "DataFrame":
        """Values where ``condition`` (a boolean frame of the same columns) holds, else
        ``other`` (null by default)."""
        if condition is None:
            raise KernelError("where: a condition is required")

        def pick(col, cond):
            alt = pa.nulls(len(col), col.type) if other is None else pa.scalar(other, col.type)
            return pc.if_else(cond, col, alt)
        return self._map(pick, condition)

    # -- collective ----------------------------------------------------------------------
    def num_rows(self, env=None) -> int:
        """Rows across all ranks (collective)."""
        return int(self._comm(env).allreduce(self._table.num_rows, "sum"))

    def merge(self, right: "DataFrame", how: str = "inner", algorithm: str = "sort", on=None,
              left_on=None, right_on=None, left_index: bool = False, right_index: bool = False,
              sort: bool = False, suffixes=("_x", "_y"), copy: bool = True, indicator: bool = False,
              validate=None, env=None, **options) -> "DataFrame":
        """Database-style join (how: inner, left, right, outer; also semi, anti).  ``algorithm``
        is accepted for pycylon's sake: the kernel picks a hash shuffle or a broadcast."""
        if algorithm not in ("sort", "hash"):
            raise KernelError(f"merge: algorithm must be 'sort' or 'hash', got {algorithm!r}")
        if indicator or validate is not None:
            raise NotSupportedError("merge: indicator= and validate= are not supported")
        other = _table_of(right)
        if left_index:
            left_on = self._index_columns or None
        if right_index and isinstance(right, DataFrame):
            right_on = right._index_columns or None
        if on is not None:
            on = _names(self._table, on, "merge(on=...)")
        else:
            if left_on is None or right_on is None:
                raise KernelError("merge: columns to merge on are not given: pass on=, or left_on= "
                                  "and right_on= (or set_index and left_index/right_index)")
            left_on = _names(self._table, left_on, "merge(left_on=...)")
            right_on = _names(other, right_on, "merge(right_on=...)")
        out = _join(self._comm(env), self._table, other, on=on, how=how, left_on=left_on,
                    right_on=right_on, suffixes=tuple(suffixes), **options)
        if sort and on is not None:
            out = out.take(pc.sort_indices(out, sort_keys=[(k, "ascending") for k in on]))
        return self._wrap(out)

    def join(self, other: "DataFrame", on=None, how: str = "left", lsuffix: str = "l",
             rsuffix: str = "r", sort: bool = False, algorithm: str = "sort", env=None) -> "DataFrame":
        """pycylon's join: ``on`` (or this frame's index columns) against ``other``'s index
        columns (``set_index``), or the same-named columns when ``other`` has none."""
        left_on = on if on is not None else (self._index_columns or None)
        if left_on is None:
            raise KernelError("join: the columns to join on are not given: pass on= or set_index")
        left_on = _names(self._table, left_on, "join(on=...)")
        right_on = other._index_columns if isinstance(other, DataFrame) and other._index_columns \
            else left_on
        return self.merge(other, how=how, algorithm=algorithm, left_on=left_on, right_on=right_on,
                          sort=sort, suffixes=(lsuffix, rsuffix), env=env)

    def groupby(self, by, groupby_type: str = "hash", env=None) -> "GroupByDataFrame":
        if isinstance(by, (list, tuple)) and len(by) == 0:
            raise KernelError("groupby: group by columns should be specified")
        if groupby_type not in ("hash", "mapred_hash"):
            raise KernelError(f"groupby: groupby_type must be 'hash' or 'mapred_hash', got "
                              f"{groupby_type!r}")
        return GroupByDataFrame(self, _names(self._table, by, "groupby"), groupby_type, env=env)

    def sort_values(self, by, ascending=True, env=None, na_position: str = "last",
                    **sort_options) -> "DataFrame":
        """Sort by columns (names or positions); distributed with ``env``: rank r holds the
        r-th range of the global order.  pycylon's sort options (sampling, num_samples,
        num_bins) are accepted; ``num_samples`` sets the samples per rank."""
        names = _names(self._table, by, "sort_values")
        if not names:
            raise KernelError("sort_values: no sort columns given")
        asc = [bool(ascending)] * len(names) if isinstance(ascending, (bool, np.bool_)) else list(ascending)
        if len(asc) != len(names):
            raise KernelError(f"sort_values: {len(names)} columns but {len(asc)} ascending flags")
        if na_position not in ("first", "last"):
            raise KernelError(f"sort_values: na_position must be 'first' or 'last', got "
                              f"{na_position!r}")
        unknown = set(sort_options) - {"sampling", "num_samples", "num_bins"}
        if unknown:
            raise KernelError(f"sort_values: unknown sort option(s) {sorted(unknown)}")
        samples = int(sort_options.get("num_samples") or 0) or None
        keys = [(n, "ascending" if a else "descending") for n, a in zip(names, asc)]
        placement = "at_end" if na_position == "last" else "at_start"
        return self._wrap(_sort(self._comm(env), self._table, keys, null_placement=placement,
                                samples_per_rank=samples))

    def drop_duplicates(self, subset=None, keep="first", inplace: bool = False,
                        ignore_index: bool = False, env=None) -> Optional["DataFrame"]:
        if keep not in ("first", "last"):
            raise KernelError(f"drop_duplicates: keep must be 'first' or 'last', got {keep!r}")
        cols = _names(self._table, subset, "drop_duplicates") if subset is not None else None
        out = unique(self._comm(env), self._table, on=cols, keep=keep)
        if inplace:
            self._table = out
            return None
        return self._wrap(out)

    def unique(self, subset=None, keep="first", env=None) -> "DataFrame":
        out = self.drop_duplicates(subset=subset, keep=keep, env=env)
        assert out is not None
        return out

    def union(self, other: "DataFrame", env=None) -> "DataFrame":
        return self._wrap(union(self._comm(env), self._table, _table_of(other)))

    def intersect(self, other: "DataFrame", env=None) -> "DataFrame":
        return self._wrap(intersect(self._comm(env), self._table, _table_of(other)))

    def subtract(self, other: "DataFrame", env=None) -> "DataFrame":
        return self._wrap(difference(self._comm(env), self._table, _table_of(other)))

    difference = subtract

    def shuffle(self, on, env=None) -> "DataFrame":
        return self._wrap(_shuffle(self._comm(env), self._table, _names(self._table, on, "shuffle")))

    def repartition(self, rows_per_partition: Optional[Sequence[int]] = None,
                    receive_build_rank_order=None, env=None) -> "DataFrame":
        """Rank r gets ``rows_per_partition[r]`` rows of the global (rank, row) order (they
        must add up to the total); None: even blocks."""
        if receive_build_rank_order is not None:
            raise NotSupportedError("repartition: receive_build_rank_order is not supported; the "
                                    "global (rank, row) order is kept")
        return self._wrap(_repartition(self._comm(env), self._table, rows_per_partition))

    def evenly_partition(self, env=None) -> "DataFrame":
        """Even blocks of the global (rank, row) order (sizes differ by at most one row)."""
        return self._wrap(_repartition(self._comm(env), self._table, None))

    def equals(self, df: "DataFrame", ordered: bool = True, env=None) -> bool:
        """Same columns, types and rows; ``ordered=False`` ignores row order.  With ``env``
        the distributed frames are compared (every rank gets the same answer)."""
        comm = self._comm(env)
        a, b = self._table, _table_of(df)
        same_schema = a.schema.equals(b.schema)
        if comm.world_size == 1:
            if not same_schema or a.num_rows != b.num_rows:
                return False
            if not ordered:
                a, b = _sorted_all(a), _sorted_all(b)
            return a.equals(b)
        ok = comm.allreduce(int(same_schema), "min")
        if not ok:
            return False
        counts = comm.allgather(pa.table({"a": [a.num_rows], "b": [b.num_rows]}))
        na = [t.column("a")[0].as_py() for t in counts]
        nb = [t.column("b")[0].as_py() for t in counts]
        if sum(na) != sum(nb):
            return False
        if not ordered and a.num_columns:
            keys = [(c, "ascending") for c in a.column_names]
            a = _sort(comm, a, keys)
            b = _sort(comm, b, keys)
            sizes = comm.allgather(pa.table({"n": [a.num_rows]}))
            na = [t.column("n")[0].as_py() for t in sizes]
        b = _repartition(comm, b, na)
        return bool(comm.allreduce(int(a.equals(b)), "min"))

    def isin(self, values, skip_null: bool = True) -> "DataFrame":
        if isinstance(values, dict):
            return self._wrap(pa.table({c: pc.is_in(self._table.column(c), value_set=pa.array(
                list(values.get(c, [])), self._table.schema.field(c).type), skip_nulls=skip_null)
                for c in self.columns}))
        vals = pa.array(list(values))
        return self._map(lambda c: pc.is_in(c, value_set=vals.cast(c.type), skip_nulls=skip_null),
                         unary=True)


def _sorted_all(t: pa.Table) -> pa.Table:
    if t.num_columns == 0:
        return t
    return t.take(pc.sort_indices(t, sort_keys=[(c, "ascending") for c in t.column_names]))


# -- groupby ------------------------------------------------------------------------------------

#: pycylon's aggregation names -> the kernel's (``cylon_store.kernel.AGGREGATIONS``).
_AGG_NAMES = {"nunique": "count_distinct", "size": "count_all"}


class GroupByDataFrame:
    """``df.groupby(by).agg({"col": "sum", "other": ["min", "max"]})``, or ``.sum()``,
    ``.min()``, ... over every non-key column.  Result columns are named as pycylon names them:
    the keys, then ``{op}_{column}`` (``sum_col``) per aggregation, in request order."""

    def __init__(self, df: DataFrame, by: list[str], groupby_type: str = "hash", env=None):
        self.df = df
        self.by = list(by)
        self.by_diff = [c for c in df.columns if c not in self.by]
        self.groupby_type = groupby_type
        self._env = env

    def agg(self, dic) -> DataFrame:
        t = self.df.to_arrow()
        if isinstance(dic, dict):
            items = list(dic.items())
        elif isinstance(dic, (list, tuple)):
            items = [tuple(x) for x in dic]
        else:
            raise KernelError(f"agg: takes a dict {{column: op or [ops]}}, got {type(dic).__name__}")
        pairs: list[tuple[str, str]] = []
        for col, ops in items:
            (name,) = _names(t, [col], "agg")
            for op in ([ops] if isinstance(ops, str) else list(ops)):
                if not isinstance(op, str):
                    raise KernelError(f"agg: operations are given by name, got {op!r}")
                if (name, op) not in pairs:
                    pairs.append((name, op))
        if not pairs:
            raise KernelError("agg: no aggregations given")
        kernel = [(c, _AGG_NAMES.get(op, op)) for c, op in pairs]
        out = _groupby(self.df._comm(self._env), t, self.by, kernel)
        arrays = [out.column(k) for k in self.by]
        names = list(self.by)
        for (c, op), (_, kop) in zip(pairs, kernel):
            arrays.append(out.column(f"{c}_{kop}"))
            names.append(f"{op}_{c}")
        return self.df._wrap(pa.table(arrays, names=names))

    aggregate = agg

    def _all(self, op: str) -> DataFrame:
        if not self.by_diff:
            raise KernelError(f"groupby().{op}(): no columns left to aggregate besides the keys")
        return self.agg({c: op for c in self.by_diff})

    def sum(self): return self._all("sum")            # noqa: E704
    def min(self): return self._all("min")            # noqa: E704
    def max(self): return self._all("max")            # noqa: E704
    def mean(self): return self._all("mean")          # noqa: E704
    def count(self): return self._all("count")        # noqa: E704
    def std(self): return self._all("std")            # noqa: E704
    def var(self): return self._all("var")            # noqa: E704
    def nunique(self): return self._all("nunique")    # noqa: E704
    def first(self): return self._all("first")        # noqa: E704
    def last(self): return self._all("last")          # noqa: E704


GroupBy = GroupByDataFrame


# -- module functions ---------------------------------------------------------------------------

def concat(objs: Iterable[DataFrame], axis=0, join: str = "outer", env=None) -> DataFrame:
    """Rows of the frames one after another (axis 0: the columns must match; ``join="inner"``
    keeps the columns they share), or their columns side by side (axis 1: same row counts).
    Local to each rank: the distributed result is the union of the ranks' results."""
    frames = [o for o in objs if o is not None]
    if not frames:
        raise KernelError("concat: objs can't be empty")
    tables = [_table_of(f) for f in frames]
    if axis in (1, "columns"):
        rows = {t.num_rows for t in tables}
        if len(rows) > 1:
            raise KernelError(f"concat(axis=1): the frames have different row counts {sorted(rows)}")
        arrays, names = [], []
        for t in tables:
            arrays += t.columns
            names += t.column_names
        out = pa.table(arrays, names=names)
    elif axis in (0, "index"):
        if join == "inner":
            common = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
            tables = [t.select(common) for t in tables]
        elif join != "outer":
            raise KernelError(f"concat: join must be 'inner' or 'outer', got {join!r}")
        first = tables[0].schema
        for i, t in enumerate(tables[1:], 1):
            if set(t.column_names) != set(first.names):
                raise KernelError(f"concat: frame {i} has columns {t.column_names}, frame 0 has "
                                  f"{first.names} (use join='inner' for the shared ones)")
        tables = [t.select(first.names) for t in tables]
        try:
            out = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise KernelError(f"concat: the frames' column types do not agree: {exc}") from exc
    else:
        raise KernelError(f"concat: axis must be 0 or 1, got {axis!r}")
    if env is not None:
        comm_of(env)  # checked; like pycylon's, the result is not bound to it
    return frames[0]._wrap(out) if isinstance(frames[0], DataFrame) else DataFrame(out)


def _table_of(x) -> pa.Table:
    if isinstance(x, DataFrame):
        return x.to_arrow()
    if isinstance(x, pa.RecordBatch):
        return pa.Table.from_batches([x])
    if isinstance(x, pa.Table):
        return x
    raise KernelError(f"expected a DataFrame or a pyarrow Table, got {type(x).__name__}")
