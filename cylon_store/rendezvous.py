"""Rendezvous: how the ranks of a job find each other through a store.

A rank is claimed (create-if-absent of a hello record, or an atomic counter where the backend
has one, as Cylon's serverless bootstrap does) or confirmed (a rank given by the launcher), then
the hello records are all-gathered: each carries the rank's nonce (rank 0's becomes the run
token that fences earlier runs of the same job id) and member info (worker addresses for the
direct transports). Every wait ends at the timeout naming the ranks that never joined.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Callable, Optional

import msgpack

from . import keys as K
from .errors import (AlreadyExistsError, ConfigError, ExchangeError, ExchangeTimeoutError,
                     NotFoundError, RendezvousError)
from .retry import poll_delays
from .store import Store

_log = logging.getLogger("cylon_store")


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
            f"{store.safe_url} --job {job}` or use a new job id", backend=store.scheme)


class CounterRendezvous:
    """Rank by an atomic increment (Redis INCR, DynamoDB ADD, memory), as Cylon's serverless
    bootstrap does; then the hello record is created like any explicit rank's."""

    name = "counter"

    def claim(self, store: Store, job: str, world_size: int, hello_for: Callable[[int], bytes],
              deadline: float) -> int:
        if not store.capabilities.atomic_counter:
            raise ConfigError(f"the {store.scheme}:// backend has no atomic counter; use "
                              f"rendezvous='store'")
        rank = store.incr(K.counter_key(job)) - 1
        if rank >= world_size:
            raise RendezvousError(
                f"job {job!r}: rank counter reached {rank + 1} for a world of {world_size}; an "
                f"earlier run did not close (clean with `cylon-store clean {store.safe_url} --job "
                f"{job}`) or more processes joined than world_size", backend=store.scheme)
        create_hello(store, job, rank, hello_for(rank))
        return rank


def create_hello(store: Store, job: str, rank: int, hello: bytes) -> None:
    try:
        store.put_bytes(K.hello_key(job, rank), hello, mode="create")
    except AlreadyExistsError as exc:
        raise RendezvousError(
            f"rank {rank} of job {job!r} is already taken: another run of this job is active, or "
            f"an earlier one did not close (remove its keys with `cylon-store clean {store.safe_url} "
            f"--job {job}`, or use a new job id)", backend=store.scheme) from exc


def resolve_rendezvous(rendezvous, store: Store):
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


def handshake(store: Store, job: str, rank: Optional[int], world_size: int, rendezvous,
               timeout: float, info: dict, cancel=None) -> tuple[int, str, list[dict], bool]:
    """Claim or confirm a rank, then all-gather the hello records: they carry each rank's
    nonce (rank 0's becomes the run token) and member info (addresses for direct transports)."""
    deadline = time.monotonic() + timeout
    nonce = uuid.uuid4().hex[:16]
    used_counter = False
    base = {"nonce": nonce, "world_size": world_size, "host": socket.gethostname(),
            "pid": os.getpid(), "info": info}
    if rank is None:
        rdv = resolve_rendezvous(rendezvous, store)
        used_counter = isinstance(rdv, CounterRendezvous)
        hello_for = lambda r: msgpack.packb({**base, "rank": r})  # noqa: E731
        # The claim writes the hello record itself (create-if-absent): the rank is known after.
        rank = rdv.claim(store, job, world_size, hello_for, deadline)
    else:
        create_hello(store, job, rank, msgpack.packb({**base, "rank": rank}))
    try:
        members = _gather_hellos(store, job, rank, world_size, deadline, timeout, cancel)
    except BaseException:
        # Whatever ended the rendezvous (a timeout, a cancel, a store error, Ctrl-C), this
        # rank's hello record must not outlive it: a rerun of the job would find it taken.
        try:
            store.delete_many([K.hello_key(job, rank)])
        except Exception as exc:  # the original error is the one to report
            _log.warning("rank %d of job %r could not remove its hello record (%s); remove it "
                         "with `cylon-store clean %s --job %s`", rank, job, exc, store.safe_url,
                         job)
        raise
    token = members[0]["nonce"]
    return rank, token, [members[r] for r in range(world_size)], used_counter


def _gather_hellos(store: Store, job: str, rank: int, world_size: int, deadline: float,
                   timeout: float, cancel) -> dict[int, dict]:
    """Every rank's hello record, polled until all are there (or the deadline, or a cancel)."""
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
            raise ExchangeError(f"rendezvous of job {job!r}: cancelled on rank {rank} because "
                                f"another rank failed", backend=store.scheme)
        if time.monotonic() >= deadline:
            missing = sorted(set(range(world_size)) - set(members))
            raise ExchangeTimeoutError(f"rendezvous of job {job!r}: rank {rank} timed out after "
                                       f"{timeout:g}s waiting for rank(s) {missing} to join "
                                       f"(store {store.safe_url})", missing=missing, backend=store.scheme)
        time.sleep(next(delays))
    return members
