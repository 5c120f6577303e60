"""cylon-store: the storage and exchange layer for distributed Arrow dataframes.

``open_store(url)`` gives one Arrow put/get facade over memory, POSIX/EFS, S3, DynamoDB and Redis;
``connect(...)`` a Communicator (all-to-all exchange and collectives) over any of them or over
MPI/UCX; ``launch(fn, n)`` runs ``fn(comm)`` on n ranks; ``cylon_store.kernel`` holds the
distributed operators.  Importing this package loads no cloud SDK or transport.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .adapters.base import Capabilities, ObjectMeta, PutMode
from .errors import (AlreadyExistsError, ConfigError, ExchangeError, ExchangeTimeoutError,
                     IntegrityError, InvalidKeyError, NotFoundError, NotSupportedError,
                     PayloadTooLargeError, PermissionDeniedError, PreconditionError,
                     RankFailedError, RendezvousError, SchemaMismatchError, StoreError,
                     ThrottledError, TransientError)
from .comm import Communicator, connect
from .launch import launch
from .registry import register
from .store import Store, open_store

try:
    __version__ = _metadata.version("cylon-store")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "DataFrame": ("cylon_store.kernel.frame", "DataFrame"),
    "concat": ("cylon_store.kernel.frame", "concat"),
    # the pycylon-compatible front end (cylon_store.cylon) and distributed I/O (cylon_store.io)
    "CylonEnv": ("cylon_store.cylon", "CylonEnv"),
    "StoreConfig": ("cylon_store.cylon", "StoreConfig"),
    "read_csv_dist": ("cylon_store.io", "read_csv_dist"),
    "read_json_dist": ("cylon_store.io", "read_json_dist"),
    "read_parquet_dist": ("cylon_store.io", "read_parquet_dist"),
    "write_csv_dist": ("cylon_store.io", "write_csv_dist"),
    "write_json_dist": ("cylon_store.io", "write_json_dist"),
    "write_parquet_dist": ("cylon_store.io", "write_parquet_dist"),
}


def __getattr__(name):
    # The kernel loads on first use.
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in ("kernel", "cylon", "io"):
        import importlib
        return importlib.import_module(f"cylon_store.{name}")
    raise AttributeError(f"module 'cylon_store' has no attribute {name!r}")


__all__ = [
    "open_store", "Store", "connect", "Communicator", "launch", "DataFrame", "register", "concat",
    "CylonEnv", "StoreConfig", "read_csv_dist", "read_json_dist", "read_parquet_dist",
    "write_csv_dist", "write_json_dist", "write_parquet_dist",
    "PutMode", "Capabilities", "ObjectMeta",
    "StoreError", "NotFoundError", "AlreadyExistsError", "PreconditionError", "NotSupportedError",
    "ThrottledError", "TransientError", "IntegrityError", "PayloadTooLargeError",
    "PermissionDeniedError", "ConfigError", "InvalidKeyError", "ExchangeError",
    "ExchangeTimeoutError", "SchemaMismatchError", "RendezvousError", "RankFailedError",
]
