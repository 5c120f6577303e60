"""The Communicator interface and the plumbing every communicator shares.

``Communicator`` is what the kernel is written against: rank, world size, all-to-all
``exchange`` and MPI-style collectives on Arrow tables. The base class does, once for the store
and the direct transports alike: argument checks (before any data moves, so every rank raises
the same error), sequencing (every rank calls collectives in the same order; each call gets the
next number), sticky failures (a failed collective makes every later call re-raise it),
schema agreement of what arrives, ``allreduce`` as an allgather reduced in rank order
(bit-identical on every rank), and close/abort. Subclasses implement the five ``_*_impl`` hooks
and ``_release``.
"""

from __future__ import annotations

import abc
import io
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from .errors import ConfigError, ExchangeError, ExchangeTimeoutError, SchemaMismatchError, StoreError

#: Seconds a collective waits for the other ranks (per call) unless told otherwise.
DEFAULT_TIMEOUT = float(os.environ.get("CYLON_STORE_TIMEOUT", "120"))
REDUCE_OPS = ("sum", "min", "max", "prod")


def normalize_parts(parts: Sequence, world_size: int, rank: int) -> tuple[Optional[pa.Schema], list]:
    """Check ``parts`` (one entry per destination: Table, RecordBatch, None) and return the common
    schema (None if every part is None) and the parts as Tables or None."""
    if isinstance(parts, (pa.Table, pa.RecordBatch)) or not hasattr(parts, "__len__"):
        raise ConfigError(f"exchange takes a list of {world_size} parts (one per destination rank), "
                          f"got {type(parts).__name__}")
    if len(parts) != world_size:
        raise ConfigError(f"exchange on rank {rank}: got {len(parts)} parts for a world of "
                          f"{world_size} ranks (parts[d] goes to rank d)")
    schema = None
    out: list[Optional[pa.Table]] = []
    for d, p in enumerate(parts):
        if p is None:
            out.append(None)
            continue
        if isinstance(p, pa.RecordBatch):
            p = pa.Table.from_batches([p])
        if not isinstance(p, pa.Table):
            raise ConfigError(f"exchange part {d} on rank {rank} is a {type(p).__name__}; parts are "
                              f"pyarrow Tables, RecordBatches or None")
        if schema is None:
            schema = p.schema
        elif not p.schema.equals(schema):
            raise SchemaMismatchError(f"rank {rank}: parts for different destinations have different "
                                      f"schemas:\npart 0..: {schema}\npart {d}: {p.schema}")
        out.append(p)
    return schema, out


def empty_like(schema: Optional[pa.Schema]) -> pa.Table:
    return pa.table({}) if schema is None else schema.empty_table()


def as_table(table: Any, what: str) -> Optional[pa.Table]:
    if table is None or isinstance(table, pa.Table):
        return table
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    raise ConfigError(f"{what} takes a pyarrow Table, RecordBatch or None, got {type(table).__name__}")


def encode_value(value) -> pa.Table:
    """A number or numpy array as a one-row table (for allreduce over table transports)."""
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind not in "biufc":
        raise ConfigError(f"allreduce takes numbers or numeric numpy arrays, got {type(value).__name__}"
                          f" of dtype {arr.dtype}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    # 0: array, 1: numpy scalar, 2: Python number (returned as a Python number again)
    kind = 2 if isinstance(value, (int, float, complex)) else (1 if arr.ndim == 0 else 0)
    return pa.table({"npy": pa.array([buf.getvalue()], pa.binary()), "kind": pa.array([kind], pa.int8())})


def decode_value(table: pa.Table):
    arr = np.load(io.BytesIO(table.column("npy")[0].as_py()), allow_pickle=False)
    kind = table.column("kind")[0].as_py()
    return arr.item() if kind == 2 else (arr[()] if kind == 1 else arr)


def reduce_values(values: list, op: str):
    """Reduce in rank order, so every rank computes the bit-identical result."""
    if op not in REDUCE_OPS:
        raise ConfigError(f"allreduce op must be one of {list(REDUCE_OPS)}, got {op!r}")
    fn = {"sum": np.add, "min": np.minimum, "max": np.maximum, "prod": np.multiply}[op]
    acc = values[0]
    for v in values[1:]:
        acc = fn(acc, v)
    if isinstance(values[0], (bool, int, float, complex)) and np.ndim(acc) == 0:
        return np.asarray(acc).item()
    return acc


def check_schema(reference: Optional[pa.Schema], ref_rank: Optional[int],
                 schema: Optional[pa.Schema], src: int, seq: int, what: str) -> None:
    """SchemaMismatchError unless ``schema`` (sent by ``src``) equals the reference."""
    if reference is None or schema is None:
        return
    if not schema.equals(reference):
        raise SchemaMismatchError(
            f"{what} {seq}: rank {src} sent a different schema than rank {ref_rank}:\n"
            f"rank {ref_rank}: {reference}\nrank {src}: {schema}", seq=seq)


def assemble(what: str, seq: int, rank: int, world_size: int, own_schema: Optional[pa.Schema],
             own: Optional[pa.Table], received: dict, check: bool = True) -> list[pa.Table]:
    """Results in rank order.  The reference schema is this rank's (or the first sender's, in
    rank order); every received schema must equal it (unless not ``check``).  Since every rank
    sees every other rank's schema in an exchange or allgather, a mismatch is raised on every
    rank."""
    ref_schema, ref_rank = own_schema, (rank if own_schema is not None else None)
    for src in sorted(received):
        t = received[src]
        if t is not None and ref_schema is None:
            ref_schema, ref_rank = t.schema, src
    for src in sorted(received):
        t = received[src]
        if check:
            check_schema(ref_schema, ref_rank, t.schema if t is not None else None, src, seq, what)
    out = []
    for s in range(world_size):
        t = own if s == rank else received.get(s)
        out.append(empty_like(ref_schema) if t is None else t)
    return out


_log = logging.getLogger("cylon_store")

class Communicator(abc.ABC):
    """What the kernel needs: rank, world size, all-to-all exchange and collectives.

    Every rank calls collectives in the same order, as in MPI; each call gets the next sequence
    number.  Tables travel as Arrow; values of ``allreduce`` are numbers or numpy arrays.
    """

    rank: int
    world_size: int
    job: str
    if TYPE_CHECKING:
        # A class attribute in most communicators, a read-only property in the store's.
        @property
        def scheme(self) -> str:
            raise NotImplementedError
    #: The first failure of a collective on this rank (it sticks), and whether close() ran.
    _failed: Optional[BaseException] = None
    _closed: bool = False
    _seq: int = 0
    #: False during ``exchange(..., check_schemas=False)``.
    _check_schemas: bool = True
    #: Set by a launcher that runs ranks as threads: a failed sibling ends our waits now.
    cancel_event: Any = None

    # -- the public collectives: checks and sequencing here, the work in the hooks ------------
    def exchange(self, parts: Sequence[Optional[pa.Table]], *,
                 check_schemas: bool = True) -> list[pa.Table]:
        """All-to-all: ``parts[d]`` goes to rank d; ``result[s]`` came from rank s.  None or an
        empty table is allowed; an empty result still carries the schema.

        ``check_schemas=False``: ranks may send parts of different schemas (each rank's parts
        still share one); every result keeps its sender's schema and metadata.  The kernel
        uses it to check its inputs inside the exchange that moves them."""
        seq = self._next("exchange")
        schema, parts = normalize_parts(parts, self.world_size, self.rank)
        if check_schemas:
            return self._run("exchange", seq, lambda: self._exchange_impl(seq, schema, parts))
        self._check_schemas = False
        try:
            return self._run("exchange", seq, lambda: self._exchange_impl(seq, schema, parts))
        finally:
            self._check_schemas = True

    def allgather(self, table: Optional[pa.Table]) -> list[pa.Table]:
        seq = self._next("allgather")
        table = as_table(table, "allgather")
        return self._run("allgather", seq, lambda: self._allgather_impl(seq, table))

    def gather(self, table: Optional[pa.Table], root: int = 0) -> Optional[list[pa.Table]]:
        self._check_root(root, "gather")
        seq = self._next("gather")
        table = as_table(table, "gather")
        return self._run("gather", seq, lambda: self._gather_impl(seq, table, int(root)))

    def bcast(self, table: Optional[pa.Table], root: int = 0) -> pa.Table:
        self._check_root(root, "bcast")
        seq = self._next("bcast")
        table = as_table(table, "bcast")
        if self.rank == root and table is None:
            raise ConfigError(f"bcast: the root (rank {root}) must pass a table")
        return self._run("bcast", seq, lambda: self._bcast_impl(seq, table, int(root)))

    def barrier(self) -> None:
        seq = self._next("barrier")
        self._run("barrier", seq, lambda: self._barrier_impl(seq))

    def allreduce(self, value, op: str = "sum"):
        """Allgather of the encoded values, then a reduction in rank order (bit-identical on
        every rank).  Values of different dtype or shape raise ConfigError on every rank."""
        if op not in REDUCE_OPS:
            raise ConfigError(f"allreduce op must be one of {list(REDUCE_OPS)}, got {op!r}")
        tables = self.allgather(encode_value(value))
        values = [decode_value(t) for t in tables]
        sigs = [(np.asarray(v).dtype.str, np.shape(v)) for v in values]
        odd = [r for r, s in enumerate(sigs) if s != sigs[0]]
        if odd:
            raise ConfigError(f"allreduce: ranks passed values of different dtype or shape: rank 0 "
                              f"{sigs[0]}, rank(s) {odd} {[sigs[r] for r in odd]}")
        return reduce_values(values, op)

    # -- hooks ----------------------------------------------------------------------------
    @abc.abstractmethod
    def _exchange_impl(self, seq: int, schema: Optional[pa.Schema], parts: list) -> list[pa.Table]:
        """``parts`` checked (Tables or None, one schema or None); return the results."""

    @abc.abstractmethod
    def _allgather_impl(self, seq: int, table: Optional[pa.Table]) -> list[pa.Table]:
        ...

    @abc.abstractmethod
    def _gather_impl(self, seq: int, table: Optional[pa.Table], root: int) -> Optional[list[pa.Table]]:
        ...

    @abc.abstractmethod
    def _bcast_impl(self, seq: int, table: Optional[pa.Table], root: int) -> pa.Table:
        ...

    @abc.abstractmethod
    def _barrier_impl(self, seq: int) -> None:
        ...

    def _final_barrier(self, seq: int) -> None:
        """The barrier of ``close`` (a communicator may need a different one there)."""
        self._barrier_impl(seq)

    @abc.abstractmethod
    def _release(self, healthy: bool) -> None:
        """Delete what this rank left behind and free its resources (``healthy``: every rank
        passed the final barrier)."""

    # -- plumbing -------------------------------------------------------------------------
    def _next(self, what: str) -> int:
        if self._closed:
            raise ExchangeError(f"{what}: the communicator of job {self.job!r} is closed",
                                backend=self.scheme)
        if self._failed is not None:
            raise ExchangeError(f"{what}: an earlier collective of job {self.job!r} failed on rank "
                                f"{self.rank}: {self._failed}", backend=self.scheme) from self._failed
        self._seq += 1
        return self._seq

    def _run(self, what: str, seq: int, fn: Callable[[], Any]):
        """Run a collective's work; a failure sticks (except a schema mismatch or bad argument
        found by every rank alike: the collective completed, the communicator stays usable)."""
        try:
            return fn()
        except (SchemaMismatchError, ConfigError):
            raise
        except StoreError as exc:
            self._failed = exc
            raise
        except Exception as exc:
            err = ExchangeError(f"{what} {seq} failed on rank {self.rank}: {exc!r}", seq=seq,
                                backend=self.scheme)
            self._failed = err
            raise err from exc
        except BaseException as exc:
            # Ctrl-C, SystemExit: the run is over on this rank (the failure sticks, so the
            # context manager aborts and cleans up), but they propagate as themselves.
            self._failed = ExchangeError(f"{what} {seq} interrupted on rank {self.rank}: "
                                         f"{type(exc).__name__}", seq=seq, backend=self.scheme)
            raise

    def _check_root(self, root: int, what: str) -> None:
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.world_size:
            raise ConfigError(f"{what}: root {root!r} is not a rank of a world of {self.world_size}")

    def _cancelled(self) -> bool:
        ev = self.cancel_event
        return ev is not None and ev.is_set()

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Final barrier when healthy, then ``_release``; an error of that barrier is raised
        after the release, so a failing close still leaves nothing behind."""
        if self._closed:
            return
        first_error = None
        if self._failed is None:
            try:
                seq = self._next("barrier")
                self._run("barrier", seq, lambda: self._final_barrier(seq))
            except BaseException as exc:  # still release, then report
                first_error = exc
        self._closed = True
        earlier = first_error or self._failed
        try:
            self._release(healthy=earlier is None)
        except Exception as exc:
            if earlier is None:
                raise
            # The error that ended the job is the one to report; the failed cleanup is logged
            # (with what to run) instead of replacing it.
            _log.warning("rank %s of job %r: cleanup after an error failed too (%s: %s); "
                         "`cylon-store clean URL --job %s` removes what is left", self.rank,
                         self.job, type(exc).__name__, exc, self.job)
        if first_error is not None:
            raise first_error

    def abort(self) -> None:
        """Close without the final synchronisation (after an error on this rank): delete what
        this rank left behind and release resources; other ranks fail at their timeout."""
        if self._failed is None:
            self._failed = ExchangeError(f"rank {self.rank} of job {self.job!r} aborted",
                                         backend=getattr(self, "scheme", None))
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self):
        return (f"{type(self).__name__}(job={getattr(self, 'job', None)!r}, rank={self.rank}, "
                f"world_size={self.world_size})")


# -- rank and world size ------------------------------------------------------------------------

_ENV_RANKS = (
    ("CYLON_STORE_RANK", "CYLON_STORE_WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
)


def ranks_from_env(env: Optional[Mapping[str, str]] = None) -> tuple[Optional[int], Optional[int]]:
    env = os.environ if env is None else env
    for rvar, svar in _ENV_RANKS:
        if rvar in env and svar in env:
            return int(env[rvar]), int(env[svar])
    return None, None


def resolve_world(rank: Optional[int], world_size: Optional[int], timeout: Optional[float], *,
                  what: str,
                  max_world: Optional[int] = None) -> tuple[Optional[int], int]:
    """Check ``timeout``; take rank and world size from the arguments, else the environment
    (rank only when the world sizes agree); check both.  Rank may stay None (a claim decides)."""
    if timeout is None or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    env_rank, env_size = ranks_from_env()
    if world_size is None:
        world_size = env_size
    if rank is None and world_size == env_size:
        rank = env_rank
    if world_size is None:
        raise ConfigError(f"{what}: world_size is unknown: pass world_size=..., or run under "
                          f"cs.launch or mpirun")
    top = max_world or float("inf")
    if not isinstance(world_size, (int, np.integer)) or not 1 <= world_size <= top:
        bound = f"an integer in [1, {max_world}]" if max_world else "a positive integer"
        raise ConfigError(f"world_size must be {bound}, got {world_size!r}")
    if rank is not None and (not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size):
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank!r}")
    return (None if rank is None else int(rank)), int(world_size)


# -- failures of a run ---------------------------------------------------------------------------

def first_cause(errors: dict) -> int:
    """The rank whose error caused the others: a rank's own error first; then a timeout that
    names a rank which did not fail itself (the root of a chain of waits: rank 0 waiting on
    rank 3 that waited on rank 4 names 3, but rank 3's error names the cause, 4); then any
    other timeout; last a wait cancelled because a sibling had failed."""
    def priority(rank):
        exc = errors[rank]
        if isinstance(exc, ExchangeTimeoutError):
            missing = getattr(exc, "missing", None) or []
            return 1 if any(m not in errors for m in missing) else 2
        return 3 if isinstance(exc, ExchangeError) else 0
    return min(errors, key=lambda r: (priority(r), r))
