"""``ucx://``: the Communicator over UCX (ucxx), bootstrapped through a store as Cylon's
serverless runs do it.

Bootstrap: each rank opens a UCX worker and joins the job through the rendezvous store (option
``rendezvous``, e.g. ``redis://host`` or ``file:///mnt/efs/rdv``): it claims a rank (Redis INCR,
or a create-if-absent slot on a filesystem) and all-gathers every rank's worker address in the
hello records; then it creates one endpoint per peer straight from those addresses, checks
every pair can talk (a wire-up message each way, naming the ranks that cannot be reached) and
removes its records from the store.  No listener is opened: the only sockets are UCX's own,
whose ports and interfaces follow ``port_range``/``net_devices`` (UCX_TCP_PORT_RANGE,
UCX_NET_DEVICES), so a firewall can be opened for exactly that range.

Data: tagged sends of the Arrow IPC stream of each table — a header (piece count and lengths),
then the pieces straight from the table's buffers — posted to all peers at once and progressed
together; the receiver probes the header and lands the pieces back to back in one aligned
buffer, decoded zero-copy.  Collectives are built on the same messages (allgather: all to all;
gather: to the root; bcast: binomial tree forwarding the received bytes as they are; barrier:
dissemination).  Every wait has a deadline and names the ranks that did not deliver; a peer
whose connection breaks fails the wait at once, naming it.  ``close`` runs a final barrier,
closes every endpoint and releases the worker, leaving nothing in the store.
"""

from __future__ import annotations

import gc
import os
import select
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np
import pyarrow as pa

from .. import keys as K
from ..collective import DEFAULT_TIMEOUT, resolve_world
from ..rendezvous import handshake
from ..config import Size, StoreOptions, build_options, option_names, redact_url, split_url
from ..errors import ConfigError, ExchangeError, StoreError
from ..registry import option_classes_of_other_schemes
from ..store import Store, open_store
from . import (MAX_MESSAGE, DirectCommunicator, DirectTransportAdapter, decode, header_of,
               ipc_pieces, new_region)

#: Tag layout (64 bits): collective sequence number | source rank | message index.
SEQ_BITS, SRC_BITS, IDX_BITS = 24, 20, 20
MAX_WORLD = 1 << SRC_BITS
MAX_PIECES = (1 << IDX_BITS) - 1   # index 0 is the header
_WIREUP_SEQ = 0                    # collectives count from 1


def tag_of(seq: int, src: int, idx: int) -> int:
    return ((seq % (1 << SEQ_BITS)) << (SRC_BITS + IDX_BITS)) | (src << IDX_BITS) | idx


@dataclass(frozen=True)
class UcxOptions:
    """Options of ``ucx://`` (URL query, keyword arguments or ``CYLON_STORE_*`` variables)."""

    #: Store URL through which ranks meet (redis://, file:///shared/dir, s3://, dynamodb://...);
    #: defaults to $CYLON_STORE_RENDEZVOUS.  Not needed for a world of one.
    rendezvous: Optional[str] = None
    #: How a rank with no explicit rank claims one: "counter" (atomic increment: Redis INCR,
    #: DynamoDB ADD), "store" (create-if-absent slot) or "auto" (counter where available).
    claim: Literal["auto", "counter", "store"] = "auto"
    #: UCX transports (UCX_TLS), e.g. "tcp,self" across hosts; None keeps UCX's choice.
    tls: Optional[str] = None
    #: Network interfaces UCX may use (UCX_NET_DEVICES), e.g. "eth0" or "lo".
    net_devices: Optional[str] = None
    #: Ports UCX's TCP sockets listen on (UCX_TCP_PORT_RANGE), e.g. "20000-20100".
    port_range: Optional[str] = None
    #: More UCX settings, "KEY=VALUE;KEY=VALUE" without the UCX_ prefix (e.g.
    #: "MM_ERROR_HANDLING=y" to allow shared memory together with error handling).
    ucx_config: Optional[str] = None
    #: Endpoint error handling: a dead peer fails the others' waits at once, naming it.  On one
    #: host UCX then avoids CMA single-copy transfers (measured ~10x slower there, see
    #: BENCHMARKS.md, direct transports); ``false`` is faster on one host, but a peer that dies can make
    #: UCX abort the survivors instead of raising.  Between hosts (TCP, IB) it costs nothing.
    error_handling: bool = True
    #: "blocking": wait in epoll between events; "polling": spin on the worker.
    progress: Literal["blocking", "polling"] = "blocking"
    #: Largest piece sent as one UCX message.
    max_message: Size = Size(MAX_MESSAGE)

    def __post_init__(self) -> None:
        if self.max_message < 64:
            raise ConfigError(f"option 'max_message' must be >= 64 bytes, got {self.max_message}")

    def ucx_settings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.ucx_config:
            for item in self.ucx_config.split(";"):
                if not item.strip():
                    continue
                key, sep, value = item.partition("=")
                if not sep:
                    raise ConfigError(f"option 'ucx_config': expected KEY=VALUE, got {item!r}")
                key = key.strip()
                out[key[4:] if key.upper().startswith("UCX_") else key] = value.strip()
        for name, setting in (("TLS", self.tls), ("NET_DEVICES", self.net_devices),
                              ("TCP_PORT_RANGE", self.port_range)):
            if setting is not None:
                out[name] = setting
        return out


class UcxStoreAdapter(DirectTransportAdapter):
    """``open_store("ucx://")``: a NotSupportedError naming the alternatives."""

    Config = UcxOptions


def _options(url: str, options: dict) -> UcxOptions:
    scheme, location, query = split_url(url)
    if location.split("://", 1)[1].strip("/"):
        raise ConfigError(f"ucx:// takes no location, only options (e.g. "
                          f"ucx://?rendezvous=redis://host:6379), got {redact_url(url)!r}")
    def known():  # flat (deprecated) option names of the other backends, from the registry
        return option_names(StoreOptions, *option_classes_of_other_schemes("ucx"))

    (opts,) = build_options([UcxOptions], kwargs=options, query=query, known_env=known,
                            what="ucx:// transport", scheme="ucx")
    return opts


_UCXX = None


def _import_ucxx():
    """Import ucxx once; undo the process-wide UCX settings it makes for GPU memory that a
    host-memory transport does not want (and that UCX 1.19+ warns about as unused)."""
    global _UCXX
    if _UCXX is not None:
        return _UCXX
    ours = ("UCX_MEMTYPE_CACHE", "UCX_RNDV_FRAG_MEM_TYPE")
    before = {k: os.environ.get(k) for k in ours}
    try:
        import ucxx._lib.libucxx as ucx_api
        from ucxx._lib.arr import Array
    except ImportError as exc:
        raise ConfigError(f"the ucx:// transport needs ucxx: pip install 'cylon-store[ucx]' "
                          f"(ucxx-cu12 runs on host memory, no GPU needed) ({exc})") from exc
    except OSError as exc:  # a UCX library already loaded by something else (e.g. Open MPI's)
        raise ConfigError(f"ucxx could not load its UCX libraries: {exc}. If mpi4py was imported "
                          f"first, import ucxx (connect ucx://) before MPI in this process, or "
                          f"keep the two transports in separate processes") from exc
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
    _UCXX = (ucx_api, Array)
    return _UCXX


class _Stream:
    """One incoming table stream (header, then pieces) from one source."""

    __slots__ = ("src", "seq", "state", "req", "hdr", "buf", "nbytes", "reqs")

    def __init__(self, src: int, seq: int) -> None:
        self.src, self.seq = src, seq
        self.state = "probe"
        self.req: Any = None                   # a ucxx request
        self.hdr: Optional[np.ndarray] = None  # piece count, then piece lengths
        self.buf: Optional[pa.Buffer] = None
        self.nbytes = 0
        self.reqs: list[Any] = []


class UcxCommunicator(DirectCommunicator):
    scheme = "ucx"
    #: The hello records of every rank (set by ``connect`` for a world of more than one).
    members: list[dict[str, Any]]

    def __init__(self, *, ctx, worker, endpoints: dict, job: str, rank: int, world_size: int,
                 timeout: float, options: UcxOptions, token: str):
        super().__init__(job=job, rank=rank, world_size=world_size, timeout=timeout)
        self._api, self._Array = _import_ucxx()
        self._ctx = ctx
        self._worker = worker
        self._eps = endpoints
        self.options = options
        self.token = token
        self._blocking = options.progress == "blocking"
        self._epoll_fd = worker.epoll_file_descriptor if self._blocking else None
        self._max_piece = int(options.max_message)
        self._what = "connect"

    # -- message engine -----------------------------------------------------------------
    def _send(self, dst: int, seq: int, pieces: list, nbytes: int, out: list) -> None:
        """Post the header and pieces of one stream to ``dst``; requests go to ``out``."""
        if len(pieces) > MAX_PIECES:
            pieces = _merge(pieces, self._max_piece)
        hdr = header_of(pieces, nbytes)
        api, Array, ep, me = self._api, self._Array, self._eps[dst], self.rank
        out.append((ep.tag_send(Array(hdr), api.UCXXTag(tag_of(seq, me, 0))), dst, hdr))
        for i, p in enumerate(pieces, start=1):
            out.append((ep.tag_send(Array(p), api.UCXXTag(tag_of(seq, me, i))), dst, p))
        self.stats["bytes_sent"] += nbytes

    def _advance(self, st: _Stream) -> bool:
        """Move one incoming stream forward; returns whether anything happened."""
        api, Array, w = self._api, self._Array, self._worker
        if st.state == "probe":
            probe = w.tag_probe(api.UCXXTag(tag_of(st.seq, st.src, 0)), remove=True)
            if not probe.matched:
                return False
            st.hdr = np.empty(probe.length // 8, np.int64)
            st.req = w.tag_recv_with_handle(Array(st.hdr), probe)
            st.state = "header"
        if st.state == "header":
            if not st.req.completed:
                return True
            self._check(st.req, st.src, st.seq)
            hdr = st.hdr
            assert hdr is not None  # received in state "probe"
            lens = hdr[1:1 + int(hdr[0])].tolist()
            st.nbytes = int(sum(lens))
            st.buf, view = new_region(st.nbytes)
            off = 0
            for i, ln in enumerate(lens, start=1):
                st.reqs.append(w.tag_recv(Array(view[off:off + ln]),
                                          api.UCXXTag(tag_of(st.seq, st.src, i))))
                off += ln
            st.state = "data"
            self.stats["bytes_received"] += st.nbytes
            return True
        if st.state == "data":
            if not all(r.completed for r in st.reqs):
                return False
            for r in st.reqs:
                self._check(r, st.src, st.seq)
            st.reqs = []
            st.state = "done"
            return True
        return False

    def _check(self, req, peer: int, seq: int) -> None:
        try:
            req.check_error()
        except Exception as exc:  # UCXError and its kinds: the peer is gone or unreachable
            raise ExchangeError(f"{self._what} {seq} of job {self.job!r}: rank {self.rank}'s transfer with "
                                f"rank {peer} failed (died or unreachable): {exc!r}", seq=seq,
                                backend="ucx") from exc

    def _wait(self, what: str, seq: int, streams: list, sends: list) -> None:
        """Progress until every stream is received and every send completed."""
        deadline = self._deadline()
        worker = self._worker
        self._what = what
        while True:
            worker.progress()
            moved = False
            for st in streams:
                if st.state != "done":
                    moved |= self._advance(st)
            still = []
            for entry in sends:
                if entry[0].completed:
                    self._check(entry[0], entry[1], seq)
                    moved = True
                else:
                    still.append(entry)
            sends[:] = still
            pending = {st.src for st in streams if st.state != "done"} | {e[1] for e in sends}
            if not pending:
                return
            for peer in pending:
                ep = self._eps.get(peer)
                if ep is not None and not ep.alive:
                    raise ExchangeError(f"{what} {seq} of job {self.job!r}: rank {self.rank} lost "
                                        f"its connection to rank {peer} (died or unreachable)",
                                        seq=seq, backend="ucx")
            if time.monotonic() > deadline:
                raise self._timeout_error(what, seq, sorted(pending))
            if self._cancelled():
                raise ExchangeError(f"{what} {seq}: cancelled on rank {self.rank} because another "
                                    f"rank failed", seq=seq, backend="ucx")
            if (self._blocking and self._epoll_fd is not None and not moved
                    and worker.arm()):
                # Armed with nothing pending: sleep until the worker has an event.  (Events that
                # came after the progress() above make arm() fail, and we go round at once.)
                select.select([self._epoll_fd], [], [], 0.05)

    def _transfer(self, what: str, seq: int, sends: dict, srcs: list) -> dict:
        """Send {dst: (pieces, nbytes)} and receive one stream from each of ``srcs``;
        returns {src: Table or None}."""
        out: list = []
        for dst, (pieces, nbytes) in sends.items():
            self._send(dst, seq, pieces, nbytes, out)
        streams = [_Stream(s, seq) for s in srcs]
        self._wait(what, seq, streams, out)
        return {st.src: decode(st.buf, st.nbytes) for st in streams}

    def _others(self, first: int = 1) -> list:
        me, P = self.rank, self.world_size
        return [(me + k) % P for k in range(first, P)]

    # -- collectives --------------------------------------------------------------------
    def _exchange(self, seq, wire):
        sends = {d: ipc_pieces(wire[d], self._max_piece) for d in self._others()}
        srcs = [(self.rank - k) % self.world_size for k in range(1, self.world_size)]
        return self._transfer("exchange", seq, sends, srcs)

    def _allgather(self, seq, table):
        mine = ipc_pieces(table, self._max_piece)
        return self._transfer("allgather", seq, {d: mine for d in self._others()}, self._others())

    def _gather(self, seq, table, root):
        if self.rank == root:
            return self._transfer("gather", seq, {}, self._others())
        self._transfer("gather", seq, {root: ipc_pieces(table, self._max_piece)}, [])
        return {}

    def _bcast(self, seq, table, root):
        me, P = self.rank, self.world_size
        vr = (me - root) % P
        low = vr & -vr if vr else P  # children are vr + 2^j for 2^j < low
        if vr:
            parent = (vr - low + root) % P
            st = _Stream(parent, seq)
            self._wait("bcast", seq, [st], [])
            payload = ([st.buf.slice(i, min(self._max_piece, st.nbytes - i))
                        for i in range(0, st.nbytes, self._max_piece)], st.nbytes)
            result = decode(st.buf, st.nbytes)
        else:
            payload = ipc_pieces(table, self._max_piece)
            result = table
        out: list = []
        j = 1
        while j < low and vr + j < P:
            self._send((vr + j + root) % P, seq, *payload, out)
            j <<= 1
        self._wait("bcast", seq, [], out)
        return result

    def _barrier(self, seq):
        # Dissemination: ceil(log2 P) rounds; in round k send to me+2^k, hear from me-2^k.
        me, P = self.rank, self.world_size
        k = 1
        while k < P:
            out: list = []
            self._send((me + k) % P, seq, [], 0, out)
            self._wait("barrier", seq, [_Stream((me - k) % P, seq)], out)
            k <<= 1

    # -- shutdown -----------------------------------------------------------------------
    def _shutdown(self, healthy: bool) -> None:
        eps, self._eps = self._eps, {}
        for ep in eps.values():
            try:
                ep.close_blocking(0, 1) if not healthy else ep.close()
            except Exception:  # already broken: nothing left to release but the object
                pass
        if healthy:
            deadline = time.monotonic() + min(self.timeout, 10.0)
            while any(ep.alive for ep in eps.values()) and time.monotonic() < deadline:
                self._worker.progress()
        eps.clear()
        self._worker = None
        self._ctx = None
        gc.collect()


def _merge(pieces: list, max_piece: int) -> list:
    """Too many pieces for the tag space: copy them into pieces of ``max_piece`` bytes."""
    whole = pa.py_buffer(b"".join(memoryview(p) for p in pieces))
    return [whole.slice(i, min(max_piece, whole.size - i)) for i in range(0, whole.size, max_piece)]


def connect(url: str, *, job: str, rank: Optional[int] = None, world_size: Optional[int] = None,
            rendezvous: Union[None, str, Store] = None, timeout: float = DEFAULT_TIMEOUT,
            info: Optional[dict] = None, **options) -> UcxCommunicator:
    """Join ``job`` over UCX.  ``rendezvous`` is the store ranks meet through (a URL or an
    open Store; default: the ``rendezvous`` option, then $CYLON_STORE_RENDEZVOUS), or one of
    "auto"/"counter"/"store" to choose how ranks are claimed.  Rank and world size come from
    the arguments, else the environment (cs.launch, mpirun), else a claim in the store."""
    if isinstance(rendezvous, str) and "://" not in rendezvous:
        options.setdefault("claim", rendezvous)
        rendezvous = None
    opts = _options(url, options)
    rank, world_size = resolve_world(rank, world_size, timeout, what="ucx://", max_world=MAX_WORLD)
    store_ref = rendezvous if rendezvous is not None else (
        opts.rendezvous or os.environ.get("CYLON_STORE_RENDEZVOUS"))
    if store_ref is None and world_size > 1:
        raise ConfigError("ucx:// needs a rendezvous store for ranks to exchange addresses: "
                          "ucx://?rendezvous=redis://host:6379 (or file:///shared/dir, s3://...), "
                          "rendezvous=..., or $CYLON_STORE_RENDEZVOUS")
    api, _ = _import_ucxx()
    feature = (api.Feature.TAG, api.Feature.WAKEUP)
    try:
        ctx = api.UCXContext(config_dict=opts.ucx_settings(), feature_flags=feature)
        worker = api.UCXWorker(ctx)
        if opts.progress == "blocking":
            worker.init_blocking_progress_mode()
    except Exception as exc:
        raise ConfigError(f"UCX could not start a worker with {opts.ucx_settings() or 'defaults'}: "
                          f"{exc}") from exc
    address = bytes(worker.address.tobytes())
    if world_size == 1:
        return UcxCommunicator(ctx=ctx, worker=worker, endpoints={}, job=job, rank=0,
                               world_size=1, timeout=timeout, options=opts, token="0" * 16)

    assert store_ref is not None  # checked above for a world of more than one
    own_store = not isinstance(store_ref, Store)
    store = open_store(store_ref)
    comm = None
    joined = False
    try:
        rank, token, members, used_counter = handshake(
            store, job, rank, int(world_size), opts.claim, timeout,
            {**(info or {}), "ucx_address": address})
        joined = True
        eps = {}
        for r, m in enumerate(members):
            if r != rank:
                peer = api.UCXAddress.create_from_buffer(bytes(m["info"]["ucx_address"]))
                eps[r] = api.UCXEndpoint.create_from_worker_address(worker, peer, opts.error_handling)
        comm = UcxCommunicator(ctx=ctx, worker=worker, endpoints=eps, job=job, rank=rank,
                               world_size=int(world_size), timeout=timeout, options=opts,
                               token=token)
        comm.members = members
        # Wire-up: one message each way between every pair proves every endpoint works, and
        # that every rank has read every hello record — ours can go.
        comm._run("connect", _WIREUP_SEQ, lambda: comm._transfer(
            "connect", _WIREUP_SEQ, {d: ([], 0) for d in comm._others()}, comm._others()))
        store.delete_many([K.hello_key(job, rank)])
        if used_counter and rank == 0:
            try:
                store.delete_counter(K.counter_key(job))
            except StoreError:
                pass
        return comm
    except BaseException:
        if comm is not None:
            comm._closed = True
            comm._shutdown(healthy=False)
        if joined and rank is not None:  # (a failed handshake removes its own record)
            try:
                store.delete_many([K.hello_key(job, rank)])
            except StoreError:
                pass
        raise
    finally:
        if own_store:
            store.close()
