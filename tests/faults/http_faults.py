"""An HTTP-aware fault proxy in front of an AWS-compatible endpoint (the tests' moto server).

``ThrottleProxy(host, port, p=..., seed=...)`` listens on ``127.0.0.1:<free port>``; for a
fraction ``p`` of HTTP requests it answers itself with the service's throttling error instead of
forwarding the request, and forwards every other request to the target unchanged:

- DynamoDB (a request with ``X-Amz-Target: DynamoDB_...``): ``400`` with
  ``{"__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException", ...}``
  and the header ``x-amzn-ErrorType: ProvisionedThroughputExceededException``;
- anything else (S3): ``503 SlowDown`` with the S3 XML error body (no body for ``HEAD``, as a
  ``HEAD`` response never carries one: botocore then maps the bare 503 by its status).

The proxy speaks HTTP/1.1 on both sides: keep-alive connections (one upstream connection per
client connection, re-opened when the target closes it), request bodies framed by
``Content-Length`` or ``Transfer-Encoding: chunked`` (also carrying ``aws-chunked`` content),
``Expect: 100-continue`` (answered by the proxy itself, so the decision can wait for the whole
request), and responses framed by length, chunks or connection close.  A throttled request's
body is read whole before the error is sent, so the connection stays in sync.

Which requests are throttled: ``spread="random"`` (the default) draws each request from the RNG
seeded with ``seed``; ``spread="even"`` throttles exactly a fraction ``p``: the first eligible
request, then one in every 1/p.  ``ops`` (e.g. ``{"DeleteItem"}``, or S3's HTTP methods
``{"PUT"}``) limits the throttling to those operations (DynamoDB: the ``X-Amz-Target``
operation; S3: the HTTP method).

``stats()`` counts requests, throttled and forwarded ones (in total, by service and by
operation).  ``close()`` stops every thread and closes every socket; the proxy is a context
manager.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import uuid
from collections import Counter
from typing import Optional

from proxy import _Picker, hard_reset  # noqa: E402  (tests/faults is on sys.path, as tests/ is)

_TICK = 0.1
_MAX_HEAD = 64 << 10

S3_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate."
                    b"</Message></Error>")
DYNAMODB_THROTTLE_TYPE = "ProvisionedThroughputExceededException"
DYNAMODB_THROTTLE_BODY = json.dumps({
    "__type": f"com.amazonaws.dynamodb.v20120810#{DYNAMODB_THROTTLE_TYPE}",
    "message": "The level of configured provisioned throughput for the table was exceeded. "
               "Consider increasing your provisioning level with the UpdateTable API.",
}).encode()


class _Stop(Exception):
    """The proxy is closing."""


class _Reader:
    """Buffered reads from a blocking socket with a short timeout, so ``close()`` is noticed."""

    def __init__(self, sock: socket.socket, closing: threading.Event):
        self.sock = sock
        self.closing = closing
        self.buf = bytearray()
        sock.settimeout(_TICK)

    def _fill(self) -> None:
        while True:
            if self.closing.is_set():
                raise _Stop()
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                raise EOFError("peer closed the connection")
            self.buf += data
            return

    def read_until(self, delim: bytes, limit: int = _MAX_HEAD) -> bytes:
        start = 0
        while True:
            i = self.buf.find(delim, start)
            if i >= 0:
                out = bytes(self.buf[:i + len(delim)])
                del self.buf[:i + len(delim)]
                return out
            if len(self.buf) > limit:
                raise ValueError("header section too long")
            start = max(0, len(self.buf) - len(delim) + 1)
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_eof(self) -> bytes:
        try:
            while True:
                self._fill()
        except EOFError:
            pass
        out, self.buf = bytes(self.buf), bytearray()
        return out

    def has_pending(self) -> bool:
        return bool(self.buf)


def _send_all(sock: socket.socket, data: bytes, closing: threading.Event) -> None:
    view = memoryview(data)
    while view:
        if closing.is_set():
            raise _Stop()
        try:
            n = sock.send(view)
        except socket.timeout:
            continue
        view = view[n:]


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0]
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return first, headers


def _header(headers: list, name: str) -> Optional[str]:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _read_body(reader: _Reader, headers: list) -> bytes:
    """The raw body bytes (framing included) as they arrived."""
    te = (_header(headers, "transfer-encoding") or "").lower()
    if "chunked" in te:
        raw = bytearray()
        while True:
            line = reader.read_until(b"\r\n")
            raw += line
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:   # trailers, then the empty line
                    trailer = reader.read_until(b"\r\n")
                    raw += trailer
                    if trailer == b"\r\n":
                        return bytes(raw)
            raw += reader.read_exact(size + 2)
    length = _header(headers, "content-length")
    if length:
        return reader.read_exact(int(length))
    return b""


class ThrottleProxy:
    """See the module docstring."""

    def __init__(self, target_host: str, target_port: int, *, p: float = 0.0, seed: int = 0,
                 spread: str = "random", ops: Optional[set] = None,
                 listen_host: str = "127.0.0.1"):
        if spread not in ("even", "random"):
            raise ValueError(f"spread must be 'even' or 'random', got {spread!r}")
        self.target = (target_host, int(target_port))
        self._lock = threading.Lock()
        self._picker = _Picker(random.Random(seed), spread)
        self._ops = None
        self.throttle(p, ops=ops)
        self._counters: Counter = Counter()
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
                                               name=f"throttle-proxy-{self.port}")
        self._accept_thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- control --------------------------------------------------------------------------
    def throttle(self, p: float, *, ops: Optional[set] = None) -> "ThrottleProxy":
        """Throttle a fraction ``p`` of the requests (of the operations ``ops``; None: all)."""
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a fraction must be in [0, 1], got {p}")
        with self._lock:
            self._picker.set(p)
            self._ops = None if ops is None else frozenset(ops)
        return self

    def passthrough(self) -> "ThrottleProxy":
        return self.throttle(0.0)

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counters)

    def _count(self, *names: str) -> None:
        with self._lock:
            for n in names:
                self._counters[n] += 1

    def _should_throttle(self, op: str) -> bool:
        with self._lock:
            if self._ops is not None and op not in self._ops:
                return False
            return self._picker.take()

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
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
        for s in socks:
            hard_reset(s)

    def __enter__(self) -> "ThrottleProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the work -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                continue
            self._count("connections")
            t = threading.Thread(target=self._serve, args=(client,), daemon=True,
                                 name=f"throttle-proxy-{self.port}-conn")
            with self._lock:
                self._threads.add(t)
                self._socks.add(client)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        upstream: Optional[socket.socket] = None
        up_reader: Optional[_Reader] = None
        reader = _Reader(client, self._closing)
        try:
            while True:
                try:
                    head = reader.read_until(b"\r\n\r\n")
                except EOFError:
                    return
                request_line, headers = _parse_head(head)
                method = request_line.split(" ", 1)[0].upper()
                expect = (_header(headers, "expect") or "").lower() == "100-continue"
                if expect:
                    _send_all(client, b"HTTP/1.1 100 Continue\r\n\r\n", self._closing)
                    headers = [(k, v) for k, v in headers if k.lower() != "expect"]
                body = _read_body(reader, headers)
                target = _header(headers, "x-amz-target") or ""
                service = "dynamodb" if target.startswith("DynamoDB") else "s3"
                op = target.split(".", 1)[1] if "." in target else method
                self._count("requests", f"{service}.requests", f"{service}.requests.{op}")
                close_after = (_header(headers, "connection") or "").lower() == "close"
                if self._should_throttle(op):
                    self._count("throttled", f"{service}.throttled", f"{service}.throttled.{op}")
                    _send_all(client, self._throttle_response(service, method), self._closing)
                    if close_after:
                        return
                    continue
                self._count("forwarded")
                out_head = (request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
                            + "\r\n").encode("latin-1")
                response = None
                for attempt in range(2):
                    if upstream is None:
                        upstream = socket.create_connection(self.target, timeout=10)
                        with self._lock:
                            self._socks.add(upstream)
                        up_reader = _Reader(upstream, self._closing)
                    try:
                        _send_all(upstream, out_head + body, self._closing)
                        response, upstream_done = self._read_response(up_reader, method)
                        break
                    except (EOFError, ConnectionError) as exc:
                        # A kept-alive upstream connection the target had closed: open a new
                        # one and send again, once (nothing of a response had arrived).
                        self._drop_upstream(upstream)
                        upstream, up_reader = None, None
                        if attempt == 1:
                            raise exc
                assert response is not None
                _send_all(client, response, self._closing)
                if upstream_done:   # framed by the connection's end: pass that on
                    self._drop_upstream(upstream)
                    upstream = None
                    return
                if close_after:
                    return
        except (_Stop, EOFError, OSError, ValueError):
            return
        finally:
            self._drop_upstream(upstream)
            try:
                client.close()
            except OSError:
                pass
            with self._lock:
                self._socks.discard(client)
                self._threads.discard(threading.current_thread())

    def _drop_upstream(self, upstream: Optional[socket.socket]) -> None:
        if upstream is None:
            return
        try:
            upstream.close()
        except OSError:
            pass
        with self._lock:
            self._socks.discard(upstream)

    def _read_response(self, reader: _Reader, method: str) -> tuple[bytes, bool]:
        """One whole response (interim 1xx ones included) and whether the target ends the
        connection after it."""
        out = bytearray()
        while True:
            head = reader.read_until(b"\r\n\r\n")
            out += head
            status_line, headers = _parse_head(head)
            status = int(status_line.split(" ", 2)[1])
            if 100 <= status < 200:
                continue
            conn = (_header(headers, "connection") or "").lower()
            closes = conn == "close" or status_line.startswith("HTTP/1.0") and conn != "keep-alive"
            if method == "HEAD" or status in (204, 304):
                return bytes(out), closes
            te = (_header(headers, "transfer-encoding") or "").lower()
            if "chunked" in te or _header(headers, "content-length") is not None:
                out += _read_body(reader, headers)
                return bytes(out), closes
            out += reader.read_to_eof()
            return bytes(out), True

    @staticmethod
    def _throttle_response(service: str, method: str) -> bytes:
        request_id = uuid.uuid4().hex.upper()[:16]
        if service == "dynamodb":
            body = DYNAMODB_THROTTLE_BODY
            head = ("HTTP/1.1 400 Bad Request\r\n"
                    "Content-Type: application/x-amz-json-1.0\r\n"
                    f"x-amzn-ErrorType: {DYNAMODB_THROTTLE_TYPE}\r\n"
                    f"x-amzn-RequestId: {request_id}\r\n")
        else:
            body = S3_SLOWDOWN_BODY
            head = ("HTTP/1.1 503 Slow Down\r\n"
                    "Content-Type: application/xml\r\n"
                    f"x-amz-request-id: {request_id}\r\n")
        head += f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        return head.encode() + (b"" if method == "HEAD" else body)


__all__ = ["ThrottleProxy", "S3_SLOWDOWN_BODY", "DYNAMODB_THROTTLE_BODY"]
