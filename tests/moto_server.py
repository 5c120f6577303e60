"""One moto server (S3 and DynamoDB over HTTP) shared by the ``s3`` and ``dynamodb`` test
backends: started on first use on a free 127.0.0.1 port, stopped when the last user releases it.

Tests talk to it with real boto3 clients through ``endpoint_url`` (not moto's in-process mock
decorators), so the adapters' HTTP paths, error parsing and retries are what runs.  The server
(moto's ``ThreadedMotoServer``) runs in a child process of the tests: the memory checks of the
conformance suite trace this process's heap, which must not include the server's copy of every
object, and the server does not compete for this process's GIL.  The child exits when its stdin
closes, so it never outlives the test session.  Rank processes started by the tests inherit the
dummy credentials set here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

_lock = threading.Lock()
_proc = None
_endpoint = None
_users = 0

#: Dummy credentials: moto accepts any, and real ones must never reach a test server.
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
REGION = "us-east-1"


def acquire() -> str:
    """Start the server if needed; return its endpoint URL (``http://127.0.0.1:PORT``)."""
    global _proc, _endpoint, _users
    with _lock:
        if _proc is None:
            os.environ.update(DUMMY_ENV)
            os.environ.pop("AWS_PROFILE", None)
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = proc.stdout.readline().strip()
            if not line.startswith("http://"):
                proc.kill()
                raise RuntimeError(f"moto server did not start (said {line!r})")
            _proc, _endpoint = proc, line
        _users += 1
        return _endpoint


def release() -> None:
    global _proc, _endpoint, _users
    with _lock:
        _users -= 1
        if _users <= 0 and _proc is not None:
            proc, _proc, _endpoint, _users = _proc, None, None, 0
            proc.stdin.close()  # the child stops its server and exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def client(service: str):
    """A plain boto3 client of the running server (for fixtures and assertions)."""
    import boto3
    if _endpoint is None:
        raise RuntimeError("moto server not started; call acquire() first")
    return boto3.session.Session().client(service, endpoint_url=_endpoint, region_name=REGION)


def _serve() -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        server.stop()


if __name__ == "__main__":
    _serve()
