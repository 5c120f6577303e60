"""Distributed operators written once against the Communicator.

Each takes the Communicator and this rank's local table and returns this rank's part of the
result; every rank calls them in the same order.  Bad arguments raise the same ``KernelError``
on every rank, before anything is exchanged.
"""

from ._common import (ColumnNotFoundError, KernelError, KeyTypeError, RankMismatchError,
                      UnsupportedAggregationError)
from .groupby import AGGREGATIONS, groupby
from .join import join
from .partition import hash_array, hash_columns, hash_partition
from .setops import difference, intersect, union, unique
from .shuffle import repartition, shuffle
from .sort import sort

__all__ = [
    "shuffle", "join", "groupby", "sort", "unique", "union", "intersect", "difference",
    "repartition", "hash_array", "hash_columns", "hash_partition", "AGGREGATIONS",
    "KernelError", "ColumnNotFoundError", "KeyTypeError", "UnsupportedAggregationError",
    "RankMismatchError",
]
