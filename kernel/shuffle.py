"""Hash shuffle (equal keys meet on one rank) and order-keeping repartition (even row counts)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from . import partition
from ._common import (KernelError, agreed_exchange, check_hashable, column_list, exchange_tables,
                      preflight)

__all__ = ["shuffle", "repartition"]


def shuffle(comm, table, on) -> pa.Table:
    """Send every row to the rank its ``on`` columns hash to; return the rows this rank got
    (in source-rank order, each source's rows in their original order)."""
    args = on if isinstance(on, str) or on is None else tuple(on)

    def prepare(tables):
        cols = column_list(on, tables[0].schema, "shuffle")
        check_hashable(tables[0].schema, cols, "shuffle")
        return cols, None

    P = comm.world_size
    ag = agreed_exchange(comm, "shuffle", [("table", table)], args, prepare,
                         lambda cols, tables: [partition.hash_partition(tables[0], cols, P)
                                               if P > 1 else [tables[0]]])
    return ag.received[0]


def repartition(comm, table, rows_per_rank: Optional[Sequence[int]] = None) -> pa.Table:
    """Move rows so rank r holds the r-th block of the global (rank, row) order.

    Blocks are even (sizes differ by at most one, the first ranks get the extra rows) unless
    ``rows_per_rank`` gives each rank's count (they must add up to the total).
    """
    P = comm.world_size
    args = None if rows_per_rank is None else tuple(int(x) for x in rows_per_rank)

    def prepare(tables):
        if args is not None and (len(args) != P or any(x < 0 for x in args)):
            raise KernelError(f"repartition: rows_per_rank needs {P} non-negative counts, got "
                              f"{list(args)}")
        return None, None

    pf = preflight(comm, "repartition", [("table", table)], args, prepare)
    t = pf.tables[0]
    counts = np.asarray(pf.rows[0], dtype=np.int64)
    N = int(counts.sum())
    if args is None:
        target = np.full(P, N // P, dtype=np.int64)
        target[: N % P] += 1
    else:
        target = np.asarray(args, dtype=np.int64)
        if int(target.sum()) != N:
            raise KernelError(f"repartition: rows_per_rank adds up to {int(target.sum())} but the "
                              f"ranks hold {N} rows")
    if P == 1 or np.array_equal(target, counts):
        return t
    my_lo = int(counts[: comm.rank].sum())
    my_hi = my_lo + t.num_rows
    t_lo = np.concatenate([[0], np.cumsum(target)[:-1]])
    t_hi = t_lo + target
    parts = []
    for d in range(P):
        lo, hi = max(my_lo, int(t_lo[d])), min(my_hi, int(t_hi[d]))
        parts.append(t.slice(lo - my_lo, hi - lo) if hi > lo else t.slice(0, 0))
    return exchange_tables(comm, parts)
