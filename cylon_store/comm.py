"""Communicators: all-to-all exchange and MPI-style collectives for Arrow tables.

``Communicator`` is the interface the kernel is written against; ``StoreCommunicator`` builds it
on any blob store (the serverless path: ranks meet only through storage), and direct transports
(MPI, UCX) register their own under their URL scheme.  Guarantees of the store path: a message
is read exactly once, only by its destination, only within its job and run; every wait ends at
the timeout naming the ranks that never delivered; a failure sticks (later calls re-raise it);
``close()`` leaves nothing of this rank's behind.
"""

from __future__ import annotations

import abc
import importlib
import io
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union

import msgpack
import numpy as np
import pyarrow as pa

from . import codec
from . import keys as K
from .errors import (AlreadyExistsError, ConfigError, ExchangeError, ExchangeTimeoutError,
                     IntegrityError, NotFoundError, RendezvousError, SchemaMismatchError, StoreError)
from .retry import poll_delays
from .store import MAX_KEY_BYTES, Store, open_store

DEFAULT_TIMEOUT = float(os.environ.get("CYLON_STORE_TIMEOUT", "120"))
_NOSCHEMA = b"cylon.noschema"
_REDUCE_OPS = ("sum", "min", "max", "prod")

#: Direct transports: URL scheme -> "module:connect_function" (loaded lazily).
_TRANSPORTS: dict[str, str] = {
    "mpi": "cylon_store.transports.mpi:connect",
    "ucx": "cylon_store.transports.ucx:connect",
}


def register_transport(scheme: str, target: str) -> None:
    _TRANSPORTS[scheme.lower()] = target


# ---------------------------------------------------------------------------------------------
# Helpers shared by every communicator
# ---------------------------------------------------------------------------------------------

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
    out = []
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
    if op not in _REDUCE_OPS:
        raise ConfigError(f"allreduce op must be one of {list(_REDUCE_OPS)}, got {op!r}")
    fn = {"sum": np.add, "min": np.minimum, "max": np.maximum, "prod": np.multiply}[op]
    acc = values[0]
    for v in values[1:]:
        acc = fn(acc, v)
    if isinstance(values[0], (bool, int, float, complex)) and np.ndim(acc) == 0:
        return np.asarray(acc).item()
    return acc


def _check_schema(reference: Optional[pa.Schema], ref_rank: Optional[int], schema: Optional[pa.Schema],
                  src: int, seq: int, what: str):
    if reference is None or schema is None:
        return
    if not schema.equals(reference):
        raise SchemaMismatchError(
            f"{what} {seq}: rank {src} sent a different schema than rank {ref_rank}:\n"
            f"rank {ref_rank}: {reference}\nrank {src}: {schema}", seq=seq)


def _strip_marker(table: pa.Table) -> tuple[Optional[pa.Table], bool]:
    meta = table.schema.metadata or {}
    if _NOSCHEMA in meta:
        return None, True
    return table, False


def _noschema_table() -> pa.Table:
    return pa.table({}).replace_schema_metadata({_NOSCHEMA: b"1"})


# ---------------------------------------------------------------------------------------------
# Write-combined exchange: layout, request model, strategy choice
# ---------------------------------------------------------------------------------------------

# The byte layouts, routing and request model live in layout.py; re-exported here.
from .layout import (REQUEST_PRICED, STRATEGIES, Grid, cheapest_strategy,  # noqa: E402,F401
                     combined_header, combined_header_size, decode_tag, encode_tag, expect_slot,
                     find_slot, parse_combined_header, parse_pieces, pieces_header,
                     request_cost_usd, request_model, slot_range)


def choose_strategy(exchange: str, store: Store, world_size: int) -> str:
    if exchange not in STRATEGIES:
        raise ConfigError(f"exchange must be one of {list(STRATEGIES)}, got {exchange!r}")
    if exchange != "auto":
        if exchange in ("combined", "twolevel") and not store.capabilities.byte_ranges:
            raise ConfigError(f"exchange={exchange!r} needs byte-range reads, which the "
                              f"{store.scheme}:// backend does not declare")
        return exchange
    if store.scheme in REQUEST_PRICED and store.capabilities.byte_ranges:
        # Fewer requests where each is billed (see layout.cheapest_strategy for the numbers).
        return cheapest_strategy(world_size, store.scheme)
    return "direct"


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------

class Communicator(abc.ABC):
    """What the kernel needs: rank, world size, all-to-all exchange and collectives.

    Every rank calls collectives in the same order, as in MPI; each call gets the next sequence
    number.  Tables travel as Arrow; values of ``allreduce`` are numbers or numpy arrays.
    """

    rank: int
    world_size: int
    job: str

    @abc.abstractmethod
    def exchange(self, parts: Sequence[Optional[pa.Table]]) -> list[pa.Table]:
        """All-to-all: ``parts[d]`` goes to rank d; ``result[s]`` came from rank s.  None or an
        empty table is allowed; an empty result still carries the schema."""

    @abc.abstractmethod
    def allgather(self, table: Optional[pa.Table]) -> list[pa.Table]:
        ...

    @abc.abstractmethod
    def gather(self, table: Optional[pa.Table], root: int = 0) -> Optional[list[pa.Table]]:
        ...

    @abc.abstractmethod
    def bcast(self, table: Optional[pa.Table], root: int = 0) -> pa.Table:
        ...

    def allreduce(self, value, op: str = "sum"):
        if op not in _REDUCE_OPS:
            raise ConfigError(f"allreduce op must be one of {list(_REDUCE_OPS)}, got {op!r}")
        tables = self.allgather(encode_value(value))
        return reduce_values([decode_value(t) for t in tables], op)

    @abc.abstractmethod
    def barrier(self) -> None:
        ...

    #: The first failure of a collective on this rank (it sticks), and whether close() ran.
    _failed: Optional[BaseException] = None
    _closed: bool = False

    def close(self) -> None:
        """Final barrier when healthy, then ``_release``; an error of that barrier is raised
        after the release, so a failing close still leaves nothing behind."""
        if self._closed:
            return
        first_error = None
        if self._failed is None:
            try:
                self.barrier()
            except BaseException as exc:  # still release, then report
                first_error = exc
        self._closed = True
        self._release(healthy=first_error is None and self._failed is None)
        if first_error is not None:
            raise first_error

    def _release(self, healthy: bool) -> None:
        """Delete what this rank left behind and free its resources (``healthy``: every rank
        passed the final barrier)."""
        raise NotImplementedError

    def _check_root(self, root: int, what: str) -> None:
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.world_size:
            raise ConfigError(f"{what}: root {root!r} is not a rank of a world of {self.world_size}")

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
        return f"{type(self).__name__}(job={getattr(self, 'job', None)!r}, rank={self.rank}, world_size={self.world_size})"


# ---------------------------------------------------------------------------------------------
# Rank assignment
# ---------------------------------------------------------------------------------------------

_ENV_RANKS = (
    ("CYLON_STORE_RANK", "CYLON_STORE_WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
)


def ranks_from_env(env=None) -> tuple[Optional[int], Optional[int]]:
    env = os.environ if env is None else env
    for rvar, svar in _ENV_RANKS:
        if rvar in env and svar in env:
            return int(env[rvar]), int(env[svar])
    return None, None


def resolve_world(rank, world_size, timeout, *, what: str,
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
    return rank, int(world_size)


class StoreRendezvous:
    """Claim the lowest free rank slot by create-if-absent (file: ``link``; memory: a lock)."""

    name = "store"

    def claim(self, store: Store, job: str, world_size: int, hello_for: Callable[[int], bytes],
              deadline: float) -> int:
        start = int.from_bytes(os.urandom(2), "little") % world_size  # spread first attempts
        for i in range(world_size):
            rank = (start + i) % world_size
            try:
                store.put_bytes(K.hello_key(job, rank), hello_for(rank), mode="create")
                return rank
            except AlreadyExistsError:
                continue
        raise RendezvousError(
            f"job {job!r} is full: all {world_size} rank slots are taken. Another run of this job "
            f"is active, or an earlier one did not close; remove its keys with `cylon-store clean "
            f"{store.url} --job {job}` or use a new job id", backend=store.scheme)


class CounterRendezvous:
    """Rank by an atomic increment (Redis INCR, DynamoDB ADD, memory), as Cylon's serverless
    bootstrap does; then the hello record is created like any explicit rank's."""

    name = "counter"

    def claim(self, store: Store, job: str, world_size: int, hello_for: Callable[[int], bytes],
              deadline: float) -> int:
        if not store.capabilities.atomic_counter:
            raise ConfigError(f"the {store.scheme}:// backend has no atomic counter; use "
                              f"rendezvous='store'")
        rank = store.adapter.incr(K.counter_key(job)) - 1
        if rank >= world_size:
            raise RendezvousError(
                f"job {job!r}: rank counter reached {rank + 1} for a world of {world_size}; an "
                f"earlier run did not close (clean with `cylon-store clean {store.url} --job "
                f"{job}`) or more processes joined than world_size", backend=store.scheme)
        _create_hello(store, job, rank, hello_for(rank))
        return rank


def _create_hello(store: Store, job: str, rank: int, hello: bytes) -> None:
    try:
        store.put_bytes(K.hello_key(job, rank), hello, mode="create")
    except AlreadyExistsError as exc:
        raise RendezvousError(
            f"rank {rank} of job {job!r} is already taken: another run of this job is active, or "
            f"an earlier one did not close (remove its keys with `cylon-store clean {store.url} "
            f"--job {job}`, or use a new job id)", backend=store.scheme) from exc


def _resolve_rendezvous(rendezvous, store: Store):
    if rendezvous is None or rendezvous == "auto":
        return CounterRendezvous() if store.capabilities.atomic_counter else StoreRendezvous()
    if rendezvous == "store":
        return StoreRendezvous()
    if rendezvous == "counter":
        return CounterRendezvous()
    if hasattr(rendezvous, "claim"):
        return rendezvous
    raise ConfigError(f"rendezvous must be None, 'store', 'counter' or an object with claim(), "
                      f"got {rendezvous!r}")


# ---------------------------------------------------------------------------------------------
# The store communicator
# ---------------------------------------------------------------------------------------------

class StoreCommunicator(Communicator):
    """Collectives through a blob store; see the module docstring for the guarantees."""

    def __init__(self, store: Store, *, job: str, rank: int, world_size: int, token: str,
                 members: list[dict], timeout: float, own_store: bool, used_counter: bool,
                 exchange: str = "auto"):
        self.store = store
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.token = token
        self.members = members
        self.timeout = timeout
        self._own_store = own_store
        self._used_counter = used_counter
        self.strategy = choose_strategy(exchange, store, world_size)
        #: Longest sleep between two polls: short where a LIST is free (local disk, shared
        #: memory, Redis), longer where every LIST is billed.
        self.poll_cap = 0.1 if store.scheme in REQUEST_PRICED else 0.02
        self.poll_first = 0.01 if store.scheme in REQUEST_PRICED else 0.001
        self._seq = 0
        self._failed: Optional[BaseException] = None
        self._closed = False
        self._shared: list[tuple[int, str]] = []   # (seq, key) objects all ranks read; ours to delete
        self._pool = ThreadPoolExecutor(max_workers=store.options.concurrency,
                                        thread_name_prefix=f"cylon-r{rank}")
        self._notify = store.capabilities.notification
        self._inbox = K.channel(job, token, rank)
        #: Keys announced on our channel and not yet read (where the backend notifies, a
        #: receiver learns what arrived from these instead of LISTing; LIST stays the fallback).
        self._mailbox: set[str] = set()
        self.stats = {"exchanges": 0, "rows_sent": 0, "rows_received": 0}
        #: Set by a launcher that runs ranks as threads: a failed sibling ends our waits now.
        self.cancel_event = None

    # -- plumbing -----------------------------------------------------------------------
    def _next(self, what: str) -> int:
        if self._closed:
            raise ExchangeError(f"{what}: the communicator of job {self.job!r} is closed")
        if self._failed is not None:
            raise ExchangeError(f"{what}: an earlier collective of job {self.job!r} failed on rank "
                                f"{self.rank}: {self._failed}") from self._failed
        self._seq += 1
        return self._seq

    def _run(self, what: str, seq: int, fn: Callable[[], Any]):
        try:
            return fn()
        except SchemaMismatchError:
            raise  # the collective completed: the communicator stays usable
        except ConfigError:
            raise
        except StoreError as exc:
            self._failed = exc
            raise
        except BaseException as exc:
            err = ExchangeError(f"{what} {seq} failed on rank {self.rank}: {exc!r}", seq=seq,
                                backend=self.store.scheme)
            self._failed = err
            raise err from exc

    def _put(self, key: str, table: pa.Table, dst: Optional[int]) -> None:
        self.store.put(key, table)
        self._announce(key, range(self.world_size) if dst is None else [dst])

    def _announce(self, key: str, targets) -> None:
        """Tell each target (but us) that ``key`` is readable now."""
        if self._notify:
            message = key.encode()
            for d in targets:
                if d != self.rank:
                    self.store.adapter.notify(K.channel(self.job, self.token, d), message)

    def _receive(self, what: str, seq: int, srcs: list[int], dst: Optional[int], *,
                 delete: bool, read: Optional[Callable[[str], Any]] = None,
                 prefixes: Optional[list[str]] = None) -> dict[int, Any]:
        """Wait for the messages of ``srcs`` to ``dst`` (a rank, or None for shared objects;
        ``prefixes`` overrides where to look), read each as soon as it is visible, delete them
        if ``delete``."""
        pending = set(srcs)
        out: dict[int, Any] = {}
        if not pending:
            return out
        prefixes = tuple(prefixes or [K.inbox_prefix(self.job, self.token, seq, dst)])
        deadline = time.monotonic() + self.timeout
        delays = poll_delays(first=self.poll_first, cap=self.poll_cap)
        read_keys = []
        if self._notify:   # announcements of finished collectives are stale
            self._mailbox = {k for k in self._mailbox if _seq_of(k) >= seq}
        listed_at = time.monotonic()
        must_list = not self._notify
        while pending:
            present = {}
            if must_list:
                candidates = [k for prefix in prefixes for k in self.store.list(prefix)]
                listed_at, must_list = time.monotonic(), not self._notify
            else:
                candidates = [k for k in self._mailbox if k.startswith(prefixes)]
            for key in candidates:
                try:
                    mk = K.parse_msg_key(key)
                except ValueError:
                    continue
                if mk.src in pending:
                    present[mk.src] = key
            if present:
                futures = {src: self._pool.submit(read or self.store.get, key)
                           for src, key in present.items()}
                for src, fut in futures.items():
                    try:
                        out[src] = fut.result()
                    except NotFoundError as exc:
                        # Listed, then gone: only an aborting sender deletes its own messages.
                        raise ExchangeError(
                            f"{what} {seq} of job {self.job!r}: rank {src} failed and withdrew "
                            f"its data while rank {self.rank} was reading it", seq=seq,
                            backend=self.store.scheme) from exc
                    pending.discard(src)
                    read_keys.append(present[src])
                    self._mailbox.discard(present[src])
                continue
            if self.cancel_event is not None and self.cancel_event.is_set():
                raise ExchangeError(f"{what} {seq} of job {self.job!r}: cancelled on rank "
                                    f"{self.rank} because another rank failed", seq=seq)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(pending)
                raise ExchangeTimeoutError(
                    f"{what} {seq} of job {self.job!r}: rank {self.rank} timed out after "
                    f"{self.timeout:g}s waiting for rank(s) {missing} (store {self.store.url})",
                    seq=seq, missing=missing, backend=self.store.scheme)
            if self._notify:
                got = self.store.adapter.wait(self._inbox, min(remaining, 0.25))
                if isinstance(got, list):
                    self._mailbox.update(m.decode() for m in got if m)
                else:   # an adapter whose wait only wakes us up
                    must_list = True
                # Safety net: announcements lost with a broken connection cost one LIST a second.
                if time.monotonic() - listed_at > LIST_FALLBACK:
                    must_list = True
            else:
                time.sleep(min(remaining, next(delays)))
        if delete and read_keys:
            self.store.delete_many(read_keys)
        return out

    def _prune_shared(self, below: int) -> None:
        """Delete our shared objects of collectives every rank has finished (seq < below)."""
        done = [k for s, k in self._shared if s < below]
        if done:
            self._shared = [(s, k) for s, k in self._shared if s >= below]
            self.store.delete_many(done)

    # -- collectives --------------------------------------------------------------------
    def exchange(self, parts):
        seq = self._next("exchange")
        schema, parts = normalize_parts(parts, self.world_size, self.rank)
        return self._run("exchange", seq, lambda: self._exchange(seq, schema, parts))

    def _exchange(self, seq, schema, parts):
        if self.strategy == "combined" and self.world_size > 1:
            return self._exchange_combined(seq, schema, parts)
        if self.strategy == "twolevel" and self.world_size > 1:
            return self._exchange_twolevel(seq, schema, parts)
        me, P = self.rank, self.world_size
        send_futs = []
        for d in range(P):
            if d == me:
                continue
            part = parts[d]
            if part is None:
                part = empty_like(schema) if schema is not None else _noschema_table()
            self.stats["rows_sent"] += part.num_rows
            key = K.msg_key(self.job, self.token, seq, d, me)
            send_futs.append(self._pool.submit(self._put, key, part, d))
        got = self._receive("exchange", seq, [s for s in range(P) if s != me], me, delete=True)
        for f in send_futs:
            f.result()
        self.stats["exchanges"] += 1
        return self._assemble("exchange", seq, schema, parts[me], got, full_sync=True)

    def _outgoing(self, schema, parts, d: int) -> pa.Table:
        part = parts[d]
        if part is None:
            part = empty_like(schema) if schema is not None else _noschema_table()
        self.stats["rows_sent"] += part.num_rows
        return part

    def _encode(self, table: pa.Table) -> list:
        o = self.store.options
        return list(codec.encode(table, compression=o.compression, segment_size=o.segment_size))

    def _put_combined(self, seq: int, targets: list[int], slots: list[list], *,
                      group: Optional[str] = None) -> None:
        """Write one combined object with a slot per rank of ``targets`` (slot = list of
        buffers), its slot sizes in the key when they fit; notify the targets."""
        sizes = [sum(memoryview(c).nbytes for c in chunks) for chunks in slots]
        key = K.msg_key(self.job, self.token, seq, None, self.rank, group=group)
        tagged = f"{key}-{encode_tag(sizes)}"
        if len(tagged.encode()) <= MAX_KEY_BYTES:
            key = tagged
        self.store.put_bytes(key, [combined_header(sizes), *[c for chunks in slots for c in chunks]])
        self._shared.append((seq, key))
        self._announce(key, targets)

    def _read_slot(self, key: str, targets: list[int]):
        """This rank's slot of a combined object written for ``targets``: one ranged GET when
        the key carries the slot sizes, else the header first."""
        where = lambda: {"backend": self.store.scheme, "op": "exchange", "key": key}  # noqa: E731
        index = find_slot(targets, self.rank, where)
        tag = K.parse_msg_key(key).tag
        if tag is not None:
            sizes = decode_tag(tag)
            if len(sizes) != len(targets):
                raise IntegrityError(f"combined object has {len(sizes)} slots, expected "
                                     f"{len(targets)}", **where())
            offset, length = slot_range(sizes, index)
        else:
            offset, length = parse_combined_header(
                self.store.get_bytes(key, (0, combined_header_size(len(targets)))),
                len(targets), index, where)
        return expect_slot(self.store.get_bytes(key, (offset, offset + length)), length, where)

    def _exchange_combined(self, seq, schema, parts):
        """Write-combining: one object per sender with a slot for every rank; each receiver
        reads its slot of every other sender's object."""
        me, P = self.rank, self.world_size
        slots = [[] if d == me else self._encode(self._outgoing(schema, parts, d)) for d in range(P)]
        self._put_combined(seq, list(range(P)), slots)
        del slots
        where = lambda key: {"backend": self.store.scheme, "op": "exchange", "key": key}  # noqa: E731
        targets = list(range(P))
        got = self._receive("exchange", seq, [s for s in range(P) if s != me], None, delete=False,
                            read=lambda key: codec.decode(self._read_slot(key, targets),
                                                          lambda: where(key)))
        self.stats["exchanges"] += 1
        return self._assemble("exchange", seq, schema, parts[me], got, full_sync=True)

    def _exchange_twolevel(self, seq, schema, parts):
        """Two-level exchange on a sqrt(P) grid (layout.py): stage 1 along rows, stage 2 along
        columns; pieces are forwarded as the encoded bytes they arrived as."""
        me, P = self.rank, self.world_size
        grid = Grid(P)
        where = lambda key: {"backend": self.store.scheme, "op": "exchange", "key": key}  # noqa: E731
        # (src, dst) -> encoded piece, grouped by the rank that forwards it
        held: dict[int, list[tuple[int, int, Any]]] = {}
        for d in range(P):
            if d != me:
                held.setdefault(grid.mid(me, d), []).append((me, d, self._encode(
                    self._outgoing(schema, parts, d))))

        def bundle(pieces):
            pieces.sort(key=lambda p: (p[1], p[0]))
            chunks = [pieces_header([(s, d, sum(memoryview(c).nbytes for c in body))
                                     for s, d, body in pieces])]
            for _, _, body in pieces:
                chunks.extend(body)
            return chunks

        def read_bundle(key, targets):
            return parse_pieces(self._read_slot(key, targets), lambda: where(key))

        # Stage 1: one object for the ranks of my row (one per other column).
        t1 = grid.stage1_targets(me)
        row_key = K.row_group(grid.row(me))
        if t1:
            self._put_combined(seq, t1, [bundle(held.pop(m, [])) for m in t1], group=row_key)
        srcs1 = grid.stage1_sources(me)
        rows = sorted({grid.row(s) for s in srcs1})
        got1 = self._receive(
            "exchange (two-level, stage 1)", seq, srcs1, None, delete=False,
            read=lambda key: read_bundle(key, grid.stage1_targets(K.parse_msg_key(key).src)),
            prefixes=[K.group_prefix(self.job, self.token, seq, K.row_group(r)) for r in rows])
        final: list[tuple[int, int, Any]] = []
        forward: dict[int, list] = {}
        for s, d, body in held.pop(me, []):
            forward.setdefault(d, []).append((s, d, body))
        for src in sorted(got1):
            for s, d, buf in got1[src]:
                if d == me:
                    final.append((s, d, buf))
                else:
                    forward.setdefault(d, []).append((s, d, [buf]))
        del got1
        # Stage 2: one object for the other ranks of my column.
        column = grid.column(me)
        stray = set(forward) - set(column)
        if stray:
            raise IntegrityError(f"two-level exchange: rank {me} holds pieces for rank(s) "
                                 f"{sorted(stray)} outside its column", backend=self.store.scheme,
                                 op="exchange")
        col_key = K.column_group(grid.col(me))
        if column:
            self._put_combined(seq, column, [bundle(forward.pop(d, [])) for d in column],
                               group=col_key)
        del forward
        # A rank missing here may itself be waiting for a rank of its row in stage 1: the
        # message says so, so the rank it names is not taken for the culprit.
        got2 = self._receive(
            "exchange (two-level, stage 2: ranks that forward their rows' data)", seq, column,
            None, delete=False,
            read=lambda key: read_bundle(key, grid.column(K.parse_msg_key(key).src)),
            prefixes=[K.group_prefix(self.job, self.token, seq, col_key)])
        for src in sorted(got2):
            final.extend(got2[src])
        del got2
        got: dict[int, pa.Table] = {}
        for s, d, buf in final:
            if d != me or s in got or s == me or not 0 <= s < P:
                raise IntegrityError(f"two-level exchange: unexpected piece {s}->{d} at rank {me}",
                                     backend=self.store.scheme, op="exchange")
            got[s] = codec.decode(buf, lambda: {"backend": self.store.scheme, "op": "exchange"})
        missing = sorted(set(range(P)) - {me} - set(got))
        if missing:
            raise IntegrityError(f"two-level exchange: no piece from rank(s) {missing} reached "
                                 f"rank {me}", backend=self.store.scheme, op="exchange")
        self.stats["exchanges"] += 1
        return self._assemble("exchange", seq, schema, parts[me], got, full_sync=True)

    def _assemble(self, what, seq, own_schema, own, got: dict, *, full_sync: bool):
        me, P = self.rank, self.world_size
        ref_schema, ref_rank = own_schema, (me if own_schema is not None else None)
        tables: dict[int, Optional[pa.Table]] = {}
        for src in sorted(got):
            t, noschema = _strip_marker(got[src])
            tables[src] = t
            if t is not None and ref_schema is None:
                ref_schema, ref_rank = t.schema, src
        if full_sync:
            self._prune_shared(seq)
        for src, t in tables.items():
            _check_schema(ref_schema, ref_rank, t.schema if t is not None else None, src, seq, what)
        result = []
        for s in range(P):
            t = own if s == me else tables[s]
            if t is None:
                t = empty_like(ref_schema)
            result.append(t)
            if s != me:
                self.stats["rows_received"] += t.num_rows
        return result

    def allgather(self, table):
        seq = self._next("allgather")
        table = as_table(table, "allgather")
        return self._run("allgather", seq, lambda: self._allgather(seq, table))

    def _allgather(self, seq, table):
        me, P = self.rank, self.world_size
        if P > 1:
            key = K.msg_key(self.job, self.token, seq, None, me)
            self._put(key, table if table is not None else _noschema_table(), None)
            self._shared.append((seq, key))
        got = self._receive("allgather", seq, [s for s in range(P) if s != me], None, delete=False)
        return self._assemble("allgather", seq, table.schema if table is not None else None, table,
                              got, full_sync=True)

    def gather(self, table, root=0):
        self._check_root(root, "gather")
        seq = self._next("gather")
        table = as_table(table, "gather")
        return self._run("gather", seq, lambda: self._gather(seq, table, root))

    def _gather(self, seq, table, root):
        me, P = self.rank, self.world_size
        if me != root:
            self._put(K.msg_key(self.job, self.token, seq, root, me),
                      table if table is not None else _noschema_table(), root)
            return None
        got = self._receive("gather", seq, [s for s in range(P) if s != me], me, delete=True)
        return self._assemble("gather", seq, table.schema if table is not None else None, table, got,
                              full_sync=True)

    def bcast(self, table, root=0):
        self._check_root(root, "bcast")
        seq = self._next("bcast")
        table = as_table(table, "bcast")
        if self.rank == root and table is None:
            raise ConfigError(f"bcast: the root (rank {root}) must pass a table")
        return self._run("bcast", seq, lambda: self._bcast(seq, table, root))

    def _bcast(self, seq, table, root):
        if self.rank == root:
            if self.world_size > 1:
                key = K.msg_key(self.job, self.token, seq, None, root)
                self._put(key, table, None)
                self._shared.append((seq, key))
            return table
        got = self._receive("bcast", seq, [root], None, delete=False)
        return got[root]

    def barrier(self):
        seq = self._next("barrier")
        self._run("barrier", seq, lambda: self._barrier(seq))

    def _barrier(self, seq):
        # Gather to rank 0, then rank 0 releases everyone: 2(P-1) objects instead of P(P-1).
        me, P = self.rank, self.world_size
        if P == 1:
            return
        token = _noschema_table()
        if me != 0:
            self._put(K.msg_key(self.job, self.token, seq, 0, me), token, 0)
            self._receive("barrier", seq, [0], me, delete=True)
        else:
            self._receive("barrier", seq, list(range(1, P)), 0, delete=True)
            futs = [self._pool.submit(self._put, K.msg_key(self.job, self.token, seq, d, 0), token, d)
                    for d in range(1, P)]
            for f in futs:
                f.result()
        # Everyone has finished every collective before this one.
        self._prune_shared(seq)

    # -- shutdown -----------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return self.store.scheme

    def _release(self, healthy: bool) -> None:
        try:
            self._cleanup(healthy)
        finally:
            self._pool.shutdown(wait=True)
            if self._own_store:
                self.store.close()

    def _cleanup(self, healthy: bool) -> None:
        store = self.store
        leftovers = [k for _, k in self._shared]
        self._shared = []
        # After a healthy final barrier (seq = self._seq) every message before it has been read;
        # the barrier's own release messages are still being read (and deleted) by their
        # receivers, so only earlier writes of ours can be stale duplicates.
        own_before = self._seq if healthy else self._seq + 1
        for key in store.list(K.run_prefix(self.job, self.token)):
            try:
                mk = K.parse_msg_key(key)
            except ValueError:
                continue
            if (mk.src == self.rank and mk.seq < own_before) or mk.dst == self.rank:
                leftovers.append(key)
        leftovers.append(K.hello_key(self.job, self.rank))
        store.delete_many(sorted(set(leftovers)))
        if self._used_counter and self.rank == 0:
            try:
                store.adapter.delete_counter(K.counter_key(self.job))
            except StoreError:
                pass
        if self._notify:
            try:
                store.adapter.wait(self._inbox, 0)  # drain announcements left for us
            except StoreError:
                pass


#: Seconds a notified receiver waits on announcements alone before it LISTs once anyway.
LIST_FALLBACK = 1.0


def _seq_of(key: str) -> int:
    try:
        return K.parse_msg_key(key).seq
    except ValueError:
        return -1


def _handshake(store: Store, job: str, rank: Optional[int], world_size: int, rendezvous,
               timeout: float, info: dict, cancel=None) -> tuple[int, str, list[dict], bool]:
    """Claim or confirm a rank, then all-gather the hello records: they carry each rank's
    nonce (rank 0's becomes the run token) and member info (addresses for direct transports)."""
    deadline = time.monotonic() + timeout
    nonce = uuid.uuid4().hex[:16]
    used_counter = False
    base = {"nonce": nonce, "world_size": world_size, "host": socket.gethostname(),
            "pid": os.getpid(), "info": info}
    if rank is None:
        rdv = _resolve_rendezvous(rendezvous, store)
        used_counter = isinstance(rdv, CounterRendezvous)
        hello_for = lambda r: msgpack.packb({**base, "rank": r})  # noqa: E731
        # The claim writes the hello record itself (create-if-absent): the rank is known after.
        rank = rdv.claim(store, job, world_size, hello_for, deadline)
    else:
        _create_hello(store, job, rank, msgpack.packb({**base, "rank": rank}))
    members: dict[int, dict] = {}
    delays = poll_delays(cap=0.05)
    prefix = K.hello_prefix(job)
    while len(members) < world_size:
        for key in store.list(prefix):
            r = K.parse_hello_key(key)
            if r in members:
                continue
            try:
                rec = msgpack.unpackb(bytes(memoryview(store.get_bytes(key))))
            except NotFoundError:
                continue
            if rec.get("world_size") != world_size:
                raise RendezvousError(f"job {job!r}: rank {r} joined with world_size "
                                      f"{rec.get('world_size')}, rank {rank} with {world_size}",
                                      backend=store.scheme)
            members[r] = rec
        if len(members) >= world_size:
            break
        if cancel is not None and cancel.is_set():
            store.delete_many([K.hello_key(job, rank)])
            raise ExchangeError(f"rendezvous of job {job!r}: cancelled on rank {rank} because "
                                f"another rank failed", backend=store.scheme)
        if time.monotonic() >= deadline:
            missing = sorted(set(range(world_size)) - set(members))
            store.delete_many([K.hello_key(job, rank)])
            raise ExchangeTimeoutError(f"rendezvous of job {job!r}: rank {rank} timed out after "
                                       f"{timeout:g}s waiting for rank(s) {missing} to join "
                                       f"(store {store.url})", missing=missing, backend=store.scheme)
        time.sleep(next(delays))
    token = members[0]["nonce"]
    return rank, token, [members[r] for r in range(world_size)], used_counter


def connect(url_or_store: Union[str, Store], *, job: Optional[str] = None, rank: Optional[int] = None,
            world_size: Optional[int] = None, rendezvous=None, timeout: float = DEFAULT_TIMEOUT,
            info: Optional[dict] = None, exchange: Optional[str] = None, cancel=None,
            **options) -> Communicator:
    """Join ``job`` as one rank of ``world_size`` and return its Communicator.

    Rank and world size come from the arguments, else from the environment (``cs.launch``,
    ``mpirun``: OMPI_/PMI_ variables), else from a rendezvous through the store (create-if-absent
    slots, or an atomic counter where the backend has one).  ``mpi://`` and ``ucx://`` return a
    direct-transport communicator.  ``exchange`` picks the store exchange: ``"direct"`` (one
    object per sender and destination), ``"combined"`` (write-combining: one object per sender,
    one ranged read per pair), ``"twolevel"`` (two rounds on a sqrt(P) grid: about 2P*sqrt(P)
    requests) or ``"auto"`` (the default, or ``CYLON_STORE_EXCHANGE``): the cheapest in requests
    where they are billed, else direct; see ``layout.py``.
    ``cancel`` (a ``threading.Event``) ends every wait of this rank early once set: a launcher
    running ranks as threads sets it when a sibling fails.
    """
    job = job if job is not None else os.environ.get("CYLON_STORE_JOB")
    if exchange is None:
        exchange = os.environ.get("CYLON_STORE_EXCHANGE") or "auto"
    if job is None:
        raise ConfigError("connect needs a job id (job=...) shared by all ranks of one run")
    K.validate_job(job)
    if isinstance(url_or_store, str) and "://" in url_or_store:
        scheme = url_or_store.split("://", 1)[0].lower()
        if scheme in _TRANSPORTS:
            module, _, attr = _TRANSPORTS[scheme].partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                raise ConfigError(f"the {scheme}:// transport is not available: {exc} (pip install "
                                  f"'cylon-store[{scheme}]')") from exc
            return fn(url_or_store, job=job, rank=rank, world_size=world_size,
                      rendezvous=rendezvous, timeout=timeout, info=info, **options)
    rank, world_size = resolve_world(rank, world_size, timeout, what="connect")
    own = not isinstance(url_or_store, Store)
    store = open_store(url_or_store, **options)
    try:
        rank, token, members, used_counter = _handshake(store, job, rank, int(world_size), rendezvous,
                                                        timeout, info or {}, cancel)
    except BaseException:
        if own:
            store.close()
        raise
    comm = StoreCommunicator(store, job=job, rank=int(rank), world_size=int(world_size), token=token,
                             members=members, timeout=timeout, own_store=own,
                             used_counter=used_counter, exchange=exchange)
    comm.cancel_event = cancel
    return comm
