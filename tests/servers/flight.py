"""The shuffle service (``cylon-store serve``) as a real server process on a free loopback port,
one per test session, with a bearer token; every test gets its own key prefix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Optional

from . import Backend

NAME = "flight"
TOKEN = "test-token-" + uuid.uuid4().hex


@dataclass
class FlightService:
    """One ``python -m cylon_store.service`` process; ``stop`` ends it by its PID."""

    proc: subprocess.Popen
    url: str                 # flight://127.0.0.1:PORT (no token)
    token: Optional[str]
    stderr_lines: list

    @property
    def pid(self) -> int:
        return self.proc.pid

    def store_url(self, **query) -> str:
        q = dict(query)
        if self.token:
            q.setdefault("token", self.token)
        return self.url + ("?" + "&".join(f"{k}={v}" for k, v in q.items()) if q else "")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def launch(*args: str, token: Optional[str] = TOKEN, timeout: float = 30.0,
           env: Optional[dict] = None) -> FlightService:
    """Start the service with extra ``serve`` arguments; return once it printed its URL."""
    cmd = [sys.executable, "-m", "cylon_store.service", "--port", "0", *args]
    run_env = dict(os.environ if env is None else env)
    run_env.pop("CYLON_STORE_TOKEN", None)
    if token:
        run_env["CYLON_STORE_TOKEN"] = token   # not on the command line: ps shows that
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env)
    lines: list = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    found: list = []

    def read_first():
        assert proc.stdout is not None
        found.append(proc.stdout.readline())
    reader = threading.Thread(target=read_first, daemon=True)
    reader.start()
    reader.join(timeout)
    line = found[0].strip() if found else ""
    if not line.startswith("serving "):
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"the shuffle service did not start within {timeout}s: {line!r} "
                           f"{''.join(lines)[-2000:]}")
    return FlightService(proc, line.split(" ", 1)[1], token, lines)


def start(tmp_path_factory) -> Backend:
    service = launch("--memory-limit", "1GiB",
                     "--spill-dir", str(tmp_path_factory.mktemp("flight-spill")))
    return Backend(NAME, lambda: service.store_url(prefix=f"t-{uuid.uuid4().hex[:12]}/"),
                   stop=service.stop, traits={"processes": True, "server": service})
