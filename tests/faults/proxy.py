"""A TCP fault proxy for the network fault suite (stdlib only).

``FaultProxy(target_host, target_port)`` listens on ``127.0.0.1:<free port>`` and forwards every
connection to the target.  Faults are set at runtime (thread-safe setters):

- ``passthrough()`` (alias ``pass_()``, and ``getattr(proxy, "pass")()``): no fault;
- ``reset_after(nbytes, p)``: of the connections that carry ``nbytes`` bytes (both directions
  counted), a fraction ``p`` is reset right there (``SO_LINGER`` 0, then close: both peers see
  a TCP RST) — the data up to the threshold is forwarded, so the reset lands mid-transfer;
- ``stall(seconds, p, after_bytes=0)``: of the connections that carry ``after_bytes`` bytes, a
  fraction ``p`` has its data held (neither direction forwarded) for ``seconds``;
- ``drop(p)``: a fraction ``p`` of new connections is accepted and reset at once, before the
  target is even contacted.

Which connections get a fault is reproducible: ``spread="even"`` (the default) hits a fraction
``p`` of the eligible connections exactly: the first one (so a transport with a single
connection, such as gRPC, is hit too and a test can rely on the fault happening), then one in
every 1/p, at a phase drawn from the RNG seeded with ``seed``; ``spread="random"`` draws each
connection independently from the seeded RNG.

``stats()`` returns counters of what the proxy did (``connections``, ``resets``, ``stalls``,
``drops``, bytes each way, ...), so that a test can assert that its fault actually happened.
``close()`` stops the listener and every connection thread and closes every socket; the proxy
is a context manager.

Each connection is served by one thread with non-blocking sockets and a ``selectors`` loop, so
the thread that decides a reset is the one that owns the sockets (no cross-thread close), and a
slow reader on one side never blocks the other direction.
"""

from __future__ import annotations

import errno
import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

#: Bytes buffered per direction before the proxy stops reading from the sender.
_BUFFER_LIMIT = 1 << 20
#: How often every loop wakes up to look at ``close()`` and stall deadlines.
_TICK = 0.05


@dataclass(frozen=True)
class Faults:
    """The fault settings new connections are decided by."""

    drop_p: float = 0.0
    reset_p: float = 0.0
    reset_bytes: int = 0
    stall_p: float = 0.0
    stall_seconds: float = 0.0
    stall_after_bytes: int = 0


class _Picker:
    """Decides which eligible events get a fault: exactly a fraction ``p`` of them, evenly
    spread from a seeded phase ("even"), or independent seeded draws ("random")."""

    def __init__(self, rng: random.Random, spread: str):
        self.rng = rng
        self.spread = spread
        self.p = 0.0
        self.acc = 0.0

    def set(self, p: float) -> None:
        self.p = p
        # The first eligible event is always hit (a transport with one connection, such as
        # gRPC, still gets the fault); the seeded fraction shifts which later ones are.
        self.acc = 1.0 - p + self.rng.random() * p

    def take(self) -> bool:
        if self.p <= 0.0:
            return False
        if self.spread == "random":
            return self.rng.random() < self.p
        self.acc += self.p
        if self.acc >= 1.0:
            self.acc -= 1.0
            return True
        return False


def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a fraction must be in [0, 1], got {p}")
    return p


def hard_reset(sock: Optional[socket.socket]) -> None:
    """Close ``sock`` so that its peer gets a TCP RST (SO_LINGER on, timeout 0)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    """See the module docstring."""

    def __init__(self, target_host: str, target_port: int, *, seed: int = 0,
                 spread: str = "even", listen_host: str = "127.0.0.1",
                 connect_timeout: float = 5.0):
        if spread not in ("even", "random"):
            raise ValueError(f"spread must be 'even' or 'random', got {spread!r}")
        self.target = (target_host, int(target_port))
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        rng = random.Random(seed)
        self._pick = {kind: _Picker(random.Random(rng.random()), spread)
                      for kind in ("drop", "reset", "stall")}
        self._faults = Faults()
        self._counters = {"connections": 0, "active": 0, "resets": 0, "stalls": 0, "drops": 0,
                          "upstream_errors": 0, "bytes_up": 0, "bytes_down": 0}
        self._closing = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, 0))
        self._listener.listen(256)
        self._listener.settimeout(_TICK)
        self.host, self.port = self._listener.getsockname()[:2]
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"fault-proxy-{self.port}")
        self._accept_thread.start()

    # -- control (thread-safe) -------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def passthrough(self) -> "FaultProxy":
        """No faults for new connections (connections already stalled or doomed keep theirs)."""
        with self._lock:
            self._faults = Faults()
            for picker in self._pick.values():
                picker.set(0.0)
        return self

    pass_ = passthrough

    def reset_after(self, nbytes: int, p: float = 1.0) -> "FaultProxy":
        """Reset a fraction ``p`` of new connections after ``nbytes`` bytes (either direction)."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            self._faults = replace(self._faults, reset_p=_check_p(p), reset_bytes=int(nbytes))
            self._pick["reset"].set(self._faults.reset_p)
        return self

    def stall(self, seconds: float, p: float = 1.0, *, after_bytes: int = 0) -> "FaultProxy":
        """Hold the data of a fraction ``p`` of new connections for ``seconds``, once
        ``after_bytes`` bytes have passed."""
        if seconds < 0 or after_bytes < 0:
            raise ValueError("seconds and after_bytes must be >= 0")
        with self._lock:
            self._faults = replace(self._faults, stall_p=_check_p(p),
                                   stall_seconds=float(seconds), stall_after_bytes=int(after_bytes))
            self._pick["stall"].set(self._faults.stall_p)
        return self

    def drop(self, p: float) -> "FaultProxy":
        """Accept and immediately reset a fraction ``p`` of new connections."""
        with self._lock:
            self._faults = replace(self._faults, drop_p=_check_p(p))
            self._pick["drop"].set(self._faults.drop_p)
        return self

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counters)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting, end every connection (their sockets are closed) and join threads."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._accept_thread.join(5)
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:   # only left if a thread did not end in time
            hard_reset(s)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.address} -> {self.target[0]}:{self.target[1]}, {self._faults})"

    # -- the work -----------------------------------------------------------------------------
    def _decide_drop(self) -> bool:
        with self._lock:
            self._counters["connections"] += 1
            return self._pick["drop"].take()

    def _plan(self) -> dict:
        """The thresholds of a new connection (whether it is hit is decided when it gets
        there, among the connections that do)."""
        with self._lock:
            f = self._faults
            return {"reset_at": f.reset_bytes if f.reset_p > 0 else None,
                    "stall": (f.stall_seconds, f.stall_after_bytes)
                    if f.stall_p > 0 and f.stall_seconds > 0 else None}

    def _hit(self, kind: str) -> bool:
        with self._lock:
            return self._pick[kind].take()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(_TICK)
                continue
            if self._decide_drop():
                self._count("drops")
                hard_reset(client)
                continue
            t = threading.Thread(target=self._serve, args=(client, self._plan()), daemon=True,
                                 name=f"fault-proxy-{self.port}-conn")
            with self._lock:
                self._threads.add(t)
            t.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)

    def _untrack(self, *socks) -> None:
        with self._lock:
            for s in socks:
                if s is not None:
                    self._socks.discard(s)

    def _serve(self, client: socket.socket, decision: dict) -> None:
        upstream = None
        self._count("active")
        self._track(client)
        try:
            try:
                upstream = socket.create_connection(self.target, timeout=self._connect_timeout)
            except OSError:
                self._count("upstream_errors")
                hard_reset(client)
                return
            self._track(upstream)
            self._pump(client, upstream, decision)
        finally:
            self._untrack(client, upstream)
            self._count("active", -1)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _pump(self, client: socket.socket, upstream: socket.socket, decision: dict) -> None:
        for s in (client, upstream):
            s.setblocking(False)
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        # Per direction: source, destination, pending bytes, source at EOF, FIN sent.
        dirs = [
            {"src": client, "dst": upstream, "buf": bytearray(), "eof": False, "shut": False,
             "counter": "bytes_up"},
            {"src": upstream, "dst": client, "buf": bytearray(), "eof": False, "shut": False,
             "counter": "bytes_down"},
        ]
        reset_at = decision["reset_at"]
        stall = decision["stall"]
        stall_until = None
        stalled_once = False
        moved = 0   # bytes read from either side (what the fault thresholds count)
        sel = selectors.DefaultSelector()
        try:
            while True:
                if self._closing.is_set():
                    hard_reset(client)
                    hard_reset(upstream)
                    return
                now = time.monotonic()
                if stall is not None and not stalled_once and moved >= stall[1]:
                    stalled_once = True
                    if self._hit("stall"):
                        stall_until = now + stall[0]
                        self._count("stalls")
                held = stall_until is not None and now < stall_until
                # Interest per socket, rebuilt every round (few sockets: cheap).
                interest: dict = {client: 0, upstream: 0}
                if not held:
                    for d in dirs:
                        if not d["eof"] and len(d["buf"]) < _BUFFER_LIMIT:
                            interest[d["src"]] |= selectors.EVENT_READ
                        if d["buf"]:
                            interest[d["dst"]] |= selectors.EVENT_WRITE
                for s in (client, upstream):
                    try:
                        sel.unregister(s)
                    except (KeyError, ValueError):
                        pass
                    if interest[s]:
                        sel.register(s, interest[s])
                if not interest[client] and not interest[upstream]:
                    if all(d["eof"] and not d["buf"] for d in dirs):
                        return   # both sides closed cleanly, everything forwarded
                    time.sleep(_TICK)
                    continue
                events = sel.select(_TICK)
                for key, mask in events:
                    s = key.fileobj
                    for d in dirs:
                        if mask & selectors.EVENT_READ and d["src"] is s and not d["eof"]:
                            try:
                                data = s.recv(65536)
                            except (BlockingIOError, InterruptedError):
                                data = None
                            except OSError:
                                # The peer reset (or failed): pass the reset on to the other side.
                                hard_reset(client)
                                hard_reset(upstream)
                                return
                            if data is None:
                                continue
                            if not data:
                                d["eof"] = True
                                continue
                            if reset_at is not None and moved + len(data) >= reset_at and \
                                    not self._hit("reset"):
                                reset_at = None   # this connection is spared
                            if reset_at is not None and moved + len(data) >= reset_at:
                                # Forward exactly up to the threshold, then reset both sides.
                                keep = max(0, reset_at - moved)
                                d["buf"] += data[:keep]
                                self._count(d["counter"], keep)
                                self._flush_blocking(d)
                                self._count("resets")
                                hard_reset(client)
                                hard_reset(upstream)
                                return
                            moved += len(data)
                            d["buf"] += data
                            self._count(d["counter"], len(data))
                        if mask & selectors.EVENT_WRITE and d["dst"] is s and d["buf"]:
                            try:
                                n = s.send(d["buf"])
                            except (BlockingIOError, InterruptedError):
                                n = 0
                            except OSError:
                                hard_reset(client)
                                hard_reset(upstream)
                                return
                            del d["buf"][:n]
                # Half-close: a side that finished sending gets its FIN passed on once its
                # data is out.
                for d in dirs:
                    if d["eof"] and not d["buf"] and not d["shut"]:
                        d["shut"] = True
                        try:
                            d["dst"].shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                if all(d["shut"] for d in dirs):
                    client.close()
                    upstream.close()
                    return
        finally:
            sel.close()
            for s in (client, upstream):
                if s.fileno() != -1:
                    hard_reset(s)

    @staticmethod
    def _flush_blocking(d: dict, timeout: float = 1.0) -> None:
        """Push what is buffered for a direction out before a reset (best effort, bounded)."""
        deadline = time.monotonic() + timeout
        while d["buf"] and time.monotonic() < deadline:
            try:
                n = d["dst"].send(d["buf"])
                del d["buf"][:n]
            except (BlockingIOError, InterruptedError):
                time.sleep(0.001)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return


__all__ = ["FaultProxy", "Faults", "hard_reset"]

# ``proxy.pass()`` cannot be spelled as a method name; ``getattr(proxy, "pass")()`` works.
setattr(FaultProxy, "pass", FaultProxy.passthrough)
