"""``mpi://``: the Communicator over MPI (mpi4py), for ranks started by ``mpirun``.

Ranks are MPI's own (``COMM_WORLD``, or ``comm=`` an mpi4py communicator), on a duplicate of it
so user traffic never mixes with ours.  Exchange (default ``exchange_method="p2p"``): for each
destination a rank sends a header (piece count and lengths) and then the pieces of the part's
Arrow IPC stream straight from the table's buffers (no serialisation copy, no pickling); the
receiver matches the header with a probe and posts receives that land the pieces back to back
in one aligned buffer, decoded zero-copy.  ``exchange_method="alltoallv"`` instead serialises
every part into one buffer and calls ``MPI_Ialltoallv`` after an ``Ialltoall`` of sizes.
Allgather, gather, bcast, allreduce and barrier are MPI's own nonblocking collectives.

Guarantees: no MPI call ever gets a count above ``max_count`` (< 2**31): point-to-point pieces
are cut to that size and collectives switch to a contiguous datatype unit when their byte
counts would not fit.  Every wait polls with a deadline, so no rank hangs inside MPI; a timed
out point-to-point wait names the ranks that did not deliver.  After a failure the process ends
the MPI job with ``MPI_Abort`` at exit instead of hanging in ``MPI_Finalize`` (option
``abort_on_error``).  mpi4py is imported only inside :func:`connect` (importing it starts MPI).
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from ..collective import DEFAULT_TIMEOUT, REDUCE_OPS
from ..config import Size, StoreOptions, build_options, option_names, redact_url, split_url
from ..errors import ConfigError, ExchangeError, ExchangeTimeoutError, RendezvousError
from ..registry import option_classes_of_other_schemes
from . import (ALIGN, MAX_MESSAGE, DirectCommunicator, DirectTransportAdapter, align, decode,
               header_of, ipc_pieces, ipc_size, new_region, write_ipc_into)

#: MPI's count arguments are C ints.
INT_MAX = 2**31 - 1
#: Tests of a barrier's request before the general wait (with its deadline and back-off).
_SPIN = 2000
#: Bytes per rank of the allgather's one-collective path for small tables (size + IPC stream).
SMALL_SLOT = 4096


@dataclass(frozen=True)
class MpiOptions:
    """Options of ``mpi://`` (URL query, keyword arguments or ``CYLON_STORE_*`` variables)."""

    #: "p2p": zero-copy pieces with matched probes (measured faster, names late ranks);
    #: "alltoallv": one serialised buffer per rank and MPI_Ialltoallv.
    exchange_method: Literal["p2p", "alltoallv"] = "p2p"
    #: Largest element count given to one MPI call; pieces and datatype units follow from it.
    max_count: Size = Size(MAX_MESSAGE)
    #: After a failed collective, end the MPI job with MPI_Abort at interpreter exit rather than
    #: risk hanging in MPI_Finalize while peers wait.
    abort_on_error: bool = True

    def __post_init__(self):
        if not ALIGN <= self.max_count <= INT_MAX:
            raise ConfigError(f"option 'max_count' must be in [{ALIGN}, {INT_MAX}], got "
                              f"{self.max_count}")


class MpiStoreAdapter(DirectTransportAdapter):
    """``open_store("mpi://")``: a NotSupportedError naming the alternatives."""

    Config = MpiOptions


def _import_mpi():
    """Import mpi4py.MPI, which initialises MPI.  (MPI_Init itself waits inside the MPI library
    until every process of the job arrives; it cannot be timed out from Python, since it holds
    the interpreter.  A process that dies before it makes mpirun end the job, naming it.)"""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError(f"the mpi:// transport needs mpi4py and an MPI library: pip install "
                          f"'cylon-store[mpi]' ({exc})") from exc
    return MPI


def _options(url: str, options: dict) -> MpiOptions:
    scheme, location, query = split_url(url)
    if location.split("://", 1)[1].strip("/") not in ("", "world"):
        raise ConfigError(f"mpi:// takes no location (ranks come from MPI), got {redact_url(url)!r}")
    def known():  # flat (deprecated) option names of the other backends, from the registry
        return option_names(StoreOptions, *option_classes_of_other_schemes("mpi"))

    (opts,) = build_options([MpiOptions], kwargs=options, query=query, known_env=known,
                            what="mpi:// transport", scheme="mpi")
    return opts


def _wait(reqs: list, owners: list, deadline: float, on_timeout, cancelled=lambda: False,
          step=None, service=None) -> None:
    """Poll ``reqs`` (and ``step()``, which may add requests and returns whether it made
    progress and whether it is done) until all complete or the deadline passes.

    Spins (yielding the CPU) while things move, then backs off to short sleeps when nothing
    completes for a while, so a late peer does not cost a whole core; while idle,
    ``service()`` answers other ranks' roll calls.
    """
    idle_since = last_service = time.monotonic()
    step_done = step is None
    while True:
        progressed = False
        if step is not None and not step_done:
            moved, step_done = step()
            progressed |= moved
        if reqs:
            done = _testsome(reqs)
            if done:
                progressed = True
                keep = [i for i in range(len(reqs)) if i not in done]
                reqs[:] = [reqs[i] for i in keep]
                owners[:] = [owners[i] for i in keep]
        if step_done and not reqs:
            return
        now = time.monotonic()
        if progressed:
            idle_since = now
        elif now > deadline:
            on_timeout(sorted(set(o for o in owners if o is not None)))
        if cancelled():
            raise ExchangeError("cancelled because another rank failed")
        idle = now - idle_since
        if idle < 0.01:
            os.sched_yield()
            continue
        if service is not None and now - last_service > 0.02:
            service()
            last_service = now
        time.sleep(5e-5 if idle < 1.0 else 1e-3)


class _RollCall:
    """Who is late?  MPI cannot say which rank has not joined a collective, so a rank that
    times out asks everyone; ranks waiting anywhere in our polling loop answer with the
    sequence number of the collective they are in, and the silent ones are named."""

    def __init__(self, comm, req_tag: int, rep_tag: int):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.req_tag, self.rep_tag = req_tag, rep_tag
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._pending: list = []  # our answers in flight (kept alive until complete)

    def service(self, current_seq: int) -> None:
        MPI, st = self.MPI, self.MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, self.req_tag, st):
            src = st.Get_source()
            self.comm.Recv([np.empty(1, np.int64), MPI.INT64_T], src, self.req_tag)  # arrived
            answer = np.array([current_seq], np.int64)
            self._pending.append((self.comm.Isend([answer, MPI.INT64_T], src, self.rep_tag), answer))
        self._pending = [(r, a) for r, a in self._pending if not r.Test()]

    def call(self, seq: int, grace: float) -> tuple[list, dict]:
        """Ask every rank; returns (ranks that did not answer, {rank: other seq it is in})."""
        MPI, st = self.MPI, self.MPI.Status()
        ask = np.array([seq], np.int64)
        sent = [self.comm.Isend([ask, MPI.INT64_T], d, self.req_tag)
                for d in range(self.size) if d != self.rank]
        heard: dict = {}
        deadline = time.monotonic() + grace
        while len(heard) < self.size - 1 and time.monotonic() < deadline:
            self.service(seq)  # others may be calling the roll at the same time
            while self.comm.Iprobe(MPI.ANY_SOURCE, self.rep_tag, st):
                src = st.Get_source()
                got = np.empty(1, np.int64)
                self.comm.Recv([got, MPI.INT64_T], src, self.rep_tag)
                heard[src] = int(got[0])
            time.sleep(1e-3)
        del sent  # 8-byte eager sends; nothing waits on them after a failure
        missing = [r for r in range(self.size) if r != self.rank and r not in heard]
        return missing, {r: s for r, s in heard.items() if s != seq}


def _late_detail(elsewhere: dict) -> str:
    if not elsewhere:
        return ""
    where = ", ".join(f"rank {r} in collective #{s}" for r, s in sorted(elsewhere.items()))
    return f" (ranks out of step: {where})"


def _testsome(reqs: list) -> set:
    idx = reqs[0].Testsome(reqs)
    return set(idx) if idx else set()


def _layout(sizes, max_count: int):
    """Receive layout for a collective over byte streams of ``sizes``: the datatype unit (1, or
    a power of two >= ALIGN when byte counts would exceed ``max_count``), counts and
    displacements in units, byte offsets (regions ALIGN-aligned) and the total length."""
    unit = 1
    while True:
        a = max(unit, ALIGN)
        offs, off = [], 0
        for n in sizes:
            offs.append(off)
            off += align(int(n), a)
        counts = [math.ceil(int(n) / unit) for n in sizes]
        if max(counts, default=0) <= max_count and off // unit <= max_count:
            return unit, counts, [o // unit for o in offs], offs, off
        unit = ALIGN if unit == 1 else unit * 2


class MpiCommunicator(DirectCommunicator):
    scheme = "mpi"

    def __init__(self, mpi_comm, diag_comm, *, job: str, timeout: float, options: MpiOptions):
        super().__init__(job=job, rank=mpi_comm.Get_rank(), world_size=mpi_comm.Get_size(),
                         timeout=timeout)
        from mpi4py import MPI
        self._MPI = MPI
        self._comm = mpi_comm
        self._diag = diag_comm
        self._roll = _RollCall(diag_comm, 1, 2)
        self.options = options
        self._max_count = int(options.max_count)
        self._tag_space = int(mpi_comm.Get_attr(MPI.TAG_UB) or 32767) + 1

    # -- plumbing -----------------------------------------------------------------------
    def _run(self, what, seq, fn):
        try:
            return super()._run(what, seq, fn)
        finally:
            if self._failed is not None:
                self._arm_abort()

    def _arm_abort(self) -> None:
        if self.options.abort_on_error:
            from mpi4py.run import set_abort_status
            set_abort_status(1)

    def _wait(self, what: str, seq: int, reqs: list, owners: list, step=None, late=None) -> None:
        """Wait for ``reqs``; at the deadline name the late ranks: ``late(missing)`` for
        point-to-point waits, else those that do not answer a roll call."""
        def on_timeout(missing):
            if late is not None:
                missing = late(missing)
            elsewhere = {}
            if not missing:
                missing, elsewhere = self._roll.call(seq, min(2.0, self.timeout))
            raise self._timeout_error(what, seq, missing, _late_detail(elsewhere))
        _wait(reqs, owners, self._deadline(), on_timeout, self._cancelled, step,
              lambda: self._roll.service(self._seq))

    def _dtype(self, unit: int):
        MPI = self._MPI
        return MPI.BYTE if unit == 1 else MPI.BYTE.Create_contiguous(unit).Commit()

    def _free(self, dtype) -> None:
        if dtype != self._MPI.BYTE:
            dtype.Free()

    def _sizes(self, what: str, seq: int, n: int) -> np.ndarray:
        MPI = self._MPI
        sizes = np.zeros(self.world_size, np.int64)
        req = self._comm.Iallgather([np.array([n], np.int64), MPI.INT64_T], [sizes, MPI.INT64_T])
        self._wait(what, seq, [req], [None])
        return sizes

    # -- exchange -----------------------------------------------------------------------
    def _exchange(self, seq, wire):
        if self.options.exchange_method == "alltoallv":
            return self._exchange_alltoallv(seq, wire)
        MPI, comm, me, P = self._MPI, self._comm, self.rank, self.world_size
        tag = seq % self._tag_space
        reqs, owners, keep = [], [], []
        for k in range(1, P):  # staggered, so rank 0 is not everyone's first peer
            d = (me + k) % P
            pieces, n = ipc_pieces(wire[d], self._max_count)
            hdr = header_of(pieces, n)
            keep.append((hdr, pieces))
            reqs.append(comm.Isend([hdr, MPI.INT64_T], d, tag))
            owners.append(d)
            for p in pieces:
                reqs.append(comm.Isend([p, MPI.BYTE], d, tag))
                owners.append(d)
            self.stats["bytes_sent"] += n
        srcs = [(me - k) % P for k in range(1, P)]
        regions = self._receive_streams("exchange", seq, tag, srcs, reqs, owners)
        del keep  # the sends have completed
        return {s: decode(*regions[s]) for s in srcs}

    def _receive_streams(self, what, seq, tag, srcs, reqs, owners) -> dict:
        """Receive one header-and-pieces stream from each of ``srcs`` while ``reqs`` (our own
        sends) complete; returns {src: (buffer, nbytes)}."""
        MPI, comm = self._MPI, self._comm
        status = MPI.Status()
        no_header = list(srcs)
        headers: dict = {}
        regions: dict = {}

        def step():
            moved = False
            for s in list(no_header):
                msg = comm.Improbe(s, tag, status)
                if msg is None:
                    continue
                hdr = np.empty(status.Get_count(MPI.BYTE) // 8, np.int64)
                headers[s] = (msg.Irecv([hdr, MPI.INT64_T]), hdr)
                no_header.remove(s)
                moved = True
            for s, (req, hdr) in list(headers.items()):
                if not req.Test():
                    continue
                del headers[s]
                moved = True
                lens = hdr[1:1 + int(hdr[0])]
                total = int(lens.sum())
                buf, view = new_region(total)
                regions[s] = (buf, total)
                off = 0
                for ln in lens.tolist():
                    reqs.append(comm.Irecv([view[off:off + ln], MPI.BYTE], s, tag))
                    owners.append(s)
                    off += ln
                self.stats["bytes_received"] += total
            return moved, not no_header and not headers

        # Late: senders whose streams are incomplete, receivers of our unfinished sends.
        self._wait(what, seq, reqs, owners, step,
                   late=lambda missing: sorted(set(missing) | set(no_header) | set(headers)))
        return regions

    def _exchange_alltoallv(self, seq, wire):
        MPI, comm, me, P = self._MPI, self._comm, self.rank, self.world_size
        send_sizes = np.array([ipc_size(t) if d != me else 0 for d, t in enumerate(wire)], np.int64)
        recv_sizes = np.zeros(P, np.int64)
        req = comm.Ialltoall([send_sizes, MPI.INT64_T], [recv_sizes, MPI.INT64_T])
        self._wait("exchange", seq, [req], [None])
        # Every rank must use the same datatype unit: agree on the largest layout.
        s_layout = _layout(send_sizes, self._max_count)
        r_layout = _layout(recv_sizes, self._max_count)
        unit = np.array([max(s_layout[0], r_layout[0])], np.int64)
        agreed = np.zeros(1, np.int64)
        req = comm.Iallreduce([unit, MPI.INT64_T], [agreed, MPI.INT64_T], op=MPI.MAX)
        self._wait("exchange", seq, [req], [None])
        unit = int(agreed[0])
        s_unit, s_counts, s_displs, s_offs, s_total = _layout_with_unit(send_sizes, unit)
        r_unit, r_counts, r_displs, r_offs, r_total = _layout_with_unit(recv_sizes, unit)
        sbuf, sview = new_region(s_total)
        for d, t in enumerate(wire):
            if send_sizes[d]:
                write_ipc_into(t, sview[s_offs[d]:s_offs[d] + int(send_sizes[d])])
        rbuf, rview = new_region(r_total)
        dtype = self._dtype(unit)
        try:
            req = comm.Ialltoallv([sview, (s_counts, s_displs), dtype],
                                  [rview, (r_counts, r_displs), dtype])
            self._wait("exchange", seq, [req], [None])
        finally:
            self._free(dtype)
        self.stats["bytes_sent"] += int(send_sizes.sum())
        self.stats["bytes_received"] += int(recv_sizes.sum())
        return {s: decode(rbuf.slice(r_offs[s]), int(recv_sizes[s])) for s in range(P) if s != me}

    # -- collectives on MPI's own -------------------------------------------------------
    def _allgather(self, seq, table):
        MPI, me, P = self._MPI, self.rank, self.world_size
        n = ipc_size(table)
        # Small tables in one collective: a fixed slot per rank, its first 8 bytes the size.
        # Only if some rank's table does not fit does a second (sized) collective follow.
        slots, slot_view = new_region(SMALL_SLOT * P)
        mine = slot_view[me * SMALL_SLOT:(me + 1) * SMALL_SLOT]
        mine[:8] = np.frombuffer(np.array([n], np.int64).tobytes(), np.uint8)
        if 0 < n <= SMALL_SLOT - ALIGN:   # n == 0: no table (None)
            write_ipc_into(table, mine[ALIGN:ALIGN + n])
        req = self._comm.Iallgather(MPI.IN_PLACE, [slot_view, SMALL_SLOT, MPI.BYTE])
        self._wait("allgather", seq, [req], [None])
        sizes = np.array([int(np.frombuffer(slot_view[s * SMALL_SLOT:s * SMALL_SLOT + 8], np.int64)[0])
                          for s in range(P)], np.int64)
        if int(sizes.max()) <= SMALL_SLOT - ALIGN:
            self.stats["bytes_received"] += int(sizes.sum()) - n
            return {s: decode(slots.slice(s * SMALL_SLOT + ALIGN), int(sizes[s]))
                    for s in range(P) if s != me}
        unit, counts, displs, offs, total = _layout(sizes, self._max_count)
        buf, view = new_region(total)
        if n:
            write_ipc_into(table, view[offs[me]:offs[me] + n])
        dtype = self._dtype(unit)
        try:
            req = self._comm.Iallgatherv(MPI.IN_PLACE, [view, (counts, displs), dtype])
            self._wait("allgather", seq, [req], [None])
        finally:
            self._free(dtype)
        self.stats["bytes_received"] += int(sizes.sum()) - n
        return {s: decode(buf.slice(offs[s]), int(sizes[s])) for s in range(self.world_size)
                if s != me}

    def _gather(self, seq, table, root):
        me = self.rank
        n = ipc_size(table) if me != root else 0  # the root keeps its own table
        sizes = self._sizes("gather", seq, n)
        unit, counts, displs, offs, total = _layout(sizes, self._max_count)
        dtype = self._dtype(unit)
        try:
            if me == root:
                buf, view = new_region(total)
                req = self._comm.Igatherv([view[:0], 0, dtype], [view, (counts, displs), dtype],
                                          root=root)
            else:
                buf, view = new_region(counts[me] * unit)
                if n:
                    write_ipc_into(table, view[:n])
                req = self._comm.Igatherv([view, counts[me], dtype], None, root=root)
            self._wait("gather", seq, [req], [None])
        finally:
            self._free(dtype)
        if me != root:
            self.stats["bytes_sent"] += n
            return {}
        self.stats["bytes_received"] += int(sizes.sum())
        return {s: decode(buf.slice(offs[s]), int(sizes[s])) for s in range(self.world_size)
                if s != me}

    def _bcast(self, seq, table, root):
        MPI, me = self._MPI, self.rank
        size = np.array([ipc_size(table) if me == root else 0], np.int64)
        req = self._comm.Ibcast([size, MPI.INT64_T], root=root)
        self._wait("bcast", seq, [req], [None])
        n = int(size[0])
        unit, counts, _, _, total = _layout([n], self._max_count)
        buf, view = new_region(counts[0] * unit)
        if me == root:
            write_ipc_into(table, view[:n])
        dtype = self._dtype(unit)
        try:
            req = self._comm.Ibcast([view, counts[0], dtype], root=root)
            self._wait("bcast", seq, [req], [None])
        finally:
            self._free(dtype)
        if me == root:
            return table
        self.stats["bytes_received"] += n
        return decode(buf, n)

    def _barrier(self, seq):
        req = self._comm.Ibarrier()
        for _ in range(_SPIN):   # the usual case: everyone is there within microseconds
            if req.Test():
                return
        self._wait("barrier", seq, [req], [None])

    def allreduce(self, value, op: str = "sum"):
        """MPI_Iallreduce on numpy data (bool with logical ops, integers, float32/64, complex for
        sum/prod); other dtypes reduce through allgather.  Ranks must pass the same dtype and
        shape — checked first, a mismatch raises ConfigError on every rank."""
        if op not in REDUCE_OPS:
            raise ConfigError(f"allreduce op must be one of {list(REDUCE_OPS)}, got {op!r}")
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype.kind not in "biufc":
            raise ConfigError(f"allreduce takes numbers or numeric numpy arrays, got "
                              f"{type(value).__name__} of dtype {arr.dtype}")
        seq = self._next("allreduce")
        mpi_op = self._mpi_op(arr.dtype, op)

        def run():
            MPI = self._MPI
            sig = f"{arr.dtype.str}{arr.shape}"
            sigs = np.zeros(self.world_size, np.int64)
            req = self._comm.Iallgather([np.array([zlib.crc32(sig.encode())], np.int64),
                                         MPI.INT64_T], [sigs, MPI.INT64_T])
            self._wait("allreduce", seq, [req], [None])
            if len(set(sigs.tolist())) > 1:
                odd = [r for r in range(self.world_size) if sigs[r] != sigs[0]]
                raise ConfigError(f"allreduce {seq}: ranks passed values of different dtype or "
                                  f"shape (rank {self.rank}: {sig}); rank(s) {odd} differ from "
                                  f"rank 0")
            if mpi_op is None:
                return None
            src = np.array(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            out = np.empty_like(src)
            req = self._comm.Iallreduce(src, out, op=mpi_op)
            self._wait("allreduce", seq, [req], [None])
            return out

        out = self._run("allreduce", seq, run)
        if mpi_op is None:  # same decision on every rank: the dtype matched
            return DirectCommunicator.allreduce(self, value, op)
        if isinstance(value, (bool, int, float, complex)) and not isinstance(value, np.generic):
            return out.item()
        return out[()] if out.ndim == 0 else out

    def _mpi_op(self, dtype: np.dtype, op: str):
        MPI = self._MPI
        if dtype.kind == "b":  # numpy's add/multiply/min/max on bools are or/and
            return {"sum": MPI.LOR, "max": MPI.LOR, "prod": MPI.LAND, "min": MPI.LAND}[op]
        if dtype.kind == "f" and dtype.itemsize not in (4, 8):
            return None  # MPI has no float16; long double varies by platform
        if dtype.kind == "c" and (op in ("min", "max") or dtype.itemsize not in (8, 16)):
            return None  # numpy orders complex numbers, MPI does not
        return {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "prod": MPI.PROD}[op]

    # -- shutdown -----------------------------------------------------------------------
    def _shutdown(self, healthy: bool) -> None:
        if healthy:
            self._comm.Free()
            self._diag.Free()
        else:
            # Requests may still be pending on peers that are gone or stuck: freeing the
            # communicator or finalizing could block, so end the job at exit instead.
            self._arm_abort()
        self._comm = self._diag = None


def _layout_with_unit(sizes, unit: int):
    a = max(unit, ALIGN)
    offs, off = [], 0
    for n in sizes:
        offs.append(off)
        off += align(int(n), a)
    counts = [math.ceil(int(n) / unit) for n in sizes]
    return unit, counts, [o // unit for o in offs], offs, off


def connect(url: str, *, job: str, rank: Optional[int] = None, world_size: Optional[int] = None,
            rendezvous=None, timeout: float = DEFAULT_TIMEOUT, info: Optional[dict] = None,
            **options) -> MpiCommunicator:
    """Join ``job`` on the ranks MPI started: ``mpirun -n N python script.py`` or
    ``cs.launch(fn, N, store="mpi://", launcher="mpi")``.  ``comm=`` takes an mpi4py
    communicator to run on (default ``COMM_WORLD``)."""
    base = options.pop("comm", None)
    opts = _options(url, options)
    if rendezvous is not None:
        raise ConfigError("mpi:// takes its ranks from MPI (mpirun); rendezvous=... applies to "
                          "ucx:// and store URLs")
    if timeout is None or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    deadline = time.monotonic() + timeout
    MPI = _import_mpi()
    base = MPI.COMM_WORLD if base is None else base
    size, me = base.Get_size(), base.Get_rank()
    if world_size is not None and int(world_size) != size:
        raise ConfigError(f"mpi:// runs on the processes MPI started: this MPI world has {size} "
                          f"process(es) but world_size={world_size} was requested; start them with "
                          f"`mpirun -n {world_size} ...` or cs.launch(..., launcher='mpi')")
    if rank is not None and int(rank) != me:
        raise ConfigError(f"mpi:// ranks come from MPI: this process is rank {me}, not {rank}")
    # Until our communicators exist, roll calls travel on the base communicator, on the two
    # highest tags (user code is unlikely to use them while connecting).
    tag_ub = int(base.Get_attr(MPI.TAG_UB) or 32767)
    roll = _RollCall(base, tag_ub, tag_ub - 1)

    def on_timeout(_missing):
        missing, elsewhere = roll.call(0, min(2.0, timeout))
        if opts.abort_on_error:  # a duplication is pending: MPI_Finalize could wait for it
            from mpi4py.run import set_abort_status
            set_abort_status(1)
        raise ExchangeTimeoutError(
            f"connect to job {job!r}: rank {me} timed out after {timeout:g}s waiting for rank(s) "
            f"{missing} to call connect{_late_detail(elsewhere)}", missing=missing, backend="mpi")

    comms = []
    for _ in range(2):  # ours, and one for roll calls
        comm, req = base.Idup()
        _wait([req], [None], deadline, on_timeout, service=lambda: roll.service(0))
        comms.append(comm)
    comm, diag = comms
    # Every rank must join the same job: a mixed-up launch fails here, not in a collective.
    jobs = np.zeros(size, np.int64)
    req = comm.Iallgather([np.array([zlib.crc32(job.encode())], np.int64), MPI.INT64_T],
                          [jobs, MPI.INT64_T])
    _wait([req], [None], deadline, on_timeout, service=lambda: roll.service(0))
    if len(set(jobs.tolist())) > 1:
        odd = [r for r in range(size) if jobs[r] != jobs[me]]
        comm.Free()
        diag.Free()
        raise RendezvousError(f"rank {me} joined job {job!r} but rank(s) {odd} of the same MPI "
                              f"world joined another job", backend="mpi")
    return MpiCommunicator(comm, diag, job=job, timeout=timeout, options=opts)
