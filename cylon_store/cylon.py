"""A pycylon-compatible front end: port a pycylon program by changing its import line.

    from pycylon import DataFrame, CylonEnv            # before
    from pycylon.net import MPIConfig
    from cylon_store.cylon import DataFrame, CylonEnv  # after
    from cylon_store.cylon.net import MPIConfig        # (or from cylon_store.cylon)

``CylonEnv(config=MPIConfig())`` runs over MPI (under ``mpirun``), ``UCXConfig()`` over UCX,
``StoreConfig(url, job=...)`` over any store (``s3://``, ``file://``, ``redis://``, ...), and
``CylonEnv(comm)`` wraps a Communicator (e.g. inside ``cs.launch``).  ``CylonEnv()``: a world of
one.  The DataFrame is ``cylon_store.kernel.frame.DataFrame`` (also ``cs.DataFrame``); the I/O
functions are ``cylon_store.io``'s.  docs/pycylon.md maps every pycylon call and its
differences.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Optional

from .errors import ConfigError
from .io import (IncompleteDatasetError, read_csv, read_csv_dist, read_json, read_json_dist,
                 read_parquet, read_parquet_dist, write_csv_dist, write_json_dist,
                 write_parquet_dist)
from .kernel.frame import DataFrame, GroupByDataFrame, LocalCommunicator, comm_of, concat

__all__ = ["CylonEnv", "CylonContext", "DataFrame", "GroupByDataFrame", "concat", "read_csv",
           "read_parquet", "read_json", "read_csv_dist", "read_parquet_dist", "read_json_dist",
           "write_csv_dist", "write_parquet_dist", "write_json_dist", "CommConfig", "StoreConfig",
           "MPIConfig", "UCXConfig", "GlooMPIConfig", "GlooStandaloneConfig", "CommType",
           "IncompleteDatasetError", "net"]

#: The job id ranks started by mpirun share unless CYLON_STORE_JOB says otherwise.
DEFAULT_JOB = "cylon"


class CommType:
    """pycylon's communication types (``config.comm_type``)."""
    LOCAL = "local"
    MPI = "mpi"
    UCX = "ucx"
    GLOO = "gloo"
    STORE = "store"


class CommConfig:
    """A way to join a job: ``connect()`` returns the Communicator."""

    comm_type = CommType.STORE

    def __init__(self, url: str, *, job: Optional[str] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None, timeout: Optional[float] = None, **options):
        self.url = url
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.options = options

    def connect(self):
        from .comm import connect
        kwargs: dict[str, Any] = dict(self.options)
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        job = self.job or os.environ.get("CYLON_STORE_JOB") or self._default_job()
        return connect(self.url, job=job, rank=self.rank, world_size=self.world_size, **kwargs)

    def _default_job(self) -> str:
        raise ConfigError(f"{type(self).__name__}: pass job=... (an id all ranks of the run share) "
                          f"or set CYLON_STORE_JOB")

    def __repr__(self):
        return f"{type(self).__name__}({self.url!r}, job={self.job!r})"


class StoreConfig(CommConfig):
    """Ranks exchange through a store: ``StoreConfig("s3://bucket/prefix", job="run-1",
    world_size=4)``.  ``url``/``job`` default to ``$CYLON_STORE_URL``/``$CYLON_STORE_JOB`` (set
    for the ranks of ``cs.launch``); rank and world size come from the arguments, the
    environment (launchers, mpirun) or a rendezvous through the store."""

    def __init__(self, url: Optional[str] = None, job: Optional[str] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None, timeout: Optional[float] = None, **options):
        url = url or os.environ.get("CYLON_STORE_URL")
        if not url:
            raise ConfigError("StoreConfig needs a store URL (or $CYLON_STORE_URL), e.g. "
                              "'s3://bucket/prefix' or 'file:///mnt/efs/x'")
        super().__init__(url, job=job, rank=rank, world_size=world_size, timeout=timeout, **options)


class MPIConfig(CommConfig):
    """pycylon's ``MPIConfig(comm=None)``: MPI's COMM_WORLD (or the mpi4py ``comm``), run under
    ``mpirun``.  The job id defaults to "cylon"."""

    comm_type = CommType.MPI

    def __init__(self, comm=None, *, job: Optional[str] = None, timeout: Optional[float] = None, **options):
        if comm is not None:
            options["comm"] = comm
        super().__init__("mpi://", job=job, timeout=timeout, **options)

    def _default_job(self) -> str:
        return DEFAULT_JOB


class UCXConfig(CommConfig):
    """pycylon's ``UCXConfig(comm=None)``: the UCX transport (``ucx://``)."""

    comm_type = CommType.UCX

    def __init__(self, comm=None, *, job: Optional[str] = None, timeout: Optional[float] = None, **options):
        if comm is not None:
            options["comm"] = comm
        super().__init__("ucx://", job=job, timeout=timeout, **options)

    def _default_job(self) -> str:
        return DEFAULT_JOB


class GlooMPIConfig(MPIConfig):
    """pycylon's ``GlooMPIConfig``: ranks from MPI; here the exchange is MPI's as well."""

    comm_type = CommType.GLOO

    def set_tcp_hostname(self, hostname: str) -> None:  # accepted for pycylon's sake
        pass

    def set_tcp_iface(self, iface: str) -> None:
        pass

    def set_tcp_ai_family(self, ai_family: int) -> None:
        pass

    def set_timeout(self, timeout: int) -> None:
        self.timeout = float(timeout)


class GlooStandaloneConfig(CommConfig):
    """pycylon's ``GlooStandaloneConfig(rank, world_size)`` with ``set_file_store_path(path)``:
    ranks meet in a shared directory, which here is a ``file://`` store (any shared POSIX or
    EFS path); ``set_store_prefix`` names the job."""

    comm_type = CommType.GLOO

    def __init__(self, rank: int = 0, world_size: int = 1, **options):
        super().__init__("", job=None, rank=rank, world_size=world_size, **options)

    def set_file_store_path(self, path: str) -> None:
        self.url = path if "://" in path else f"file://{os.path.abspath(path)}"

    def set_store_prefix(self, prefix: str) -> None:
        self.job = prefix

    def set_timeout(self, timeout: int) -> None:
        self.timeout = float(timeout)

    def set_tcp_hostname(self, hostname: str) -> None:
        pass

    def set_tcp_iface(self, iface: str) -> None:
        pass

    def set_tcp_ai_family(self, ai_family: int) -> None:
        pass

    def connect(self):
        if not self.url:
            raise ConfigError("GlooStandaloneConfig: call set_file_store_path(path) first")
        return super().connect()

    def _default_job(self) -> str:
        return DEFAULT_JOB


class CylonContext:
    """pycylon's context object (``env.context``): ranks, barrier, finalize."""

    def __init__(self, env: "CylonEnv"):
        self._env = env

    def get_rank(self) -> int:
        return self._env.rank

    def get_world_size(self) -> int:
        return self._env.world_size

    def get_neighbours(self, include_self: bool = False) -> list[int]:
        me = self._env.rank
        return [r for r in range(self._env.world_size) if include_self or r != me]

    def is_distributed(self) -> bool:
        return self._env.is_distributed

    def barrier(self) -> None:
        self._env.barrier()

    def finalize(self) -> None:
        self._env.finalize()

    @property
    def comm(self):
        return self._env.comm


class CylonEnv:
    """pycylon's execution environment.  ``CylonEnv(config=MPIConfig())``, ``UCXConfig()``,
    ``StoreConfig(url, job=...)``, a Communicator (``CylonEnv(comm)``), or nothing (a world of
    one).  ``finalize()`` closes a communicator the env opened (not one it was given)."""

    def __init__(self, config=None, distributed: bool = True) -> None:
        self._finalized = False
        self._own = False
        if isinstance(config, CylonEnv):
            self._comm: Any = config.comm
        elif config is None or not distributed:
            self._comm = LocalCommunicator()
            self._own = True
        elif isinstance(config, CommConfig):
            self._comm = config.connect()
            self._own = True
        else:
            comm = comm_of(config) if hasattr(config, "world_size") else None
            if comm is None:
                raise ConfigError(f"CylonEnv: config must be MPIConfig(), UCXConfig(), "
                                  f"StoreConfig(url, ...) or a Communicator, got {type(config).__name__}")
            self._comm = comm
        self._distributed = bool(distributed and config is not None)
        self._context = CylonContext(self)

    @property
    def comm(self):
        """The Communicator: pass it to ``cylon_store.kernel`` operators directly."""
        return self._comm

    @property
    def context(self) -> CylonContext:
        return self._context

    @property
    def rank(self) -> int:
        return int(self._comm.rank)

    @property
    def world_size(self) -> int:
        return int(self._comm.world_size)

    @property
    def is_distributed(self) -> bool:
        return self._distributed

    def barrier(self) -> None:
        self._comm.barrier()

    def finalize(self) -> None:
        """Close the communicator this env opened (collective, like MPI_Finalize); idempotent."""
        if not self._finalized:
            self._finalized = True
            if self._own:
                self._comm.close()

    def __enter__(self) -> "CylonEnv":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        elif self._own and not self._finalized:
            self._finalized = True
            self._comm.abort()

    def __repr__(self):
        return f"CylonEnv(rank={self.rank}, world_size={self.world_size}, comm={self._comm!r})"


# ``from cylon_store.cylon.net import MPIConfig`` as ``from pycylon.net import MPIConfig``.
net = types.ModuleType(__name__ + ".net", "pycylon.net's configurations (cylon_store.cylon.net).")
for _name in ("CommConfig", "StoreConfig", "MPIConfig", "UCXConfig", "GlooMPIConfig",
              "GlooStandaloneConfig", "CommType"):
    setattr(net, _name, globals()[_name])
net.__all__ = ["CommConfig", "StoreConfig", "MPIConfig", "UCXConfig", "GlooMPIConfig",  # type: ignore[attr-defined]
               "GlooStandaloneConfig", "CommType"]
sys.modules[net.__name__] = net
