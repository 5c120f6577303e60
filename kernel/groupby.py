"""Distributed groupby: local pre-aggregation into partial states, hash-shuffle of the partial
states on the keys, final aggregation.

Every aggregation is decomposed into partial states that combine exactly: sum/min/max/any/all/
first/last of partials, counts summed, mean from (sum, count), variance and standard deviation
from (count, mean, M2) combined with Chan et al.'s pairwise formula generalised to k parts
(``M2 = sum M2_i + sum n_i (mean_i - mean)^2``: deviations from the group mean, never a
difference of large sums of squares), count_distinct from the per-rank distinct values.  The
result has the columns, names, order and types that pyarrow's own ``group_by().aggregate()``
gives for the same request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import partition, types
from ._common import (KernelError, KeyTypeError, UnsupportedAggregationError, agreed_exchange,
                      check_hashable, column_list)

__all__ = ["groupby", "AGGREGATIONS"]

#: User-facing names.  "std"/"var" are the sample statistics (ddof=1, as Cylon and pandas);
#: "stddev"/"variance" follow pyarrow (ddof=0 unless VarianceOptions say otherwise).
AGGREGATIONS = ("sum", "min", "max", "count", "count_all", "count_distinct", "mean", "std", "var",
                "stddev", "variance", "first", "last", "any", "all")
_SCALAR_OPTS = ("sum", "min", "max", "mean", "first", "last", "any", "all")
_ORDERED = ("first", "last")
_P = "__cylon_p{}"
_ROW = "__cylon_row"
_ALL = "__cylon_all"
_DEFAULT_OPTIONS = {
    **{f: repr(pc.ScalarAggregateOptions()) for f in _SCALAR_OPTS},
    "count": repr(pc.CountOptions()),
    "variance": repr(pc.VarianceOptions()),
}


@dataclass
class _Agg:
    """One requested aggregation and the partial states it is computed from."""
    target: Optional[str]          # None for count_all
    func: str                      # user's name
    options: Any
    out_name: str
    partials: dict = field(default_factory=dict)   # role -> partial column name
    min_count: int = 1             # null unless this many valid values (ScalarAggregateOptions)
    skip: bool = True              # skip_nulls
    ddof: int = 0                  # for variance / stddev


def _options_for(func, options):
    if func in ("std", "var"):
        if options is None:
            return pc.VarianceOptions(ddof=1)
        if not isinstance(options, pc.VarianceOptions):
            raise UnsupportedAggregationError(f"groupby: {func} takes VarianceOptions, got "
                                              f"{type(options).__name__}")
        return options
    return options


def _fields(options) -> dict:
    """pyarrow's FunctionOptions expose no attributes: read them from their repr
    ("VarianceOptions(ddof=1, skip_nulls=false, min_count=0)")."""
    out = {}
    for k, v in re.findall(r"(\w+)=([^,)]+)", repr(options)):
        v = v.strip()
        out[k] = True if v == "true" else False if v == "false" else int(v) if v.lstrip("-").isdigit() else v
    return out


def _skip_nulls(options) -> bool:
    return True if options is None else bool(_fields(options).get("skip_nulls", True))


def _min_count(options, default: int) -> int:
    return default if options is None else int(_fields(options).get("min_count", default))


def _pyarrow_func(func):
    return {"std": "stddev", "var": "variance"}.get(func, func)


def _normalize_aggs(aggs) -> list[tuple[Optional[str], str, Any]]:
    out = []
    if isinstance(aggs, dict):
        for col, funcs in aggs.items():
            for f in ([funcs] if isinstance(funcs, str) else list(funcs)):
                out.append((col, f, None))
    elif isinstance(aggs, (list, tuple)):
        for a in aggs:
            if not isinstance(a, (list, tuple)) or len(a) not in (2, 3):
                raise KernelError(f"groupby: each aggregation is (column, function) or (column, "
                                  f"function, options), got {a!r}")
            col, f = a[0], a[1]
            opts = a[2] if len(a) == 3 else None
            if isinstance(col, (list, tuple)):
                if len(col) == 0:
                    col = None
                elif len(col) == 1:
                    col = col[0]
                else:
                    raise UnsupportedAggregationError(f"groupby: aggregations over several "
                                                      f"columns are not supported: {a!r}")
            out.append((col, f, opts))
    else:
        raise KernelError(f"groupby: aggs must be a list of (column, function) or a dict "
                          f"{{column: function(s)}}, got {type(aggs).__name__}")
    for col, f, _ in out:
        if not isinstance(f, str):
            raise UnsupportedAggregationError(f"groupby: aggregation functions are given by name, "
                                              f"got {f!r}")
        if f not in AGGREGATIONS:
            raise UnsupportedAggregationError(f"groupby: unknown or unsupported aggregation "
                                              f"{f!r}; supported: {', '.join(AGGREGATIONS)}")
        if (col is None) != (f == "count_all"):
            raise KernelError(f"groupby: count_all takes no column ([]) and {f} takes one, got "
                              f"{col!r}")
    return out


def _fingerprint_aggs(aggs):
    return tuple((c, f, repr(o)) for c, f, o in aggs)


def _trial(schema: pa.Schema, by, norm) -> tuple[pa.Table, list]:
    """pyarrow's result for this request on no rows (its schema is the output schema) and the
    pyarrow aggregation spec [(out name, target, function, options)]; raises clear errors for
    bad types."""
    empty = schema.empty_table()
    try:
        empty.group_by(by, use_threads=False).aggregate([])
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise KeyTypeError(f"groupby: these columns cannot be group keys: {exc}") from exc
    spec = []
    for col, f, opts in norm:
        t = schema.field(col).type if col is not None else None
        if t is not None and pa.types.is_null(t) and f not in ("count", "count_all", "min", "max",
                                                               "first", "last"):
            raise UnsupportedAggregationError(f"groupby: {f} of column {col!r} of type null")
        if f in ("mean", "std", "var", "stddev", "variance") and t is not None and not (
                pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                or (pa.types.is_decimal(t) and f != "mean")):
            raise UnsupportedAggregationError(f"groupby: {f} is not defined for column {col!r} "
                                              f"of type {t}")
        one = ([] if col is None else col, _pyarrow_func(f), _options_for(f, opts))
        try:
            _aggregate(empty, by, [("v",) + one], use_threads=False)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise UnsupportedAggregationError(
                f"groupby: {f} is not supported for column {col!r} of type {t}: {exc}") from exc
        name = "count_all" if col is None else f"{col}_{f}"
        spec.append((name,) + one)
    return _aggregate(empty, by, spec, use_threads=False), spec


def _keys_first() -> bool:
    t = pa.table({"k": [1], "v": [1]}).group_by("k").aggregate([("v", "sum")])
    return t.column_names[0] == "k"


_KEYS_FIRST = _keys_first()


def _aggregate(table: pa.Table, by, specs, use_threads: bool) -> pa.Table:
    """pyarrow group_by + aggregate; output columns named by ``specs``' names, keys first."""
    names = [s[0] for s in specs]
    table, specs, fix = types.prepare_aggregate(table, specs)
    res = table.group_by(by, use_threads=use_threads).aggregate([s[1:] for s in specs])
    k = len(by)
    cols = res.columns
    keys, vals = (cols[:k], cols[k:]) if _KEYS_FIRST else (cols[len(specs):], cols[:len(specs)])
    return fix(pa.Table.from_arrays(list(keys) + list(vals), names=list(by) + names), names)


class _Plan:
    """Partial and final aggregation specs for a request (identical on every rank)."""

    #: pyarrow's own aggregation spec [(out name, target, function, options)] (from ``_trial``;
    #: set by ``groupby`` after construction).
    spec: list[tuple[Any, ...]]

    def __init__(self, schema: pa.Schema, by: list[str], norm, out_schema: pa.Schema,
                 empty_result: pa.Table):
        self.user_by = by
        # Without keys, one constant key: hash aggregations exist for every function we use
        # (there is no scalar "distinct"), and the no-data case returns pyarrow's own row.
        self.by = by if by else [_ALL]
        self.out_schema = out_schema
        self.empty_result = empty_result
        self.aggs: list[_Agg] = []
        self.partial_specs: list[tuple] = []   # (name, target, func, options)
        self.derived: dict[str, tuple[str, pa.DataType]] = {}  # tmp column -> (source, type)
        self._by_key: dict = {}
        self.ordered = False
        self.needs_groups = False
        out_names = out_schema.names[len(self.user_by):]
        for (col, f, opts), out in zip(norm, out_names):
            a = _Agg(col, f, opts, out)
            t = schema.field(col).type if col is not None else None
            self._plan_one(a, t)
            self.aggs.append(a)

    def _partial(self, target, func, options=None) -> str:
        """Name of the partial state (target, func, options), shared by every aggregation that
        needs it (a sum serves sum and mean, a count serves count, mean and std...)."""
        if options is not None and repr(options) == _DEFAULT_OPTIONS.get(func):
            options = None
        key = (tuple(target) if isinstance(target, list) else target, func, repr(options))
        if key not in self._by_key:
            name = _P.format(len(self.partial_specs))
            self._by_key[key] = name
            self.partial_specs.append((name, target, func, options))
        return self._by_key[key]

    def _as_float(self, col: str, t: pa.DataType) -> str:
        """The column as float64 (pyarrow accumulates means and variances in double)."""
        if t == pa.float64():
            return col
        name = f"__cylon_f64_{col}"
        self.derived[name] = (col, pa.float64())
        return name

    def _plan_one(self, a: _Agg, t):
        f, o, c = a.func, a.options, a.target
        if f in _ORDERED:
            self.ordered = True
        if f == "count_all":
            a.partials["count"] = self._partial([], "count_all")
        elif f == "count":
            a.partials["count"] = self._partial(c, "count", o)
        elif f == "count_distinct":
            self.needs_groups = True
            a.partials["distinct"] = self._partial(c, "distinct",
                                                   pc.CountOptions(mode="all"))
        elif f in ("sum", "min", "max", "first", "last", "any", "all"):
            if o is not None and not isinstance(o, pc.ScalarAggregateOptions):
                raise UnsupportedAggregationError(f"groupby: {f} takes ScalarAggregateOptions, "
                                                  f"got {type(o).__name__}")
            a.min_count = _min_count(o, 1)
            if a.min_count == 1:
                # The default composes: a group is null iff every partial state is.
                a.partials["value"] = self._partial(c, f, o)
            else:
                # Partial states without the threshold, then the threshold on the total count.
                a.partials["value"] = self._partial(
                    c, f, pc.ScalarAggregateOptions(skip_nulls=_skip_nulls(o), min_count=0))
                a.partials["valid"] = self._partial(c, "count", pc.CountOptions("only_valid"))
        elif f == "mean":
            if o is not None and not isinstance(o, pc.ScalarAggregateOptions):
                raise UnsupportedAggregationError(f"groupby: mean takes ScalarAggregateOptions, "
                                                  f"got {type(o).__name__}")
            assert c is not None  # only count_all has no column
            src = self._as_float(c, t) if pa.types.is_floating(t) else c
            a.skip = _skip_nulls(o)
            a.min_count = _min_count(o, 1)
            # Null where a rank saw no value: the total count says when the mean is null.
            a.partials["sum"] = self._partial(src, "sum")
            a.partials["valid"] = self._partial(c, "count", pc.CountOptions("only_valid"))
            if not a.skip:
                a.partials["nulls"] = self._partial(c, "count", pc.CountOptions("only_null"))
        elif f in ("std", "var", "stddev", "variance"):
            o = _options_for(f, o)
            if o is not None and not isinstance(o, pc.VarianceOptions):
                raise UnsupportedAggregationError(f"groupby: {f} takes VarianceOptions, got "
                                                  f"{type(o).__name__}")
            self.needs_groups = True
            a.ddof = int(_fields(o).get("ddof", 0)) if o is not None else 0
            a.skip = _skip_nulls(o)
            a.min_count = _min_count(o, 0)
            assert c is not None  # only count_all has no column
            src = self._as_float(c, t)
            a.partials["valid"] = self._partial(c, "count", pc.CountOptions("only_valid"))
            a.partials["mean"] = self._partial(src, "mean")
            a.partials["var0"] = self._partial(src, "variance", pc.VarianceOptions(ddof=0))
            if not a.skip:
                a.partials["nulls"] = self._partial(c, "count", pc.CountOptions("only_null"))
        else:  # pragma: no cover - _normalize_aggs rejects the rest
            raise UnsupportedAggregationError(f"groupby: {f}")

    # -- stages -------------------------------------------------------------------------
    def direct(self, table: pa.Table) -> pa.Table:
        """The aggregation of whole rows (one rank, or rows already partitioned).

        When the request shares partial states (sum, mean and count of one column need only a
        sum and a count) and needs no per-group lists, the partial states are computed on the
        rows and finished like combined ones, in one pass with fewer aggregations; otherwise
        pyarrow's own aggregation.
        """
        if (not self.needs_groups and self.user_by
                and len(self.partial_specs) < len(self.spec)):
            return self._finish(self._partial_states(table), None, None)
        out = _aggregate(table, self.user_by, self.spec, use_threads=not self.ordered)
        if not self.user_by and table.num_rows == 0:
            return self.empty_result
        return out.cast(self.out_schema) if out.schema != self.out_schema else out

    def pre_aggregate(self, table: pa.Table) -> pa.Table:
        """This rank's partial states (the first stage of the pre-aggregating plan)."""
        return self._partial_states(table)

    def _partial_states(self, table: pa.Table) -> pa.Table:
        if not self.user_by:
            table = table.append_column(_ALL, pa.array(np.zeros(table.num_rows, dtype=np.int8)))
        for name, (src, t) in self.derived.items():
            if name not in table.column_names:
                table = table.append_column(name, table.column(src).cast(t))
        specs = [(name, [] if target == [] else target, func, opts)
                 for name, target, func, opts in self.partial_specs]
        return _aggregate(table, self.by, specs, use_threads=not self.ordered)

    def final(self, partials: pa.Table) -> pa.Table:
        """Combine the partial states of the groups this rank owns."""
        specs: list[tuple[Any, ...]] = []
        combine = {"count_all": "sum", "count": "sum", "sum": "sum", "min": "min", "max": "max",
                   "first": "first", "last": "last", "any": "any", "all": "all"}
        for name, target, func, opts in self.partial_specs:
            if func in combine:
                fopts = None
                if opts is not None and func not in ("count", "count_all"):
                    fopts = pc.ScalarAggregateOptions(skip_nulls=_skip_nulls(opts),
                                                      min_count=min(_min_count(opts, 1), 1))
                specs.append((name, name, combine[func], fopts))
        ordered = self.ordered or self.needs_groups
        if self.needs_groups:
            partials = partials.append_column(_ROW, pa.array(np.arange(partials.num_rows)))
            specs.append((_ROW, _ROW, "list"))
        done = _aggregate(partials, self.by, specs, use_threads=not ordered)
        gid = None
        if self.needs_groups:
            rows = done.column(_ROW)
            flat = pc.list_flatten(rows).to_numpy()
            parent = pc.list_parent_indices(rows).to_numpy()
            gid = np.empty(partials.num_rows, dtype=np.int64)
            gid[flat] = parent
        return self._finish(done, partials, gid)

    def _finish(self, done: pa.Table, partials: Optional[pa.Table], gid) -> pa.Table:
        """The result columns from ``done`` (one row per group, the partial states combined);
        ``partials`` and ``gid`` (each partial's group) only for std/var and count_distinct."""
        G = done.num_rows
        if not self.user_by and done.num_rows == 0:
            return self.empty_result
        cols = [done.column(k) for k in self.user_by]
        out_fields = list(self.out_schema)[len(self.user_by):]
        for a, fld in zip(self.aggs, out_fields):
            col = self._final_one(a, done, partials, gid, G)
            if col.type != fld.type:
                col = col.cast(fld.type)
            cols.append(col)
        return pa.Table.from_arrays(cols, schema=self.out_schema)

    def _final_one(self, a: _Agg, done: pa.Table, partials: pa.Table, gid, G):
        f = a.func
        if f in ("count", "count_all"):
            return done.column(a.partials["count"])
        if f in ("sum", "min", "max", "first", "last", "any", "all"):
            col = done.column(a.partials["value"])
            if a.min_count != 1:
                valid = done.column(a.partials["valid"])
                col = pc.if_else(pc.less(valid, a.min_count), pa.nulls(len(col), col.type), col)
            return col
        if f == "mean":
            s = done.column(a.partials["sum"])
            n = done.column(a.partials["valid"])
            mean = pc.divide(pc.cast(s, pa.float64()), pc.cast(n, pa.float64()))
            bad = pc.less(n, max(a.min_count, 1))
            if not a.skip:
                bad = pc.or_(bad, pc.greater(done.column(a.partials["nulls"]), 0))
            return pc.if_else(bad, pa.nulls(len(mean), pa.float64()), mean)
        if f in ("std", "var", "stddev", "variance"):
            n_i = _f64(partials.column(a.partials["valid"]))
            mean_i = _f64(partials.column(a.partials["mean"]))
            m2_i = _f64(partials.column(a.partials["var0"])) * n_i
            N = np.bincount(gid, weights=n_i, minlength=G)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.bincount(gid, weights=n_i * mean_i, minlength=G) / N
                dev = mean_i - mean[gid]
                M2 = (np.bincount(gid, weights=m2_i, minlength=G)
                      + np.bincount(gid, weights=n_i * dev * dev, minlength=G))
                var = M2 / (N - a.ddof)
            bad = (N <= a.ddof) | (N < a.min_count)
            if not a.skip:
                nulls = np.bincount(gid, weights=_f64(partials.column(a.partials["nulls"])),
                                    minlength=G)
                bad |= nulls > 0
            val = np.sqrt(var) if f in ("std", "stddev") else var
            return pa.array(val, pa.float64(), mask=bad)
        if f == "count_distinct":
            lists = partials.column(a.partials["distinct"])
            values = pc.list_flatten(lists)
            parent = pc.list_parent_indices(lists).to_numpy()
            pairs = pa.table({"g": pa.array(gid[parent]), "v": values})
            opts = a.options if a.options is not None else pc.CountOptions(mode="only_valid")
            counted = pairs.group_by("g").aggregate([("v", "count_distinct", opts)])
            out = np.zeros(G, dtype=np.int64)
            out[counted.column("g").to_numpy()] = counted.column("v_count_distinct").to_numpy()
            return pa.array(out)
        raise UnsupportedAggregationError(f"groupby: {f}")  # pragma: no cover


def _f64(col) -> np.ndarray:
    return pc.fill_null(pc.cast(col, pa.float64()), 0.0).to_numpy()


def groupby(comm, table, by, aggs, *, pre_aggregate="auto") -> pa.Table:
    """Group this rank's ``table`` with every other rank's by ``by`` and aggregate.

    ``aggs``: [("col", "sum"), ("col", "count", pc.CountOptions(...)), ([], "count_all")] or
    {"col": "sum" | ["sum", "mean"]}.  Output columns are named as pyarrow names them
    (``col_sum``); each group lives on exactly one rank.

    ``pre_aggregate``: True aggregates locally first and shuffles partial states; False shuffles
    the rows (only the columns needed) and aggregates once; "auto" (default) pre-aggregates
    unless the ranks' estimated group counts show it would not shrink the data
    (``PRE_AGGREGATE_RATIO``), the way Velox and Presto abandon partial aggregation: with most
    keys distinct, partitioning first makes each rank's hash table smaller and is faster.
    """
    args = (by if isinstance(by, str) else tuple(by) if by is not None else None,
            _fingerprint_aggs(_normalize_aggs(aggs)) if _aggs_ok(aggs) else repr(aggs),
            pre_aggregate)
    P = comm.world_size

    def prepare(tables):
        t = tables[0]
        if pre_aggregate not in ("auto", True, False):
            raise KernelError(f"groupby: pre_aggregate must be 'auto', True or False, got "
                              f"{pre_aggregate!r}")
        keys = column_list(by, t.schema, "groupby", allow_empty=True)
        check_hashable(t.schema, keys, "groupby")
        norm = _normalize_aggs(aggs)
        for col, f, _ in norm:
            if col is not None:
                column_list(col, t.schema, f"groupby ({f})")
        empty_result, spec = _trial(t.schema, keys, norm)
        plan = _Plan(t.schema, keys, norm, empty_result.schema, empty_result)
        plan.spec = spec
        if P == 1 or not keys:
            return (plan, t, None), None
        return (plan, t, partition.hash_columns(t, keys)), None

    def split(local, tables):
        plan, t, hashes = local
        if P == 1:
            return [[t]]
        if not plan.user_by:
            # One global group: partial states meet on rank 0.
            partial = plan.pre_aggregate(t)
            return [[partial] + [partial.slice(0, 0)] * (P - 1)]
        pre = pre_aggregate is True or (pre_aggregate == "auto" and t.num_rows and
                                        _estimate_distinct(hashes) <= PRE_AGGREGATE_RATIO * t.num_rows)
        if pre_aggregate is True:
            return [partition.hash_partition(plan.pre_aggregate(t), plan.by, P)]
        needed = list(dict.fromkeys(plan.by + [a.target for a in plan.aggs if a.target is not None]))
        raw = t.select(needed)
        if pre_aggregate is False:
            return [partition.split_by_destination(raw, partition.destinations(hashes, P), P)]
        # "auto": each rank decides by its own group count (no round to agree first); a rank
        # receives partial states from some ranks and rows from others, in one exchange.
        if pre:
            return [partition.hash_partition(plan.pre_aggregate(t), plan.by, P),
                    [raw.slice(0, 0)] * P]
        return [[plan._partial_states(t.slice(0, 0))] * P,
                partition.split_by_destination(raw, partition.destinations(hashes, P), P)]

    ag = agreed_exchange(comm, "groupby", [("table", table)], args, prepare, split)
    plan = ag.local[0]
    if P == 1:
        return plan.direct(ag.received[0])
    if not plan.user_by:
        if comm.rank != 0:
            return plan.out_schema.empty_table()
        return plan.final(ag.received[0])
    if pre_aggregate is True:
        return plan.final(ag.received[0])
    if pre_aggregate is False:
        return plan.direct(ag.received[0])
    partials, rows = ag.received
    if partials.num_rows == 0:
        return plan.direct(rows)
    if rows.num_rows:
        partials = pa.concat_tables([partials, plan.pre_aggregate(rows)])
    return plan.final(partials)


#: Pre-aggregate when the ranks' local group counts add up to at most this share of the rows.
#: Measured on 4 ranks, 2.5M rows each (BENCHMARKS.md, kernel section): shuffling rows first wins from
#: about 0.1 group per row (0.39 s vs 0.44 s), pre-aggregating below (0.26 s vs 0.37 s at 0.04).
PRE_AGGREGATE_RATIO = 0.1
_SAMPLE = 4096


def _estimate_distinct(hashes: np.ndarray) -> float:
    """Number of distinct keys from their 64-bit hashes: count the distinct hashes below
    2**64 / 2**s (about 4096-8192 rows kept) and scale by 2**s (a hash-based distinct sample,
    a few % off for many groups); few groups are counted in a strided row sample instead."""
    n = len(hashes)
    if n <= 2 * _SAMPLE:
        return float(len(np.unique(hashes)))
    s = int(np.log2(n / _SAMPLE))
    kept = hashes[hashes < (np.uint64(1) << np.uint64(64 - s))]
    seen = len(np.unique(hashes[:: n // (2 * _SAMPLE)]))
    return max(float(seen), float(len(np.unique(kept))) * 2.0 ** s)


def _aggs_ok(aggs) -> bool:
    try:
        _normalize_aggs(aggs)
        return True
    except KernelError:
        return False
