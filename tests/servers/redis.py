"""A real ``redis-server`` on a free loopback port, one per test session; every test gets its
own key prefix.  When the binary is missing it is installed through apt (CI); if that is not
possible the session fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from . import Backend, free_port

NAME = "redis"


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=True, env=env,
                       capture_output=True)
        found = shutil.which("redis-server")
        if found:
            return found
    raise RuntimeError("redis-server is not installed and could not be installed with apt-get "
                       "(install the redis-server package); the Redis tests do not skip")


@dataclass
class RedisServer:
    """One redis-server process on 127.0.0.1; ``stop`` ends it by its PID."""

    port: int
    proc: subprocess.Popen
    args: tuple
    workdir: str
    tls: Optional[tuple] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, **query) -> str:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0" + (f"?{q}" if q else "")

    def client(self, **kw):
        import redis
        if self.tls:
            kw.update(ssl=True, ssl_ca_certs=self.tls[0])
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def restart(self) -> None:
        """Stop and start again on the same port (with an empty dataset: no persistence)."""
        self.stop()
        self.proc = launch(self.workdir, *self.args, port=self.port, tls=self.tls).proc


def _ping(port: int, tls: Optional[tuple]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
        if tls:
            ctx = ssl.create_default_context(cafile=tls[0])
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"PING\r\n")
                return s.recv(64)
        raw.sendall(b"PING\r\n")
        return raw.recv(64)


def launch(workdir, *extra: str, port: Optional[int] = None, password: Optional[str] = None,
           tls: Optional[tuple] = None, timeout: float = 15.0) -> RedisServer:
    """Start redis-server with ``extra`` arguments and wait until it answers PING.
    ``tls=(certfile, keyfile)`` serves TLS only (the certificate is also the CA)."""
    binary = redis_server_binary()
    port = port or free_port()
    args = tuple(extra) + (("--requirepass", password) if password else ())
    listen = ["--port", str(port)]
    if tls:
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", tls[0],
                  "--tls-key-file", tls[1], "--tls-ca-cert-file", tls[0], "--tls-auth-clients", "no"]
    cmd = [binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--protected-mode", "no", "--dir", str(workdir), "--logfile", "", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {err}")
        try:
            if _ping(port, tls).startswith((b"+PONG", b"-NOAUTH")):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server on port {port} did not answer within {timeout}s")
        time.sleep(0.05)
    return RedisServer(port, proc, args, str(workdir), tls)


def launch_cluster(workdir, timeout: float = 15.0) -> RedisServer:
    """A one-node Redis Cluster owning all 16384 slots: the server enforces cluster rules
    (CROSSSLOT, MOVED) exactly as a bigger cluster would for keys on one node."""
    port = free_port()
    # The cluster bus defaults to port + 10000, past 65535 for high ephemeral ports: pick it.
    server = launch(workdir, "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                    "--cluster-config-file", os.path.join(str(workdir), f"nodes-{port}.conf"),
                    port=port)
    client = server.client()
    client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    deadline = time.monotonic() + timeout
    while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("the one-node cluster did not reach cluster_state:ok")
        time.sleep(0.05)
    client.close()
    return server


def make_tls_cert(directory) -> tuple:
    """A self-signed certificate for 127.0.0.1 (openssl CLI); returns (certfile, keyfile)."""
    cert, key = os.path.join(str(directory), "cert.pem"), os.path.join(str(directory), "key.pem")
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS test needs the openssl command line tool")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def start(tmp_path_factory) -> Backend:
    server = launch(tmp_path_factory.mktemp("redis"))
    return Backend(NAME, lambda: server.url(prefix=f"t-{uuid.uuid4().hex[:12]}:"),
                   stop=server.stop, traits={"processes": True, "server": server})
