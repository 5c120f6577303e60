"""A local AWS Lambda service: the Invoke API on loopback, each invocation in the real runtime loop.

``LocalLambda`` hosts one function. It speaks the Invoke API of the Lambda control plane over HTTP
(boto3's ``lambda`` client works against it unchanged through ``endpoint_url`` or
``AWS_ENDPOINT_URL_LAMBDA``), and runs each invocation in an *execution environment*: a process
``python -m awslambdaric HANDLER`` (the AWS Lambda runtime interface client, the same bootstrap
loop a Lambda container image runs) talking to a Runtime API that this module implements, one
HTTP server per environment on its own loopback port (``AWS_LAMBDA_RUNTIME_API`` is
``host:port``, with no room for a path that could tell environments apart). No Docker, no AWS.

What it guarantees, as Lambda does:

================================  ==========================================================
Lambda behaviour                  here
================================  ==========================================================
Invoke: RequestResponse, Event,   200 with the function's response, or 200 with
DryRun                            ``X-Amz-Function-Error: Unhandled`` and the error JSON; 202
                                  at once for Event (run later); 204 for DryRun.
API errors                        404 ResourceNotFoundException, 429 TooManyRequestsException
                                  (Reason ReservedFunctionConcurrentInvocationLimitExceeded),
                                  413 RequestTooLargeException (6 MB sync, 1 MB Event), 400
                                  InvalidRequestContentException (payload is not JSON), with
                                  ``x-amzn-ErrorType`` so botocore raises the modelled class.
function timeout                  the environment is SIGKILLed at start + Timeout: "Task timed
                                  out after 3.00 seconds", errorType ``Sandbox.Timedout``.
memory limit                      the environment's RSS (its whole session) sampled every
                                  25 ms; above MemorySize it is SIGKILLed: "Runtime exited
                                  with error: signal: killed", ``Runtime.ExitError``.
crash, init failure               exit status / signal reported as Lambda words it; an init
                                  error (import failure...) is the runtime's own error JSON.
concurrency                       at most ``concurrency`` environments, each running one
                                  invocation; a sync invoke past it gets 429.
cold / warm start                 a new environment (Init Duration) or an idle one reused;
                                  environments idle past ``idle_ttl`` are stopped; a killed,
                                  timed-out or crashed environment is discarded.
async queue and retries           Event invocations queue FIFO for a free environment; a failed
                                  attempt (error, timeout, crash) is retried up to
                                  ``max_retry_attempts`` times after ``retry_delays``.
at-least-once delivery            fault knob ``duplicate_rate``: an Event delivered twice.
throttling                        fault knob ``throttle_invokes``: the next N Invoke calls 429.
environment variables, /tmp       as Lambda sets them; ``TMPDIR`` a private per-environment
                                  directory, removed with the environment.
logs                              START / END / REPORT lines, the environment's output prefixed
                                  with its id, ``LogType=Tail`` (last 4 KB, base64).
================================  ==========================================================

Not reproduced: isolation (environments are ordinary processes of this user: they share the
file system, network and /tmp besides their TMPDIR), CPU scaled with memory, the freeze of an
idle environment (its threads keep running), memory enforced by a cgroup (sampled instead: an
allocation made and freed between two samples goes unseen), Init billed on cold starts (Lambda
bills it since August 2025; ``billed_ms`` is the invoke phase only, ``init_ms`` is separate),
versions and aliases (only ``$LATEST``), response streaming, extensions, SnapStart, the 6-hour
maximum event age. ``Max Memory Used`` is this invocation's peak, not the sandbox's lifetime one.

The Invoke API binds only ``host`` (default 127.0.0.1); the Runtime API servers always bind
127.0.0.1. ``awslambdaric`` is imported by the environments, never here: ``--help`` and this
module work without it; ``start()`` names the extra when it is missing.
"""

from __future__ import annotations

import argparse
import base64
import collections
import heapq
import itertools
import json
import math
import os
import random
import re
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from ..argtypes import int_range, seconds

__all__ = ["LocalLambda", "add_arguments", "main"]

API_VERSION = "2015-03-31"
RUNTIME_PREFIX = "/2018-06-01/runtime/"
ACCOUNT = "000000000000"
SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024       # Invoke request and response, RequestResponse
ASYNC_PAYLOAD_LIMIT = 1024 * 1024          # Event (1 MB; 256 KB before 2025)
RESPONSE_LIMIT = 6291556                   # the figure Lambda's ResponseSizeTooLarge names
INIT_LIMIT_S = 10.0                        # Lambda's Init phase limit (on-demand)
LOG_TAIL_BYTES = 4096
SAMPLE_INTERVAL_S = 0.025                  # RSS / deadline / exit checks while invoking
MEMORY_BOUNDS = (128, 10240)
TIMEOUT_BOUNDS = (1, 900)
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Go's names for signals, which Lambda's "Runtime exited with error: signal: ..." uses.
_SIGNAL_WORDS = {1: "hangup", 2: "interrupt", 3: "quit", 4: "illegal instruction",
                 5: "trace/breakpoint trap", 6: "aborted", 7: "bus error",
                 8: "floating point exception", 9: "killed", 10: "user defined signal 1",
                 11: "segmentation fault", 12: "user defined signal 2", 13: "broken pipe",
                 14: "alarm clock", 15: "terminated"}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# -- records ---------------------------------------------------------------------------------

@dataclass
class _Delivery:
    """One attempt to run one event: what the Runtime API hands to an environment."""
    request_id: str
    payload: bytes
    invocation_type: str                   # "RequestResponse" or "Event"
    invoked_arn: str
    attempt: int = 0
    duplicate: bool = False
    client_context: Optional[str] = None
    tail: bool = False
    ready_at: float = 0.0                  # monotonic: accepted, or its retry came due


@dataclass
class _Result:
    status: str
    body: bytes
    record: dict
    content_type: str = "application/json"
    log_tail: Optional[str] = None


def _error_body(error_type: str, message: str) -> bytes:
    return json.dumps({"errorType": error_type, "errorMessage": message}).encode()


def _exit_words(info) -> str:
    """Lambda's (Go's) wording of how a process ended, from ``os.waitid``'s result."""
    if info.si_code == os.CLD_EXITED:
        return f"exit status {info.si_status}"
    return "signal: " + _SIGNAL_WORDS.get(info.si_status, f"signal {info.si_status}")


# -- /proc sampling ----------------------------------------------------------------------------

def _proc_stat(pid: int):
    """(session id, resident pages) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[3]), int(fields[21])
    except (IndexError, ValueError):
        return None


def _session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (an environment and whatever it started)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st and st[0] == sid:
                out.append(int(name))
    return out


class _Sampler(threading.Thread):
    """One thread for every running invocation: RSS of each environment's session, deadlines,
    exits. An environment is a session of its own (``start_new_session``), so its memory is
    that of every process whose session id is its pid — children included, and grandchildren
    orphaned to init too. /proc is listed once a tick and only new pids are read for their
    session; members are re-read each tick (their ``stat`` gives session and RSS at once)."""

    def __init__(self, service: "LocalLambda"):
        super().__init__(name="lambda-local-sampler", daemon=True)
        self.service = service
        self.watched: set = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.known: dict[int, int] = {}       # pid -> session id (-1: unreadable)

    def watch(self, env) -> None:
        with self.lock:
            self.watched.add(env)
        self.wake.set()

    def unwatch(self, env) -> None:
        with self.lock:
            self.watched.discard(env)

    def run(self) -> None:
        stopped = self.service._stopped
        while not stopped.is_set():
            with self.lock:
                watched = list(self.watched)
            if not watched:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                self._tick(watched)
            except Exception as exc:  # never let a /proc race end the sampling
                self.service._log(f"[sampler] {exc!r}")
            stopped.wait(SAMPLE_INTERVAL_S)

    def _tick(self, watched) -> None:
        pids = {int(n) for n in os.listdir("/proc") if n.isdigit()}
        known = self.known
        for pid in pids - known.keys():
            st = _proc_stat(pid)
            known[pid] = st[0] if st else -1
        for pid in known.keys() - pids:
            del known[pid]
        sids = {env.pid for env in watched}
        members = collections.defaultdict(list)
        for pid, sid in known.items():
            if sid in sids:
                members[sid].append(pid)
        now = time.monotonic()
        for env in watched:
            rss = 0
            for pid in members.get(env.pid) or (env.pid,):
                st = _proc_stat(pid)
                if st and st[0] == env.pid:
                    rss += st[1]
            env.observe(rss * _PAGE, now)


# -- HTTP plumbing ----------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    """A threading HTTP server whose accept loop is the service's one ``_Acceptor`` (no
    ``serve_forever`` per server, so no poll interval per environment and an instant close)."""
    daemon_threads = True
    timeout = 0          # handle_request() accepts what is ready, never waits
    allow_reuse_address = False

    def __init__(self, address, handler, owner):
        self.owner = owner
        self.connections: set = set()
        self.conn_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # A peer gone mid-request (an environment killed, a client that gave up) is routine;
        # anything else goes to the service log, not socketserver's stderr dump.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        service = getattr(self.owner, "service", self.owner)
        service._log(f"[http] error serving {client_address}: {exc!r}")

    def close_all(self) -> None:
        """Close the listening socket and every open (keep-alive) connection."""
        self.server_close()
        with self.conn_lock:
            conns = list(self.connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Acceptor(threading.Thread):
    """Accepts connections for every server of a service from one selector."""

    def __init__(self):
        super().__init__(name="lambda-local-acceptor", daemon=True)
        self.selector = selectors.DefaultSelector()
        self.rwake, self.wwake = socket.socketpair()
        self.rwake.setblocking(False)
        self.selector.register(self.rwake, selectors.EVENT_READ, None)
        self.ops: list = []
        self.lock = threading.Lock()
        self.stopping = False

    def _post(self, op) -> None:
        with self.lock:
            self.ops.append(op)
        try:
            self.wwake.send(b"x")
        except OSError:
            pass

    def add(self, server: _Server) -> None:
        self._post(("add", server))

    def remove(self, server: _Server) -> None:
        """Stop accepting for ``server`` and close it and its connections (asynchronously)."""
        if self.stopping or not self.is_alive():
            server.close_all()      # nobody left to do it; closing twice is harmless
            return
        self._post(("remove", server))

    def stop(self) -> None:
        self.stopping = True
        self._post(("stop", None))
        self.join(5.0)

    def run(self) -> None:
        try:
            while True:
                with self.lock:
                    ops, self.ops = self.ops, []
                for kind, server in ops:
                    if kind == "add":
                        self.selector.register(server.socket, selectors.EVENT_READ, server)
                    elif kind == "remove":
                        try:
                            self.selector.unregister(server.socket)
                        except (KeyError, ValueError):
                            pass
                        server.close_all()
                if self.stopping:
                    return
                for key, _ in self.selector.select(1.0):
                    if key.data is None:
                        try:
                            while self.rwake.recv(4096):
                                pass
                        except OSError:
                            pass
                        continue
                    try:
                        key.data.handle_request()
                    except (OSError, ValueError):
                        pass
        finally:
            for key in list(self.selector.get_map().values()):
                if key.data is not None:
                    key.data.close_all()
            self.selector.close()
            self.rwake.close()
            self.wwake.close()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: botocore's and the runtime client's connections stay open (keep-alive), and
    # curl (inside awslambdaric) gets its 100-continue at once instead of waiting a second.
    protocol_version = "HTTP/1.1"
    server_version = "cylon-store-lambda"
    sys_version = ""

    def setup(self):
        super().setup()
        # Headers and body leave in two writes; without TCP_NODELAY the second waits for the
        # peer's delayed ACK (~40 ms on every warm invocation).
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format, *args):  # the access log is noise; the service logs itself
        pass

    def _body(self, limit: Optional[int] = None) -> Optional[bytes]:
        """The request body, or None when it is over ``limit`` (then drained, not kept)."""
        n = int(self.headers.get("Content-Length") or 0)
        if limit is not None and n > limit:
            left = n
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            return None
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
              content_type: str = "application/json") -> None:
        try:
            self.send_response(status)
            if body or status not in (202, 204):
                self.send_header("Content-Type", content_type)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:   # say so: a client would reuse the pooled connection
                self.send_header("Connection", "close")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


# -- the Runtime API of one environment -----------------------------------------------------------

class _RuntimeHandler(_Handler):
    def do_GET(self):
        env = self.server.owner
        if self.path.split("?")[0] == RUNTIME_PREFIX + "invocation/next":
            delivery = env.next_invocation()
            if delivery is None:  # the environment is going away
                self.close_connection = True
                self._send(410, _error_body("EnvironmentClosed", "environment stopped"))
                return
            d, deadline_ms = delivery
            headers = {"Lambda-Runtime-Aws-Request-Id": d.request_id,
                       "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                       "Lambda-Runtime-Invoked-Function-Arn": d.invoked_arn,
                       "Lambda-Runtime-Trace-Id": _trace_id()}
            if d.client_context:
                headers["Lambda-Runtime-Client-Context"] = d.client_context
            self._send(200, d.payload, headers)
            return
        self._send(404, _error_body("NotFound", f"no route {self.path}"))

    def do_POST(self):
        env = self.server.owner
        path = self.path.split("?")[0]
        if not path.startswith(RUNTIME_PREFIX):
            self._body()
            self._send(404, _error_body("NotFound", f"no route {self.path}"))
            return
        rest = path[len(RUNTIME_PREFIX):].split("/")
        body = self._body()
        if rest == ["init", "error"]:
            env.post_init_error(body)
            self._send(202, b'{"status":"OK"}')
            return
        if len(rest) == 3 and rest[0] == "invocation" and rest[2] in ("response", "error"):
            ok = env.post_result(rest[1], rest[2], body, self.headers.get("Content-Type"))
            if ok:
                self._send(202, b'{"status":"OK"}')
            else:
                self._send(400, _error_body("InvalidRequestID", "Invalid request ID"))
            return
        self._send(404, _error_body("NotFound", f"no route {self.path}"))


def _trace_id() -> str:
    return (f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};"
            f"Parent={uuid.uuid4().hex[:16]};Sampled=0")


class _Environment:
    """One execution environment: an ``awslambdaric`` process in a session of its own, its
    Runtime API server, its TMPDIR. Runs one invocation at a time (``run``)."""

    def __init__(self, service: "LocalLambda", env_id: str):
        self.service = service
        self.id = env_id
        self.cond = threading.Condition()
        self.server = _Server(("127.0.0.1", 0), _RuntimeHandler, self)
        self.port = self.server.server_address[1]
        self.tmpdir = tempfile.mkdtemp(prefix=f"cylon-lambda-{env_id}-")
        self.popen: Optional[subprocess.Popen[bytes]] = None
        self.pid = -1
        self.created = 0.0
        self.first_next: Optional[float] = None
        self.pending: Optional[_Delivery] = None
        self.current: Optional[_Delivery] = None
        self.handed: Optional[float] = None
        self.deadline: Optional[float] = None
        self.init_deadline = 0.0              # until the runtime takes the event (cold: init)
        self.init_limit_s = 0.0
        #: (kind, body, content_type, monotonic)
        self.outcome: Optional[tuple[str, bytes, str, float]] = None
        self.init_error: Optional[bytes] = None
        self.fate: Optional[tuple[str, Any]] = None  # ("timeout"|"oom"|"exit", detail)
        self.peak = 0
        self.monitoring = False
        self.closed = False
        self.capture: Optional[list] = None   # output lines of the current invocation
        self.read_lock = threading.Lock()
        self.partial = b""
        self.output_closed = False
        self.last_used = 0.0
        self.served = 0

    # process ---------------------------------------------------------------------------

    def start(self, environ: dict) -> None:
        svc = self.service
        environ = dict(environ)
        environ.update({"AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{self.port}",
                        "AWS_LAMBDA_LOG_STREAM_NAME":
                            f"{datetime.now(timezone.utc):%Y/%m/%d}/[$LATEST]{uuid.uuid4().hex}",
                        "TMPDIR": self.tmpdir})
        self.created = time.monotonic()
        self.popen = subprocess.Popen([sys.executable, "-m", "awslambdaric", svc.handler],
                                      env=environ, cwd=svc._task_root, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.pid = self.popen.pid
        threading.Thread(target=self._read_output, name=f"lambda-local-{self.id}-log",
                         daemon=True).start()

    def _stdout(self) -> IO[bytes]:
        """The process's merged stdout and stderr pipe (opened by ``start``)."""
        assert self.popen is not None and self.popen.stdout is not None
        return self.popen.stdout

    def _read_output(self) -> None:
        """The environment's stdout and stderr (merged, as in CloudWatch) into the service log,
        each line prefixed with the environment and the request it ran for. The pipe is read
        under ``read_lock`` by this thread and by ``drain_output``, so that an invocation's
        output is all in before its end is reported (the runtime writes it before it posts the
        response)."""
        fd = self._stdout().fileno()
        os.set_blocking(fd, False)
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            poller.poll(1000)
            with self.read_lock:
                if not self._pump():
                    return

    def drain_output(self) -> None:
        with self.read_lock:
            self._pump()

    def _pump(self) -> bool:
        """Read what the pipe holds now and log its complete lines; False at end of file."""
        if self.output_closed:
            return False
        fd = self._stdout().fileno()
        data, eof = [], False
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            data.append(chunk)
        buf = self.partial + b"".join(data)
        lines = buf.split(b"\n")
        self.partial = lines.pop()
        if eof and self.partial:
            lines.append(self.partial)
            self.partial = b""
        if lines:
            with self.cond:
                rid = self.current.request_id if self.current else "-"
                capture = self.capture
            # awslambdaric joins the lines of an error report with "\r" (one log event); on a
            # terminal that would overwrite the line, so split it.
            text = "\n".join(raw.decode("utf-8", "replace").rstrip("\r").replace("\r", "\n    ")
                             for raw in lines)
            if capture is not None:
                capture.append(text)
            self.service._log(text, f"[{self.id} {rid}] ")
        if eof:
            self.output_closed = True
            try:
                self._stdout().close()
            except OSError:
                pass
        return not eof

    def exit_info(self) -> Optional[os.waitid_result]:
        """How the process ended (without reaping it: its pid stays ours to signal), or None."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        return info if info is not None and info.si_pid else None

    def kill(self) -> None:
        """SIGKILL the environment's process group and every other process of its session."""
        if self.pid <= 0:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in _session_pids(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def destroy(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.kill()
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        acceptor = self.service._acceptor
        assert acceptor is not None  # environments exist only in a started service
        acceptor.remove(self.server)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # Runtime API side ------------------------------------------------------------------------

    def next_invocation(self):
        with self.cond:
            if self.first_next is None:
                self.first_next = time.monotonic()
                self.cond.notify_all()
            while self.pending is None and not self.closed:
                self.cond.wait(5.0)     # closing notifies; the bound is a backstop
            if self.closed:
                return None
            d, self.pending = self.pending, None
            self.current = d
            self.handed = time.monotonic()
            self.deadline = self.handed + self.service.timeout_s
            self.cond.notify_all()
        return d, int(time.time() * 1000 + self.service.timeout_s * 1000)

    def post_result(self, request_id: str, kind: str, body: bytes, content_type) -> bool:
        with self.cond:
            if (self.current is None or self.current.request_id != request_id
                    or self.outcome is not None or self.fate is not None):
                return False
            self.outcome = (kind, body, content_type or "application/json", time.monotonic())
            self.cond.notify_all()
        return True

    def post_init_error(self, body: bytes) -> None:
        with self.cond:
            self.init_error = body or _error_body("Runtime.Unknown", "init failed")
            self.cond.notify_all()

    # supervision -------------------------------------------------------------------------------

    def observe(self, rss: int, now: float) -> None:
        """Called by the sampler each tick while an invocation (or its init) runs."""
        with self.cond:
            if not self.monitoring or self.outcome is not None or self.fate is not None:
                return
            self.peak = max(self.peak, rss)
            info = self.exit_info()
            if info is not None:
                self.fate = ("exit", info)
            elif rss > self.service.memory_mb * 1024 * 1024:
                self.fate = ("oom", None)
            elif self.handed is not None and self.deadline is not None and now > self.deadline:
                self.fate = ("timeout", self.service.timeout_s)
            elif self.handed is None and now > self.init_deadline:
                self.fate = ("timeout", self.init_limit_s)
            else:
                return
            kill = self.fate[0] != "exit"
            self.cond.notify_all()
        if kill:
            self.kill()

    def run(self, d: _Delivery) -> tuple:
        """Hand ``d`` to the runtime and wait for its end. Returns (status, body, content_type,
        error_type, error_message, duration_ms, healthy)."""
        svc = self.service
        with self.cond:
            self.pending = d
            self.outcome = None
            self.fate = None
            self.handed = None
            self.deadline = None
            self.peak = 0
            self.capture = [] if d.tail else None
            # Until the runtime takes the event: a cold environment's init (Lambda allows 10 s,
            # then retries init within the function timeout: the larger of the two here); a
            # warm one is already polling /next, and its age must not count.
            self.init_limit_s = max(INIT_LIMIT_S, svc.timeout_s)
            start = self.created if self.first_next is None else time.monotonic()
            self.init_deadline = start + self.init_limit_s
            self.monitoring = True
            self.cond.notify_all()
        sampler = svc._sampler
        assert sampler is not None  # environments exist only in a started service
        sampler.watch(self)
        try:
            with self.cond:
                while True:
                    if (self.outcome is not None or self.fate is not None or self.closed
                            or (self.init_error is not None and self.handed is None)):
                        break
                    # Bounded: the sampler decides timeouts; this is a backstop if it stalls.
                    limit = self.deadline if self.handed is not None else self.init_deadline
                    if time.monotonic() > limit + 5.0:
                        self.fate = ("timeout", svc.timeout_s if self.handed else
                                     self.init_limit_s)
                        break
                    self.cond.wait(0.5)
                self.monitoring = False
                outcome, fate, init_error = self.outcome, self.fate, self.init_error
                handed = self.handed
                end = outcome[3] if outcome else time.monotonic()
        finally:
            sampler.unwatch(self)
        if fate is not None and fate[0] == "timeout":
            self.kill()
        self.drain_output()
        if outcome is not None:
            # An invocation shorter than a sampling tick may not have been sampled: take the
            # leader's RSS once at its end (the runtime rarely gives memory back).
            st = _proc_stat(self.pid)
            if st:
                self.peak = max(self.peak, st[1] * _PAGE)
        duration = (end - handed) * 1000.0 if handed is not None else 0.0
        rid = d.request_id
        if outcome is not None:
            kind, body, ctype, _ = outcome
            if kind == "response":
                if len(body) > RESPONSE_LIMIT:
                    msg = (f"Response payload size exceeded maximum allowed payload size "
                           f"({RESPONSE_LIMIT} bytes).")
                    return ("error", _error_body("Function.ResponseSizeTooLarge", msg),
                            "application/json", "Function.ResponseSizeTooLarge", msg, duration,
                            True)
                return "ok", body, ctype, None, None, duration, True
            etype, emsg = _parse_error(body)
            return "error", body, "application/json", etype, emsg, duration, True
        if init_error is not None and handed is None:
            etype, emsg = _parse_error(init_error)
            return "init_error", init_error, "application/json", etype, emsg, duration, False
        if fate is not None and fate[0] == "timeout":
            msg = f"RequestId: {rid} Error: Task timed out after {fate[1]:.2f} seconds"
            return ("timeout", _error_body("Sandbox.Timedout", msg), "application/json",
                    "Sandbox.Timedout", msg, duration, False)
        if fate is not None and fate[0] == "oom":
            msg = f"RequestId: {rid} Error: Runtime exited with error: signal: killed"
            return ("oom", _error_body("Runtime.ExitError", msg), "application/json",
                    "Runtime.ExitError", msg, duration, False)
        if fate is not None and fate[0] == "exit":
            info = fate[1]
            assert isinstance(info, os.waitid_result)  # from exit_info
            if info.si_code == os.CLD_EXITED and info.si_status == 0:
                msg = f"RequestId: {rid} Error: Runtime exited without providing a reason"
            else:
                msg = f"RequestId: {rid} Error: Runtime exited with error: {_exit_words(info)}"
            status = "crashed" if handed is not None else "init_error"
            return (status, _error_body("Runtime.ExitError", msg), "application/json",
                    "Runtime.ExitError", msg, duration, False)
        # closed under us: the service is stopping and killed it
        msg = f"RequestId: {rid} Error: Runtime exited with error: signal: killed"
        return ("crashed", _error_body("Runtime.ExitError", msg), "application/json",
                "Runtime.ExitError", msg, duration, False)


def _parse_error(body: bytes) -> tuple:
    try:
        doc = json.loads(body)
        return str(doc.get("errorType") or "Unhandled"), str(doc.get("errorMessage") or "")
    except (ValueError, AttributeError):
        return "Unhandled", body.decode("utf-8", "replace")[:1000]


# -- the Invoke API ---------------------------------------------------------------------------

class _ApiError(Exception):
    def __init__(self, status: int, error_type: str, message: str, **extra):
        super().__init__(message)
        self.status, self.error_type, self.message, self.extra = status, error_type, message, extra


class _InvokeHandler(_Handler):
    def _error(self, err: _ApiError, request_id: str) -> None:
        # ResourceNotFound and Service exceptions model "Message", the others "message".
        key = "Message" if err.error_type in ("ResourceNotFoundException",
                                              "ServiceException") else "message"
        doc = {"Type": "User" if err.status < 500 else "Service", key: err.message, **err.extra}
        self._send(err.status, json.dumps(doc).encode(),
                   {"x-amzn-RequestId": request_id, "x-amzn-ErrorType": err.error_type})

    def _route(self):
        parts = urlsplit(self.path)
        segs = parts.path.strip("/").split("/")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return segs, query

    def do_GET(self):
        svc = self.server.owner
        rid = str(uuid.uuid4())
        segs, query = self._route()
        try:
            if len(segs) >= 2 and segs[1] == "functions" and segs[0] in (API_VERSION,
                                                                        "2019-09-30"):
                if len(segs) == 2:
                    body = {"Functions": [svc._configuration()]}
                else:
                    svc._resolve(unquote(segs[2]), query.get("Qualifier"))
                    tail = segs[3:]
                    if tail == ["configuration"]:
                        body = svc._configuration()
                    elif tail == [] and segs[0] == API_VERSION:
                        body = {"Configuration": svc._configuration(),
                                "Code": {"RepositoryType": "S3", "Location": ""},
                                "Concurrency": {"ReservedConcurrentExecutions": svc.concurrency}}
                    elif tail == ["concurrency"]:
                        body = {"ReservedConcurrentExecutions": svc.concurrency}
                    else:
                        raise _ApiError(404, "UnknownOperationException", "Unknown operation")
                self._send(200, json.dumps(body).encode(), {"x-amzn-RequestId": rid})
                return
            raise _ApiError(404, "UnknownOperationException", "Unknown operation")
        except _ApiError as err:
            self._error(err, rid)

    def do_POST(self):
        svc = self.server.owner
        rid = str(uuid.uuid4())
        segs, query = self._route()
        try:
            if (len(segs) == 4 and segs[0] == API_VERSION and segs[1] == "functions"
                    and segs[3] == "invocations"):
                self._invoke(svc, rid, unquote(segs[2]), query.get("Qualifier"))
                return
            self._body(0)
            raise _ApiError(404, "UnknownOperationException", "Unknown operation")
        except _ApiError as err:     # the body was read or drained: the connection stays usable
            self._error(err, rid)

    def _invoke(self, svc: "LocalLambda", rid: str, name: str, qualifier) -> None:
        itype = self.headers.get("X-Amz-Invocation-Type") or "RequestResponse"
        if itype not in ("RequestResponse", "Event", "DryRun"):
            self._body(0)
            raise _ApiError(400, "InvalidParameterValueException",
                            f"Unsupported invocation type {itype!r}")
        limit = ASYNC_PAYLOAD_LIMIT if itype == "Event" else SYNC_PAYLOAD_LIMIT
        payload = self._body(limit)
        arn = svc._resolve(name, qualifier)
        if payload is None:
            raise _ApiError(413, "RequestTooLargeException",
                            f"Request must be smaller than {limit} bytes for the InvokeFunction "
                            "operation")
        if not payload.strip():
            payload = b"{}"      # Lambda hands an empty invoke to the function as {}
        else:
            try:
                json.loads(payload)
            except ValueError as exc:
                raise _ApiError(400, "InvalidRequestContentException",
                                f"Could not parse request body into json: {exc}") from None
        context = None
        raw_ctx = self.headers.get("X-Amz-Client-Context")
        if raw_ctx and itype == "RequestResponse":   # Lambda passes it to sync invokes only
            try:
                context = base64.b64decode(raw_ctx, validate=True).decode()
                json.loads(context)
            except ValueError:
                raise _ApiError(400, "InvalidRequestContentException",
                                "Client context must be a valid Base64-encoded JSON object.") \
                    from None
        svc._take_throttle()
        headers = {"x-amzn-RequestId": rid, "X-Amz-Executed-Version": "$LATEST"}
        if itype == "DryRun":
            self._send(204, b"", headers)
            return
        d = _Delivery(request_id=rid, payload=payload, invocation_type=itype, invoked_arn=arn,
                      client_context=context,
                      tail=(self.headers.get("X-Amz-Log-Type") == "Tail"),
                      ready_at=time.monotonic())
        if itype == "Event":
            svc._enqueue(d)
            self._send(202, b"", headers)
            return
        result = svc._invoke_sync(d)
        if result.status != "ok":
            headers["X-Amz-Function-Error"] = "Unhandled"
        if result.log_tail is not None:
            headers["X-Amz-Log-Result"] = result.log_tail
        self._send(200, result.body, headers, content_type=result.content_type)


# -- the service ----------------------------------------------------------------------------

class LocalLambda:
    """A local Lambda service hosting one function (see the module docstring).

    >>> with LocalLambda(handler="my_module.handler", memory_mb=512, timeout_s=30) as svc:
    ...     boto3.client("lambda", endpoint_url=svc.url, ...).invoke(FunctionName="cylon-worker")
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, function: str = "cylon-worker",
                 handler: str = "cylon_store.serverless.handler", memory_mb: int = 1769,
                 timeout_s: float = 900.0, concurrency: int = 64, max_retry_attempts: int = 2,
                 retry_delays=(1.0, 2.0), idle_ttl: float = 600.0, architecture: str = "x86_64",
                 env: Optional[dict] = None, throttle_invokes: int = 0,
                 duplicate_rate: float = 0.0, log=None):
        if not (MEMORY_BOUNDS[0] <= int(memory_mb) <= MEMORY_BOUNDS[1]):
            raise ValueError(f"memory_mb must be {MEMORY_BOUNDS[0]}..{MEMORY_BOUNDS[1]} "
                             f"(Lambda's bounds), got {memory_mb}")
        if not (0 < float(timeout_s) <= TIMEOUT_BOUNDS[1]):
            raise ValueError(f"timeout_s must be in (0, {TIMEOUT_BOUNDS[1]}], got {timeout_s}")
        if int(concurrency) < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if not (0 <= int(max_retry_attempts) <= 2):
            raise ValueError(f"max_retry_attempts must be 0..2 (Lambda's bounds), got "
                             f"{max_retry_attempts}")
        if architecture not in ("x86_64", "arm64"):
            raise ValueError(f"architecture must be x86_64 or arm64, got {architecture!r}")
        if not _FUNCTION_NAME.fullmatch(function or ""):
            raise ValueError(f"function must be 1 to 64 of [A-Za-z0-9_-], got {function!r}")
        if "." not in handler.strip("."):
            raise ValueError(f"handler must be 'module.function', got {handler!r}")
        retry_delays = tuple(float(x) for x in retry_delays) or (0.0,)
        self.host, self.port, self.function, self.handler = host, int(port), function, handler
        self.memory_mb, self.timeout_s = int(memory_mb), float(timeout_s)
        self.concurrency, self.max_retry_attempts = int(concurrency), int(max_retry_attempts)
        self.retry_delays, self.idle_ttl, self.architecture = retry_delays, float(idle_ttl), \
            architecture
        self.extra_env = dict(env or {})
        self._throttle = int(throttle_invokes)
        self._duplicate_rate = float(duplicate_rate)
        self._log_stream = log
        self.region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        self.function_arn = f"arn:aws:lambda:{self.region}:{ACCOUNT}:function:{function}"
        self._task_root = os.getcwd()
        self._lock = threading.Condition()
        self._log_lock = threading.Lock()
        self._busy = 0
        self._idle: list[_Environment] = []
        self._envs: dict[str, _Environment] = {}
        self._queue: collections.deque = collections.deque()
        self._delayed: list = []
        self._seq = itertools.count()
        self._env_seq = itertools.count(1)
        self._records: list[dict] = []
        self._rng = random.Random()
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()
        self._server: Optional[_Server] = None
        self._acceptor: Optional[_Acceptor] = None
        self._sampler: Optional[_Sampler] = None
        self._dispatcher: Optional[threading.Thread] = None
        self._revision = str(uuid.uuid4())
        self._modified = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000+0000")

    # lifecycle ------------------------------------------------------------------------------

    def start(self) -> "LocalLambda":
        if self._started:
            return self
        import importlib.util
        spec = importlib.util.find_spec("awslambdaric")
        if spec is None:
            from ..errors import ConfigError
            raise ConfigError("the local Lambda service runs every invocation in awslambdaric, "
                              "which is not installed: pip install 'cylon-store[lambda]'")
        assert spec.origin is not None  # a regular package has a file
        self._runtime_dir = os.path.dirname(os.path.dirname(spec.origin))
        self._base_env = self._environment()
        self._server = _Server((self.host, self.port), _InvokeHandler, self)  # may not bind
        self.port = self._server.server_address[1]
        self._acceptor = _Acceptor()
        self._acceptor.add(self._server)
        self._acceptor.start()
        self._sampler = _Sampler(self)
        self._sampler.start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="lambda-local-dispatch",
                                            daemon=True)
        self._dispatcher.start()
        self._started = True
        return self

    def stop(self) -> None:
        """Kill every environment (its whole process group and session), close every server
        and connection, drop queued events. Idempotent."""
        if not self._started or self._stopped.is_set():
            return
        with self._lock:
            self._stopping = True
            envs = list(self._envs.values())
            self._envs.clear()
            self._idle.clear()
            self._queue.clear()
            self._delayed.clear()
            self._lock.notify_all()
        self._stopped.set()
        for env in envs:        # SIGKILL them all first, then reap: no waiting in turn
            with env.cond:
                env.closed = True
                env.cond.notify_all()
            env.kill()
        for env in envs:
            env.destroy()
        acceptor, sampler, dispatcher = self._acceptor, self._sampler, self._dispatcher
        assert acceptor is not None and sampler is not None and dispatcher is not None  # started
        acceptor.stop()
        sampler.wake.set()
        for t in (dispatcher, sampler):
            t.join(5.0)

    def __enter__(self) -> "LocalLambda":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self._started:
            raise RuntimeError("LocalLambda is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # public inspection and faults ---------------------------------------------------------------

    def invocations(self) -> list[dict]:
        """One record per delivery, in the order they ended (see ``_record``)."""
        with self._lock:
            return [dict(r) for r in self._records]

    def busy(self) -> int:
        """Deliveries running, queued or waiting for a retry: 0 once the service is idle."""
        with self._lock:
            return self._busy + len(self._queue) + len(self._delayed)

    def stop_idle(self) -> int:
        """Stop every idle environment now (the next invocations start cold); returns how many."""
        with self._lock:
            reap, self._idle = self._idle, []
            for env in reap:
                self._envs.pop(env.id, None)
        for env in reap:
            env.destroy()
        return len(reap)

    def set_faults(self, *, throttle_invokes: Optional[int] = None,
                   duplicate_rate: Optional[float] = None) -> None:
        with self._lock:
            if throttle_invokes is not None:
                self._throttle = int(throttle_invokes)
            if duplicate_rate is not None:
                self._duplicate_rate = float(duplicate_rate)

    # configuration ------------------------------------------------------------------------------

    def _configuration(self) -> dict:
        timeout = int(self.timeout_s) if self.timeout_s == int(self.timeout_s) else self.timeout_s
        return {"FunctionName": self.function, "FunctionArn": self.function_arn,
                "Runtime": f"python{sys.version_info.major}.{sys.version_info.minor}",
                "Role": f"arn:aws:iam::{ACCOUNT}:role/cylon-store-local",
                "Handler": self.handler, "CodeSize": 0,
                "Description": "cylon-store local Lambda service", "Timeout": timeout,
                "MemorySize": self.memory_mb, "LastModified": self._modified, "CodeSha256": "",
                "Version": "$LATEST", "TracingConfig": {"Mode": "PassThrough"},
                "RevisionId": self._revision, "State": "Active",
                "LastUpdateStatus": "Successful", "PackageType": "Zip",
                "Architectures": [self.architecture], "EphemeralStorage": {"Size": 512},
                "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{self.function}"}}

    def _resolve(self, name: str, qualifier) -> str:
        """The invoked function ARN for a name, name:qualifier, partial or full ARN; 404 unless
        it names this function's $LATEST."""
        parts = name.split(":")
        if parts[0] == "arn":                     # arn:aws:lambda:REGION:ACCOUNT:function:NAME[:Q]
            base, rest = parts[6:7], parts[7:]
            ok = len(parts) >= 7 and parts[2] == "lambda" and parts[5] == "function"
        elif len(parts) >= 3 and parts[1] == "function":   # ACCOUNT:function:NAME[:Q]
            base, rest, ok = parts[2:3], parts[3:], True
        else:
            base, rest, ok = parts[:1], parts[1:], True
        q = rest[0] if rest else None
        if qualifier is not None and q is not None and qualifier != q:
            ok = False
        q = q or qualifier
        ok = ok and len(rest) <= 1 and base == [self.function] and q in (None, "$LATEST")
        arn = self.function_arn + (f":{q}" if q else "")
        if not ok:
            shown = f"arn:aws:lambda:{self.region}:{ACCOUNT}:function:{name}" \
                if not name.startswith("arn:") else name
            if qualifier and not rest:
                shown += f":{qualifier}"
            raise _ApiError(404, "ResourceNotFoundException", f"Function not found: {shown}")
        return arn

    def _environment(self) -> dict:
        """The environment variables of every execution environment, as Lambda sets them, on
        top of this process's own (credentials, AWS_ENDPOINT_URL_*, CYLON_STORE_*)."""
        # What a surrounding Lambda (or an earlier run) left would mislead the runtime client:
        # AWS_LAMBDA_MAX_CONCURRENCY, for one, switches it to its multi-concurrency mode. The
        # logging knobs (AWS_LAMBDA_LOG_FORMAT, AWS_LAMBDA_LOG_LEVEL) are the function's own
        # configuration on Lambda and pass through.
        keep = ("AWS_LAMBDA_LOG_FORMAT", "AWS_LAMBDA_LOG_LEVEL")
        drop = ("_HANDLER", "_X_AMZN_TRACE_ID", "AWS_EXECUTION_ENV", "LAMBDA_TASK_ROOT",
                "LAMBDA_RUNTIME_DIR")
        base = {k: v for k, v in os.environ.items()
                if k in keep or not (k.startswith(("AWS_LAMBDA_", "_LAMBDA_")) or k in drop)}
        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        # Environments import what this process can import (test handlers under tests/, a
        # source tree), as the project's local launcher does for its ranks.
        path = os.pathsep.join(p for p in [*sys.path, base.get("PYTHONPATH", "")] if p)
        base.update({"AWS_LAMBDA_FUNCTION_NAME": self.function,
                     "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
                     "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                     "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.function}",
                     "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
                     "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region,
                     "AWS_EXECUTION_ENV": f"AWS_Lambda_{py}",
                     "LAMBDA_TASK_ROOT": self._task_root,
                     "LAMBDA_RUNTIME_DIR": self._runtime_dir,
                     "_HANDLER": self.handler, "TZ": ":UTC", "PYTHONPATH": path})
        base.update({k: str(v) for k, v in self.extra_env.items()})
        return base

    # logging ------------------------------------------------------------------------------------

    def _log(self, text: str, prefix: str = "") -> None:
        """Write ``text`` to the log, ``prefix`` in front of each of its lines."""
        stream = self._log_stream if self._log_stream is not None else sys.stderr
        out = "".join(f"{prefix}{line}\n" for line in text.split("\n"))
        with self._log_lock:
            try:
                stream.write(out)
                stream.flush()
            except (OSError, ValueError):   # a closed log (the caller went away) loses lines
                pass

    # scheduling ---------------------------------------------------------------------------------

    def _take_throttle(self) -> None:
        with self._lock:
            if self._throttle > 0:
                self._throttle -= 1
                raise _throttled()

    def _enqueue(self, d: _Delivery) -> None:
        """Accept an Event: queue it (and, with ``duplicate_rate``, a second delivery of it)."""
        with self._lock:
            if self._stopping:
                raise _ApiError(503, "ServiceException", "the local Lambda service is stopping")
            self._queue.append(d)
            if self._duplicate_rate > 0 and self._rng.random() < self._duplicate_rate:
                self._queue.append(_Delivery(**{**d.__dict__, "duplicate": True}))
            self._lock.notify_all()

    def _invoke_sync(self, d: _Delivery) -> _Result:
        with self._lock:
            if self._stopping:
                raise _ApiError(503, "ServiceException", "the local Lambda service is stopping")
            if self._busy >= self.concurrency:
                raise _throttled()
            self._busy += 1
        return self._execute(d)

    def _dispatch(self) -> None:
        """Start queued Events while environments are free, move retries that came due to the
        queue, stop idle environments past ``idle_ttl`` (or dead while idle)."""
        while not self._stopped.is_set():
            reap = []
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _, _, d = heapq.heappop(self._delayed)
                    d.ready_at = now
                    self._queue.append(d)
                while self._queue and self._busy < self.concurrency:
                    d = self._queue.popleft()
                    self._busy += 1
                    threading.Thread(target=self._run_event, args=(d,), daemon=True,
                                     name=f"lambda-local-event-{d.request_id[:8]}").start()
                keep = []
                for env in self._idle:
                    if now - env.last_used > self.idle_ttl or env.exit_info() is not None:
                        reap.append(env)
                        self._envs.pop(env.id, None)
                    else:
                        keep.append(env)
                self._idle = keep
                wait = 1.0 if not self._delayed else min(1.0, self._delayed[0][0] - now)
                if not reap:
                    self._lock.wait(max(wait, 0.0))
            for env in reap:
                self._log(f"stopped (idle {time.monotonic() - env.last_used:.1f} s, or exited)",
                          f"[{env.id}] ")
                env.destroy()

    def _run_event(self, d: _Delivery) -> None:
        result = self._execute(d)
        if result.status == "ok":
            return
        with self._lock:
            if self._stopping or d.attempt >= self.max_retry_attempts:
                return
            delay = self.retry_delays[min(d.attempt, len(self.retry_delays) - 1)]
            retry = _Delivery(**{**d.__dict__, "attempt": d.attempt + 1})
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), retry))
            self._lock.notify_all()

    def _acquire_env(self):
        """An idle environment (the most recently used: the others age out), or a new one."""
        with self._lock:
            while self._idle:
                env = self._idle.pop()
                if env.exit_info() is None:
                    return env, False
                self._envs.pop(env.id, None)
                threading.Thread(target=env.destroy, daemon=True).start()
            if self._stopping:
                raise RuntimeError("stopping")
            env_id = f"env-{next(self._env_seq)}"
        env = _Environment(self, env_id)
        self._acceptor.add(env.server)
        try:
            env.start(self._base_env)
        except BaseException:
            env.destroy()
            raise
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._envs[env.id] = env
        if stopping:
            env.destroy()
            raise RuntimeError("stopping")
        return env, True

    def _execute(self, d: _Delivery) -> _Result:
        """Run one delivery on an environment; the caller holds one of ``concurrency`` slots,
        released here (after the environment is back in the idle pool, so the next queued
        event finds it warm)."""
        queued_ms = (time.monotonic() - d.ready_at) * 1000.0
        env = None
        healthy = False
        try:
            try:
                env, cold = self._acquire_env()
            except Exception as exc:
                msg = f"RequestId: {d.request_id} Error: could not start an environment: {exc}"
                record = self._record(d, "init_error", "ServiceException", msg, None, False, 0.0,
                                      0.0, 0, queued_ms)
                return _Result("init_error", _error_body("ServiceException", msg), record)
            self._log(f"START RequestId: {d.request_id} Version: $LATEST", f"[{env.id}] ")
            status, body, ctype, etype, emsg, duration, healthy = env.run(d)
            init_ms = ((env.first_next or time.monotonic()) - env.created) * 1000.0 if cold else 0.0
            peak_mb = math.ceil(env.peak / (1024 * 1024))
            if status == "oom":
                peak_mb = self.memory_mb
            record = self._record(d, status, etype, emsg, env, cold, init_ms, duration,
                                  min(peak_mb, self.memory_mb), queued_ms)
            lines = []
            if status == "timeout":
                stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
                lines.append(f"{stamp} {d.request_id} {emsg.split(' Error: ', 1)[-1]}")
            elif status in ("oom", "crashed") or (status == "init_error"
                                                  and etype == "Runtime.ExitError"):
                lines.append(f"{emsg}\n{etype}")
            lines.append(f"END RequestId: {d.request_id}")
            report = (f"REPORT RequestId: {d.request_id}\tDuration: {duration:.2f} ms\t"
                      f"Billed Duration: {record['billed_ms']} ms\tMemory Size: {self.memory_mb} MB"
                      f"\tMax Memory Used: {record['max_memory_mb']} MB")
            if cold:
                report += f"\tInit Duration: {init_ms:.2f} ms"
            lines.append(report)
            self._log("\n".join(lines), f"[{env.id}] ")
            tail = None
            if d.tail:
                with env.cond:
                    captured, env.capture = env.capture or [], None
                text = "\n".join([f"START RequestId: {d.request_id} Version: $LATEST",
                                  *captured, *lines]) + "\n"
                tail = base64.b64encode(text.encode()[-LOG_TAIL_BYTES:]).decode()
            return _Result(status, body, record, ctype, tail)
        finally:
            destroy = False
            with self._lock:
                self._busy -= 1
                if env is not None:
                    env.served += 1
                    env.last_used = time.monotonic()
                    if healthy and not self._stopping:
                        self._idle.append(env)
                    else:
                        self._envs.pop(env.id, None)
                        destroy = True
                self._lock.notify_all()
            if destroy and env is not None:  # (destroy is only set with an environment)
                env.destroy()

    def _record(self, d, status, etype, emsg, env, cold, init_ms, duration, peak_mb,
                queued_ms) -> dict:
        """One delivery, as ``invocations()`` lists it: request_id, function, invocation_type,
        attempt (0-based retry), duplicate, status, error_type, error_message, cold, init_ms,
        duration_ms, billed_ms (duration rounded up to the ms, Lambda's unit), max_memory_mb,
        memory_mb, env_id, queued_ms (waiting for a free environment), ended_at (epoch s)."""
        record = {"request_id": d.request_id, "function": self.function,
                  "invocation_type": d.invocation_type, "attempt": d.attempt,
                  "duplicate": d.duplicate, "status": status, "error_type": etype,
                  "error_message": emsg, "cold": cold, "init_ms": round(init_ms, 3),
                  "duration_ms": round(duration, 3), "billed_ms": int(math.ceil(duration)),
                  "max_memory_mb": peak_mb, "memory_mb": self.memory_mb,
                  "env_id": env.id if env is not None else None,
                  "queued_ms": round(queued_ms, 3), "ended_at": time.time()}
        with self._lock:
            self._records.append(record)
        return record


def _throttled() -> _ApiError:
    return _ApiError(429, "TooManyRequestsException", "Rate Exceeded.",
                     Reason="ReservedFunctionConcurrentInvocationLimitExceeded")


# -- CLI -----------------------------------------------------------------------------------------

def _function_arg(text: str) -> str:
    if not _FUNCTION_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"function name must be 1 to 64 letters, digits, '-' "
                                         f"or '_' (Lambda's rule), got {text!r}")
    return text


def _handler_arg(text: str) -> str:
    module, _, fn = text.rpartition(".")
    if not module or not fn or not all(p.isidentifier() for p in [*module.split("."), fn]):
        raise argparse.ArgumentTypeError(f"handler must be module.function (e.g. "
                                         f"cylon_store.serverless.handler), got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``cylon-store lambda local``."""
    p.description = """\
A local AWS Lambda service on loopback, no Docker and no AWS: Lambda's Invoke API,
every invocation run by the real runtime interface client (python -m awslambdaric
HANDLER), with Lambda's timeout, memory limit, concurrency, warm reuse, async queue
and retries.

Point boto3, and cs.launch(..., launcher="lambda", function=NAME), at it with

  export AWS_ENDPOINT_URL_LAMBDA=http://127.0.0.1:PORT

(PORT as printed on the "serving lambda" line; --port fixes it), or pass
endpoint_url="http://127.0.0.1:PORT" to boto3.client("lambda", ...). Any credentials
are accepted. Environments inherit this process's environment (credentials,
AWS_ENDPOINT_URL_*, CYLON_STORE_*) and import what it can import. Runs until Ctrl-C
or SIGTERM. Needs pip install 'cylon-store[lambda]'.
"""
    p.add_argument("--host", default="127.0.0.1",
                   help="address of the Invoke API (default 127.0.0.1; the Runtime API is always "
                        "on 127.0.0.1)")
    p.add_argument("--port", type=int_range(0, 65535), default=0,
                   help="port of the Invoke API (default 0: any free port, printed)")
    p.add_argument("--function", default="cylon-worker", type=_function_arg,
                   help="the function's name (default cylon-worker)")
    p.add_argument("--handler", default="cylon_store.serverless.handler", type=_handler_arg,
                   help="module.function of the handler (default cylon_store.serverless.handler)")
    p.add_argument("--memory", type=int_range(*MEMORY_BOUNDS, "MB"),
                   default=1769, metavar="MB",
                   help="memory size in MB, 128..10240 as on Lambda (default 1769: one vCPU on "
                        "Lambda); an environment above it is killed")
    p.add_argument("--timeout", type=seconds(TIMEOUT_BOUNDS[1], at_least=TIMEOUT_BOUNDS[0]), default=900.0, metavar="SECONDS",
                   help="function timeout, 1..900 s (default 900)")
    p.add_argument("--concurrency", type=int_range(1), default=64, metavar="N",
                   help="environments at once; a sync invoke past it gets 429 (default 64)")
    p.add_argument("--max-retry-attempts", type=int_range(0, 2), default=2,
                   metavar="N",
                   help="retries of a failed async event, 0..2 (default 2, as on Lambda)")
    p.set_defaults(fn=main)


def main(args) -> int:
    """Serve until SIGINT or SIGTERM, then stop every environment and return 0."""
    svc = LocalLambda(host=args.host, port=args.port, function=args.function,
                      handler=args.handler, memory_mb=args.memory, timeout_s=args.timeout,
                      concurrency=args.concurrency, max_retry_attempts=args.max_retry_attempts)
    done = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda *_: done.set())
        except ValueError:      # not the main thread: the caller stops us some other way
            pass
    try:
        try:
            svc.start()
        except OSError as exc:      # the port is taken, the host is not ours
            from ..errors import ConfigError
            raise ConfigError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
        print(f"serving lambda {svc.url} (function {svc.function}, memory {svc.memory_mb} MB, "
              f"timeout {svc.timeout_s:g} s, concurrency {svc.concurrency})", flush=True)
        while not done.wait(1.0):
            pass
    finally:
        svc.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
