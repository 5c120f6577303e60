"""The communicator over a blob store: the serverless path, where ranks meet only through storage.

Guarantees: a message is read exactly once, only by its destination, only within its job and
run (keys carry job, run token, sequence number, destination and source: ``keys.py``); every
wait ends at the timeout naming the ranks that never delivered; receivers learn of new messages
from the writers' announcements where the backend notifies (Redis, memory), else by LIST with
capped, jittered backoff; ``close()`` leaves nothing of this rank's behind. The exchange runs one
of three strategies — direct (one object per pair), combined (one object per sender, one
ranged read per pair) or two-level (two combined rounds on a sqrt(P) grid) — chosen by the
request model of ``layout.py``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa

from . import codec
from . import keys as K
from .collective import Communicator, check_schema, empty_like
from .errors import (ConfigError, ExchangeError, ExchangeTimeoutError, IntegrityError,
                     NotFoundError, StoreError)
from .layout import (STRATEGIES, Grid, cheapest_strategy, combined_header,
                     combined_header_size, decode_tag, encode_tag, expect_slot, find_slot,
                     parse_combined_header, parse_pieces, pieces_header, slot_range)
from .retry import poll_delays
from .store import MAX_KEY_BYTES, Store

_log = logging.getLogger("cylon_store")

#: Seconds a notified receiver waits on announcements alone before it LISTs once anyway.
LIST_FALLBACK = 1.0
#: An exchange whose parts for the other ranks add up to at most this many bytes writes one
#: object with a slot per rank (one put instead of P-1) where the strategy is left to "auto";
#: the announcements of small slots carry them, so receivers need not read them (``INLINE_MAX``).
SMALL_EXCHANGE = 256 << 10
#: Shared objects (read by several ranks, deleted by their writer once all have read them) are
#: deleted in batches of this many, or as soon as they hold this many bytes.
PRUNE_OBJECTS = 16
PRUNE_BYTES = 16 << 20
#: Largest encoded slot an announcement carries (the object is written too: a receiver whose
#: announcement was lost reads it).
INLINE_MAX = 32 << 10
_NOSCHEMA = b"cylon.noschema"


def _strip_marker(table: pa.Table) -> tuple[Optional[pa.Table], bool]:
    meta = table.schema.metadata or {}
    if _NOSCHEMA in meta:
        return None, True
    return table, False


def _noschema_table() -> pa.Table:
    return pa.table({}).replace_schema_metadata({_NOSCHEMA: b"1"})


def choose_strategy(exchange: str, store: Store, world_size: int) -> str:
    if exchange not in STRATEGIES:
        raise ConfigError(f"exchange must be one of {list(STRATEGIES)}, got {exchange!r}")
    if exchange != "auto":
        if exchange in ("combined", "twolevel") and not store.capabilities.byte_ranges:
            raise ConfigError(f"exchange={exchange!r} needs byte-range reads, which the "
                              f"{store.scheme}:// backend does not declare")
        return exchange
    if store.capabilities.request_priced and store.capabilities.byte_ranges:
        # Fewer requests where each is billed (see layout.cheapest_strategy for the numbers).
        return cheapest_strategy(world_size, store.capabilities.billing)
    return "direct"


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
        #: "auto" on a store where direct messages were chosen: small exchanges still go as one
        #: combined object (receivers accept either kind of message from each sender).
        self._small_combined = (exchange == "auto" and self.strategy == "direct"
                                and store.capabilities.byte_ranges)
        #: Longest sleep between two polls: short where a LIST is free (local disk, shared
        #: memory, Redis), longer where every LIST is billed.
        priced = store.capabilities.request_priced
        self.poll_cap = 0.1 if priced else 0.02
        self.poll_first = 0.01 if priced else 0.001
        # (seq, key, bytes) of objects all ranks read; ours to delete once every rank has
        self._shared: list[tuple[int, str, int]] = []
        self._pool = ThreadPoolExecutor(max_workers=store.options.concurrency,
                                        thread_name_prefix=f"cylon-r{rank}")
        self._notify = store.capabilities.notification
        #: Doorbells (local processes over file:// or shared memory): announcements that end a
        #: poll's sleep early and may carry small data, but can be lost, so polling goes on.
        self._doorbell = store.capabilities.doorbell and not self._notify
        self._inbox = K.channel(job, token, rank)
        #: Keys announced on our channel and not yet read, with the data the announcement
        #: carried (small slots) or None (a receiver learns what arrived from these instead of
        #: LISTing; LIST stays the fallback).
        self._mailbox: dict[str, Optional[bytes]] = {}
        self.stats = {"exchanges": 0, "rows_sent": 0, "rows_received": 0}
        if self._doorbell:
            # Listen from now on (a doorbell rung before was not delivered, and its sender
            # wrote the object); one that arrived while binding is kept.
            self._take(store.wait(self._inbox, 0))

    def _put(self, key: str, table: pa.Table, dst: Optional[int]) -> None:
        self.store.put(key, table)
        self._announce(key, range(self.world_size) if dst is None else [dst])

    def _announce(self, key: str, targets, inline: Optional[Callable[[int], Optional[bytes]]] = None
                  ) -> None:
        """Tell each target (but us) that ``key`` is readable now; ``inline(d)``: the bytes
        target d will read from it, when small enough to travel with the announcement."""
        if self._notify or self._doorbell:
            head = key.encode()
            messages = []
            for d in targets:
                if d == self.rank:
                    continue
                data = inline(d) if inline is not None else None
                messages.append((K.channel(self.job, self.token, d),
                                 head if data is None else head + b"\0" + data))
            self.store.notify_many(messages)

    def _receive(self, what: str, seq: int, srcs: list[int], dst: Optional[int], *,
                 delete: bool, read: Optional[Callable[[str], Any]] = None,
                 inline: Optional[Callable[[str, bytes], Any]] = None,
                 prefixes: Optional[list[str]] = None, sends: Sequence[Future] = ()
                 ) -> dict[int, Any]:
        """Wait for the messages of ``srcs`` to ``dst`` (a rank, or None for shared objects;
        ``prefixes`` overrides where to look), read each as soon as it is visible (``inline``
        turns the data an announcement carried into the same result, sparing the read), delete
        those addressed to this rank if ``delete``.  ``sends``: this rank's writes of the same collective, still running: one
        that fails ends the wait at once with its error (instead of a timeout, everywhere)."""
        pending = set(srcs)
        out: dict[int, Any] = {}
        if not pending:
            return out
        look_in = tuple(prefixes or [K.inbox_prefix(self.job, self.token, seq, dst)])
        deadline = time.monotonic() + self.timeout
        delays = poll_delays(first=self.poll_first, cap=self.poll_cap)
        read_keys = []
        if self._notify or self._doorbell:   # announcements of finished collectives are stale
            self._mailbox = {k: v for k, v in self._mailbox.items() if _seq_of(k) >= seq}
        listed_at = time.monotonic()
        # Doorbell stores look at what the doorbells brought before their first LIST.
        must_list = not (self._notify or self._doorbell)
        reader = read or self.store.get
        while pending:
            present = {}
            candidates = [k for k in self._mailbox if k.startswith(look_in)]
            if must_list:
                candidates += [k for prefix in look_in for k in self.store.list(prefix)]
                listed_at, must_list = time.monotonic(), not (self._notify or self._doorbell)
            for key in candidates:
                try:
                    mk = K.parse_msg_key(key)
                except ValueError:
                    continue
                if mk.src in pending:
                    present[mk.src] = key
            if present:
                carried = {src: self._mailbox.get(key) for src, key in present.items()}
                futures: dict[int, Any] = {}
                for src, key in present.items():
                    if carried[src] is not None and inline is not None:
                        futures[src] = None
                    elif len(present) == 1:   # one read: no thread hand-off
                        futures[src] = key
                    else:
                        futures[src] = self._pool.submit(reader, key)
                for src, fut in futures.items():
                    try:
                        if fut is None:
                            out[src] = inline(present[src], carried[src])  # type: ignore[misc,arg-type]
                        elif isinstance(fut, str):
                            out[src] = reader(fut)
                        else:
                            out[src] = fut.result()
                    except NotFoundError as exc:
                        # Listed, then gone: only an aborting sender deletes its own messages.
                        raise ExchangeError(
                            f"{what} {seq} of job {self.job!r}: rank {src} failed and withdrew "
                            f"its data while rank {self.rank} was reading it", seq=seq,
                            backend=self.store.scheme) from exc
                    pending.discard(src)
                    read_keys.append(present[src])
                    self._mailbox.pop(present[src], None)
                continue
            for f in sends:
                if f.done() and f.exception() is not None:
                    f.result()   # raises the write's own error (no space, refused, ...)
            # A rank whose own wait has expired reports that (it names the ranks it waited
            # for, the cause of a chain of waits), even when a sibling failed meanwhile: on a
            # loaded machine the sibling that waited on it may have timed out a moment first.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(pending)
                raise ExchangeTimeoutError(
                    f"{what} {seq} of job {self.job!r}: rank {self.rank} timed out after "
                    f"{self.timeout:g}s waiting for rank(s) {missing} (store {self.store.safe_url})",
                    seq=seq, missing=missing, backend=self.store.scheme)
            if self._cancelled():
                raise ExchangeError(f"{what} {seq} of job {self.job!r}: cancelled on rank "
                                    f"{self.rank} because another rank failed", seq=seq)
            if self._notify:
                got: object = self.store.wait(self._inbox, min(remaining, 0.25))
                if isinstance(got, list):
                    self._take(got)
                else:   # an adapter whose wait only wakes us up
                    must_list = True
                # Safety net: announcements lost with a broken connection cost one LIST a second.
                if time.monotonic() - listed_at > LIST_FALLBACK:
                    must_list = True
            elif self._doorbell:
                got = self.store.wait(self._inbox, min(remaining, next(delays)))
                # A doorbell may be lost: LIST after every sleep it did not end with news.
                must_list = not self._take(got)
            else:
                time.sleep(min(remaining, next(delays)))
        if delete and read_keys:
            # Only messages addressed to this rank are the reader's to delete; objects for
            # several ranks are deleted by their writer once every rank has read them.
            own = [k for k in read_keys if K.parse_msg_key(k).dst is not None]
            if own:
                self.store.delete_many(own)
        return out

    def _take(self, messages: list) -> bool:
        """Put announcements into the mailbox; whether any named a key."""
        news = False
        for m in messages:
            if not m:
                continue
            key, sep, data = bytes(m).partition(b"\0")
            self._mailbox[key.decode()] = data if sep else None
            news = True
        return news

    def _prune_shared(self, below: int, *, now: bool = False) -> None:
        """Delete our shared objects of collectives every rank has finished (seq < below), in
        batches: once they hold ``PRUNE_BYTES`` or number ``PRUNE_OBJECTS`` (small collectives
        then pay one delete request every few calls instead of one each), or ``now``."""
        done = [(s, k, n) for s, k, n in self._shared if s < below]
        if not done:
            return
        if not now and len(done) < PRUNE_OBJECTS and sum(n for _, _, n in done) < PRUNE_BYTES:
            return
        self._shared = [item for item in self._shared if item[0] >= below]
        self.store.delete_many([k for _, k, _ in done])

    # -- collectives --------------------------------------------------------------------
    def _exchange_impl(self, seq, schema, parts):
        if self.strategy == "combined" and self.world_size > 1:
            return self._exchange_combined(seq, schema, parts)
        if self.strategy == "twolevel" and self.world_size > 1:
            return self._exchange_twolevel(seq, schema, parts)
        me, P = self.rank, self.world_size
        if self._small_combined and P > 1 and sum(
                p.nbytes for d, p in enumerate(parts) if d != me and p is not None) <= SMALL_EXCHANGE:
            return self._exchange_combined(seq, schema, parts)
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
        got = self._receive_exchange(seq, sends=send_futs)
        for f in send_futs:
            f.result()
        self.stats["exchanges"] += 1
        return self._assemble("exchange", seq, schema, parts[me], got, full_sync=True)

    def _receive_exchange(self, seq: int, sends: Sequence[Future] = ()) -> dict:
        """This rank's part from every other rank: a direct message, or its slot of the
        sender's combined object (with ``_small_combined`` each sender picks by its size)."""
        me, P = self.rank, self.world_size
        targets = list(range(P))
        where = lambda key: {"backend": self.store.scheme, "op": "exchange", "key": key}  # noqa: E731

        def read(key):
            if K.parse_msg_key(key).dst is not None:
                return self.store.get(key)
            return codec.decode(self._read_slot(key, targets), lambda: where(key))

        def inline(key, data):
            return codec.decode(pa.py_buffer(data), lambda: where(key))

        prefixes = []
        if self.strategy == "direct":
            prefixes.append(K.inbox_prefix(self.job, self.token, seq, me))
        if self.strategy == "combined" or self._small_combined:
            prefixes.append(K.inbox_prefix(self.job, self.token, seq, None))
        return self._receive("exchange", seq, [s for s in range(P) if s != me], me, delete=True,
                             read=read, inline=inline, prefixes=prefixes, sends=sends)

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
                      group: Optional[str] = None, carry: bool = True) -> None:
        """Write one combined object with a slot per rank of ``targets`` (slot = list of
        buffers), its slot sizes in the key when they fit; notify the targets."""
        sizes = [sum(memoryview(c).nbytes for c in chunks) for chunks in slots]
        key = K.msg_key(self.job, self.token, seq, None, self.rank, group=group)
        tagged = f"{key}-{encode_tag(sizes)}"
        if len(tagged.encode()) <= MAX_KEY_BYTES:
            key = tagged
        self._share(seq, key, [combined_header(sizes), *[c for chunks in slots for c in chunks]],
                    targets, (lambda d: _joined(slots[targets.index(d)], INLINE_MAX)) if carry
                    else (lambda d: None))

    def _share(self, seq: int, key: str, chunks: list, targets,
               inline: Callable[[int], Optional[bytes]]) -> None:
        """Write ``chunks`` as the object ``key`` that ``targets`` read, and announce it
        (``inline(d)``: what d reads of it, when small enough to travel with the announcement).
        Where doorbells carry every target's data and every one is delivered, nothing is
        written: a delivered doorbell sits in its receiver's queue until read."""
        me = self.rank
        if self._doorbell:
            carried = [(d, inline(d)) for d in targets if d != me]
            if all(data is not None for _, data in carried):
                head = key.encode()
                delivered = self.store.notify_many(
                    [(K.channel(self.job, self.token, d), head + b"\0" + data)  # type: ignore[operator]
                     for d, data in carried])
                if all(delivered):
                    return
                # A receiver that was not listening yet (or whose queue was full) LISTs and
                # reads the object; the others have their data already.
                self._shared.append((seq, key, self.store.put_bytes(key, chunks)))
                return
        if self._notify:
            head = key.encode()
            messages = []
            for d in targets:
                if d != me:
                    data = inline(d)
                    messages.append((K.channel(self.job, self.token, d),
                                     head if data is None else head + b"\0" + data))
            self._shared.append((seq, key, self.store.put_bytes(key, chunks, notify=messages)))
            return
        self._shared.append((seq, key, self.store.put_bytes(key, chunks)))

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
        reads its slot of every other sender's object (or takes it from the announcement)."""
        me, P = self.rank, self.world_size
        slots = [[] if d == me else self._encode(self._outgoing(schema, parts, d)) for d in range(P)]
        self._put_combined(seq, list(range(P)), slots)
        del slots
        got = self._receive_exchange(seq)
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
            self._put_combined(seq, t1, [bundle(held.pop(m, [])) for m in t1], group=row_key,
                               carry=False)
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
                               group=col_key, carry=False)
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
            if self._check_schemas or what != "exchange":
                check_schema(ref_schema, ref_rank, t.schema if t is not None else None, src, seq,
                             what)
        result = []
        for s in range(P):
            t = own if s == me else tables[s]
            if t is None:
                t = empty_like(ref_schema)
            result.append(t)
            if s != me:
                self.stats["rows_received"] += t.num_rows
        return result

    def _put_shared(self, seq: int, table: pa.Table) -> None:
        """One object for every other rank (its announcement carries it when small)."""
        key = K.msg_key(self.job, self.token, seq, None, self.rank)
        chunks = self._encode(table)
        small = _joined(chunks, INLINE_MAX) if (self._notify or self._doorbell) else None
        self._share(seq, key, chunks, range(self.world_size), lambda d: small)

    def _decode_inline(self, key: str, data: bytes) -> pa.Table:
        return codec.decode(pa.py_buffer(data), lambda: {"backend": self.store.scheme,
                                                         "op": "collective", "key": key})

    def _allgather_impl(self, seq, table):
        me, P = self.rank, self.world_size
        if P > 1:
            self._put_shared(seq, table if table is not None else _noschema_table())
        got = self._receive("allgather", seq, [s for s in range(P) if s != me], None, delete=False,
                            inline=self._decode_inline)
        return self._assemble("allgather", seq, table.schema if table is not None else None, table,
                              got, full_sync=True)

    def _gather_impl(self, seq, table, root):
        me, P = self.rank, self.world_size
        if me != root:
            self._put(K.msg_key(self.job, self.token, seq, root, me),
                      table if table is not None else _noschema_table(), root)
            return None
        got = self._receive("gather", seq, [s for s in range(P) if s != me], me, delete=True)
        return self._assemble("gather", seq, table.schema if table is not None else None, table, got,
                              full_sync=True)

    def _bcast_impl(self, seq, table, root):
        if self.rank == root:
            if self.world_size > 1:
                self._put_shared(seq, table)
            return table
        got = self._receive("bcast", seq, [root], None, delete=False, inline=self._decode_inline)
        return got[root]

    def _barrier_impl(self, seq):
        """Every rank writes one empty marker for all and waits until it has seen the others'
        (LIST or announcements; nothing is read): one write per rank and one round, where a
        gather to rank 0 and its release took two.  Markers are deleted by their writers once
        every rank has passed (the next collective, or close)."""
        me, P = self.rank, self.world_size
        if P == 1:
            return
        self._share(seq, K.msg_key(self.job, self.token, seq, None, me), [b""], range(P),
                    lambda d: b"")
        self._receive("barrier", seq, [s for s in range(P) if s != me], None, delete=False,
                      read=lambda key: None, inline=lambda key, data: None)
        # Everyone has finished every collective before this one.
        self._prune_shared(seq)

    def _final_barrier(self, seq):
        """The last synchronisation (``close``): a gather to rank 0 and its release, whose
        messages are deleted by their readers, so nothing of it is left for the cleanup to
        remove while a rank may still be looking for it."""
        me, P = self.rank, self.world_size
        if P == 1:
            return
        token = _noschema_table()
        if me != 0:
            self._put(K.msg_key(self.job, self.token, seq, 0, me), token, 0)
            # Rank 0 releases everyone once all arrived: if it does not, the rank missing may
            # be another one that rank 0 is itself waiting for (its own error names it).
            self._receive("barrier (released by rank 0 once every rank arrived; rank 0 may "
                          "itself be waiting for another rank)", seq, [0], me, delete=True)
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
            # Sends of a failed exchange may still be running: let them land (or fail) before
            # the cleanup lists what to delete, so none lands after it; queued ones never start.
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._cleanup(healthy)
        finally:
            if self._own_store:
                self.store.close()

    def _cleanup(self, healthy: bool) -> None:
        store = self.store
        leftovers = [k for _, k, _ in self._shared]
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
        # Best effort, but never silent: what could not be removed is logged with the command
        # that removes it (a TTL, where the backend has one, also reclaims it).
        if self._used_counter and self.rank == 0:
            try:
                store.delete_counter(K.counter_key(self.job))
            except StoreError as exc:
                _log.warning("rank 0 of job %r could not delete its rendezvous counter (%s); "
                             "remove it with `cylon-store clean %s --job %s`", self.job, exc,
                             store.safe_url, self.job)
        if self._notify:
            try:
                store.wait(self._inbox, 0)  # drain announcements left for us
            except StoreError as exc:
                _log.warning("rank %d of job %r could not drain its notification channel (%s); "
                             "remove it with `cylon-store clean %s --job %s`", self.rank,
                             self.job, exc, store.safe_url, self.job)


def _joined(chunks: list, limit: int) -> Optional[bytes]:
    """The chunks as one bytes object, or None if longer than ``limit``."""
    if sum(memoryview(c).nbytes for c in chunks) > limit:
        return None
    return b"".join(memoryview(c).cast("B") for c in chunks)


def _seq_of(key: str) -> int:
    try:
        return K.parse_msg_key(key).seq
    except ValueError:
        return -1
