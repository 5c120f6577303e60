"""``connect``: join a job as one rank and get its Communicator.

The pieces live in one module each: ``collective.py`` (the Communicator interface and the
plumbing every communicator shares), ``rendezvous.py`` (how ranks find each other through a
store), ``store_comm.py`` (the communicator over a blob store and its exchange strategies, whose
layouts and request model are in ``layout.py``), ``transports/`` (MPI and UCX). A URL's scheme
picks the communicator through the one registry (``registry.py``): a direct transport connects
itself, any other scheme is a store. This module re-exports the names users and the kernel use.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from . import keys as K
from . import registry
from .collective import (DEFAULT_TIMEOUT, REDUCE_OPS, Communicator, as_table,  # noqa: F401
                         decode_value, empty_like, encode_value, normalize_parts, ranks_from_env,
                         reduce_values, resolve_world)
from .errors import ConfigError
from .layout import request_cost_usd, request_model  # noqa: F401  (re-exported for users)
from .rendezvous import handshake
from .store import Store, open_store
from .store_comm import StoreCommunicator, choose_strategy  # noqa: F401


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
        # A direct transport (mpi://, ucx://, or one a third party registered) connects itself.
        transport = registry.transport_connect(url_or_store.split("://", 1)[0])
        if transport is not None:
            return transport(url_or_store, job=job, rank=rank, world_size=world_size,
                             rendezvous=rendezvous, timeout=timeout, info=info, **options)
    rank, world_size = resolve_world(rank, world_size, timeout, what="connect")
    own = not isinstance(url_or_store, Store)
    store = open_store(url_or_store, **options)
    try:
        rank, token, members, used_counter = handshake(store, job, rank, int(world_size), rendezvous,
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
