"""The fault tooling itself: the TCP proxy forwards, resets, drops, stalls and counts as it
says and leaves no thread behind; the HTTP proxy keeps keep-alive connections in sync over
Content-Length, chunked and 100-continue bodies, and botocore reads its throttling answers as
S3's SlowDown and DynamoDB's ProvisionedThroughputExceededException; the harness's digest
check catches a lost or a duplicated row."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time

import numpy as np
import pytest

import harness
from http_faults import ThrottleProxy
from proxy import FaultProxy


@pytest.fixture
def echo_server():
    """A TCP server that echoes every byte back, until its client closes."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    stop = threading.Event()
    threads = []

    def serve(conn):
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
                except OSError:   # reset by the proxy
                    return

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            t.start()
            threads.append(t)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield srv.getsockname()[1]
    stop.set()
    acceptor.join(5)
    srv.close()


def _roundtrip(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        got = bytearray()
        def send():
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:   # reset by the proxy: the reader sees it
                pass
        sender = threading.Thread(target=send)
        sender.start()
        while True:
            data = s.recv(65536)
            if not data:
                break
            got += data
        sender.join()
        return bytes(got)


def _proxy_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith(("fault-proxy", "throttle-proxy"))]


def test_tcp_proxy_forwards_and_counts(echo_server):
    payload = bytes(range(256)) * 8192   # 2 MiB
    with FaultProxy("127.0.0.1", echo_server) as proxy:
        assert _roundtrip(proxy.port, payload) == payload
        getattr(proxy, "pass")()
        assert _roundtrip(proxy.port, b"again") == b"again"
        stats = proxy.stats()
    assert stats["connections"] == 2
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload) + 5
    assert (stats["resets"], stats["drops"], stats["stalls"]) == (0, 0, 0)
    time.sleep(0.2)
    assert not _proxy_threads()


def test_tcp_proxy_resets_mid_transfer(echo_server):
    with FaultProxy("127.0.0.1", echo_server) as proxy:
        proxy.reset_after(100_000, 1.0)
        with pytest.raises(ConnectionResetError):
            _roundtrip(proxy.port, b"z" * 1_000_000)
        stats = proxy.stats()
    assert stats["resets"] == 1
    assert 0 < stats["bytes_up"] + stats["bytes_down"] <= 100_000


def test_tcp_proxy_drops_and_spreads_evenly(echo_server):
    with FaultProxy("127.0.0.1", echo_server, seed=7) as proxy:
        proxy.drop(0.25)
        outcomes = []
        for _ in range(8):
            try:
                outcomes.append(_roundtrip(proxy.port, b"ping") == b"ping")
            except (ConnectionResetError, BrokenPipeError):
                outcomes.append(False)
        stats = proxy.stats()
    assert stats["drops"] == 2 and outcomes[0] is False and outcomes.count(False) == 2


def test_tcp_proxy_stalls_then_delivers(echo_server):
    with FaultProxy("127.0.0.1", echo_server) as proxy:
        proxy.stall(0.5, 1.0)
        t0 = time.monotonic()
        assert _roundtrip(proxy.port, b"slow") == b"slow"
        assert time.monotonic() - t0 >= 0.45
        assert proxy.stats()["stalls"] == 1


def test_tcp_proxy_close_ends_open_connections(echo_server):
    proxy = FaultProxy("127.0.0.1", echo_server)
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(b"hold")
    assert s.recv(4) == b"hold"
    proxy.close()
    with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
        if s.recv(1) == b"":
            raise ConnectionAbortedError("closed")
    s.close()
    time.sleep(0.2)
    assert not _proxy_threads()


# -- the HTTP proxy ----------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_PUT(self):
        body = self._body()
        reply = b"got %d" % len(body)
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_POST = do_PUT

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "123")
        self.end_headers()


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_http_proxy_keeps_connections_in_sync(http_server):
    with ThrottleProxy("127.0.0.1", http_server, p=0.5, seed=3, spread="even") as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        seen = []
        for i in range(6):   # one keep-alive connection: throttled and forwarded alternate
            body = b"b" * (1000 * i)
            kind = i % 3
            if kind == 0:
                conn.request("PUT", "/k", body=body)
            elif kind == 1:   # chunked request body
                conn.request("PUT", "/k", body=iter([body[:10], body[10:]]),
                             encode_chunked=True)
            else:
                conn.request("POST", "/", body=body, headers={
                    "X-Amz-Target": "DynamoDB_20120810.PutItem", "Expect": "100-continue"})
            resp = conn.getresponse()
            data = resp.read()
            seen.append(resp.status)
            if resp.status == 200:
                assert data == b"got %d" % len(body)
            elif kind == 2:
                assert resp.status == 400
                assert resp.getheader("x-amzn-ErrorType") == "ProvisionedThroughputExceededException"
                assert b"#ProvisionedThroughputExceededException" in data
            else:
                assert resp.status == 503 and b"<Code>SlowDown</Code>" in data
        conn.request("HEAD", "/k")
        resp = conn.getresponse()
        assert resp.read() == b""
        conn.close()
        stats = proxy.stats()
    assert stats["requests"] == 7 and stats["throttled"] + stats["forwarded"] == 7
    assert seen.count(200) == 3


def test_botocore_reads_the_throttling_answers(moto_endpoint):
    import moto_server
    host, port = moto_endpoint.split("://")[1].split(":")
    import boto3
    from botocore.config import Config
    with ThrottleProxy(host, int(port), p=1.0) as proxy:
        kw = dict(endpoint_url=proxy.endpoint, region_name=moto_server.REGION,
                  config=Config(retries={"total_max_attempts": 1}))
        s3 = boto3.session.Session().client("s3", **kw)
        ddb = boto3.session.Session().client("dynamodb", **kw)
        for call, code in ((lambda: s3.put_object(Bucket="b", Key="k", Body=b"v"), "SlowDown"),
                           (lambda: s3.head_object(Bucket="b", Key="k"), "503"),
                           (lambda: ddb.list_tables(), "ProvisionedThroughputExceededException")):
            with pytest.raises(Exception) as info:
                call()
            assert info.value.response["Error"]["Code"] == code
        proxy.passthrough()
        assert "TableNames" in ddb.list_tables()
        s3.close()
        ddb.close()


# -- the harness ---------------------------------------------------------------------------------

def test_harness_accepts_a_correct_exchange():
    res = harness.run_exchange("memory://", backend="memory", fault="none", rows=500)
    assert (res.outcome, res.rows_lost, res.rows_duplicated, res.digests_ok) == (
        "completed", 0, 0, True)
    harness.check_outcome(res)


@pytest.mark.parametrize("damage", ["lose", "duplicate"])
def test_harness_catches_a_damaged_exchange(damage, monkeypatch):
    original = harness._rank

    def damaged(comm, *args):
        out = original(comm, *args)
        if comm.rank == 2:
            ids = out["ids"]
            out["ids"] = ids[1:] if damage == "lose" else np.append(ids, ids[-1])
            out["digest"] = "0" * 64
        return out

    monkeypatch.setattr(harness, "_rank", damaged)
    res = harness.run_exchange("memory://", backend="memory", fault="none", rows=500)
    assert (res.rows_lost, res.rows_duplicated) == ((1, 0) if damage == "lose" else (0, 1))
    assert res.digests_ok is False
    with pytest.raises(AssertionError, match="lost|duplicated"):
        harness.check_outcome(res)
