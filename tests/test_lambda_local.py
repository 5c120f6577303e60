"""The local Lambda service (cylon_store/serverless/local.py) against real everything: the service
in this process, every environment a real ``python -m awslambdaric`` process, boto3's ``lambda``
client on ``service.url``. Handlers are in tests/lambda_handlers.py (``route`` runs
``event['op']``). Every wait is bounded; timing asserts are generous bounds only.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("awslambdaric")
boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import BotoCoreError  # noqa: E402

from cylon_store.errors import ConfigError  # noqa: E402
from cylon_store.serverless.local import LocalLambda  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MARK_VAR = "CYLON_LAMBDA_TEST_MARK"
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


# -- helpers ---------------------------------------------------------------------------------------

def client(url: str, attempts: int = 1):
    """boto3's lambda client as a user would build it; retries off unless asked, so a 429
    surfaces instead of being retried by botocore."""
    return boto3.client("lambda", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=Config(retries={"total_max_attempts": attempts},
                                      connect_timeout=5, read_timeout=60))


def invoke(c, event=None, **kw):
    """Invoke synchronously; (decoded payload, FunctionError, response)."""
    kw.setdefault("FunctionName", "cylon-worker")
    r = c.invoke(Payload=json.dumps(event or {}).encode(), **kw)
    body = r["Payload"].read()
    return (json.loads(body) if body else None), r.get("FunctionError"), r


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def records(svc, *rids, n=None, timeout=20.0):
    """The records of ``rids`` once there are ``n`` of them (default one each)."""
    want = len(rids) if n is None else n

    def ready():
        got = [r for r in svc.invocations() if r["request_id"] in rids]
        return got if len(got) >= want else None
    return wait_for(ready, timeout, f"{want} records of {rids}")


def rid_of(response) -> str:
    return response["ResponseMetadata"]["RequestId"]


def marked_pids(mark: str) -> list[int]:
    """Live awslambdaric processes whose environment carries ``mark``."""
    needle = f"{MARK_VAR}={mark}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            if b"awslambdaric" not in cmd:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(name))
        except OSError:
            pass
    return out


def service(tmp_path, **kw) -> LocalLambda:
    mark = uuid.uuid4().hex
    kw.setdefault("handler", "lambda_handlers.route")
    kw.setdefault("memory_mb", 512)
    kw.setdefault("timeout_s", 30)
    log_path = tmp_path / f"lambda-{mark[:8]}.log"
    kw.setdefault("log", open(log_path, "w", buffering=1))
    svc = LocalLambda(env={MARK_VAR: mark}, **kw)
    svc.mark, svc.log_path = mark, log_path
    return svc


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    s = service(tmp_path_factory.mktemp("lambda"), concurrency=4).start()
    yield s
    s.stop()
    assert marked_pids(s.mark) == []


@pytest.fixture(scope="module")
def lam(svc):
    return client(svc.url)


# -- the Invoke API --------------------------------------------------------------------------------

def test_sync_invoke_returns_result_env_and_context(svc, lam):
    ctx = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
    t0 = time.monotonic()
    out, ferr, r = invoke(lam, {"op": "env_info", "x": [1, 2]}, LogType="Tail", ClientContext=ctx)
    assert ferr is None and r["StatusCode"] == 200 and r["ExecutedVersion"] == "$LATEST"
    assert out["event"] == {"op": "env_info", "x": [1, 2]}
    env = out["env"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    assert env["AWS_LAMBDA_RUNTIME_API"].startswith("127.0.0.1:")
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "cylon-worker"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "512"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/cylon-worker"
    assert "[$LATEST]" in env["AWS_LAMBDA_LOG_STREAM_NAME"]
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == region
    assert env["AWS_EXECUTION_ENV"] == f"AWS_Lambda_{PY}"
    assert env["LAMBDA_TASK_ROOT"] == out["cwd"] == os.getcwd()
    assert os.path.isdir(env["LAMBDA_RUNTIME_DIR"])
    assert env["_HANDLER"] == "lambda_handlers.route" and env["TZ"] == ":UTC"
    assert env["_X_AMZN_TRACE_ID"].startswith("Root=1-")
    assert env[MARK_VAR] == svc.mark                      # the env= extras reach the function
    assert out["tmp_is_dir"] and env["TMPDIR"] != os.environ.get("TMPDIR")
    assert 25_000 < out["remaining_ms"] <= 30_000
    assert out["memory_limit_in_mb"] == "512"             # awslambdaric gives a str, as Lambda
    assert out["aws_request_id"] == rid_of(r)
    assert out["function_name"] == "cylon-worker" and out["function_version"] == "$LATEST"
    assert out["invoked_function_arn"] == "arn:aws:lambda:%s:000000000000:function:cylon-worker" \
        % region
    assert out["client_context_custom"] == {"k": "v"}
    tail = base64.b64decode(r["LogResult"]).decode()
    assert f"REPORT RequestId: {rid_of(r)}\tDuration: " in tail and "Billed Duration: " in tail
    assert time.monotonic() - t0 < 15
    (rec,) = records(svc, rid_of(r))
    assert rec["status"] == "ok" and rec["invocation_type"] == "RequestResponse"
    assert rec["attempt"] == 0 and rec["duplicate"] is False and rec["memory_mb"] == 512
    assert 0 < rec["max_memory_mb"] < 512 and rec["billed_ms"] >= rec["duration_ms"] > 0
    assert rec["billed_ms"] == -(-rec["duration_ms"] // 1)


def test_handler_exception_is_unhandled_error_and_env_stays_warm(svc, lam):
    out, ferr, r = invoke(lam, {"op": "fail", "msg": "bad input"})
    assert r["StatusCode"] == 200 and ferr == "Unhandled"
    assert out["errorType"] == "ValueError" and out["errorMessage"] == "bad input"
    assert isinstance(out["stackTrace"], list) and out["stackTrace"]
    (rec,) = records(svc, rid_of(r))
    assert (rec["status"], rec["error_type"], rec["error_message"]) == ("error", "ValueError",
                                                                         "bad input")
    _, _, r2 = invoke(lam, {"op": "echo"})
    (rec2,) = records(svc, rid_of(r2))
    assert rec2["env_id"] == rec["env_id"] and rec2["cold"] is False   # an error keeps the env


def test_cold_start_then_warm_reuse(tmp_path):
    with service(tmp_path) as s:
        c = client(s.url)
        _, _, r1 = invoke(c, {"op": "echo", "n": 1}, LogType="Tail")
        _, _, r2 = invoke(c, {"op": "echo", "n": 2}, LogType="Tail")
        a, = records(s, rid_of(r1))
        b, = records(s, rid_of(r2))
        assert a["cold"] is True and a["init_ms"] > 0
        assert b["cold"] is False and b["init_ms"] == 0 and b["env_id"] == a["env_id"]
        assert "Init Duration: " in base64.b64decode(r1["LogResult"]).decode()
        tail2 = base64.b64decode(r2["LogResult"]).decode()
        assert "Init Duration" not in tail2 and "echo {'op': 'echo', 'n': 2}" in tail2
    log = s.log_path.read_text()
    assert f"[{a['env_id']} {rid_of(r2)}] echo" in log            # output prefixed env + request
    assert f"REPORT RequestId: {rid_of(r1)}\t" in log


def test_idle_environment_stopped_after_ttl(tmp_path):
    with service(tmp_path, idle_ttl=0.3) as s:
        c = client(s.url)
        _, _, r1 = invoke(c, {"op": "echo"})
        assert marked_pids(s.mark)
        wait_for(lambda: marked_pids(s.mark) == [], 10, "the idle environment to stop")
        _, _, r2 = invoke(c, {"op": "echo"})
        a, = records(s, rid_of(r1))
        b, = records(s, rid_of(r2))
        assert b["cold"] is True and b["env_id"] != a["env_id"]


def test_async_event_is_accepted_then_runs(svc, lam):
    r = lam.invoke(FunctionName="cylon-worker", InvocationType="Event",
                   Payload=json.dumps({"op": "echo"}).encode())
    assert r["StatusCode"] == 202 and r["Payload"].read() == b""
    (rec,) = records(svc, rid_of(r))
    assert rec["status"] == "ok" and rec["invocation_type"] == "Event" and rec["attempt"] == 0


def test_crash_reported_as_exit_error_and_env_replaced(svc, lam):
    out, ferr, r = invoke(lam, {"op": "crash", "code": 3})
    assert ferr == "Unhandled" and out["errorType"] == "Runtime.ExitError"
    assert out["errorMessage"] == f"RequestId: {rid_of(r)} Error: Runtime exited with error: " \
                                  "exit status 3"
    (rec,) = records(svc, rid_of(r))
    assert rec["status"] == "crashed"
    _, _, r2 = invoke(lam, {"op": "echo"})
    (rec2,) = records(svc, rid_of(r2))
    assert rec2["env_id"] != rec["env_id"]


def test_init_error_names_the_import_failure(tmp_path):
    with service(tmp_path, handler="lambda_handlers_missing.handler",
                 max_retry_attempts=0) as s:
        out, ferr, r = invoke(client(s.url), {})
        assert ferr == "Unhandled" and out["errorType"] == "Runtime.ImportModuleError"
        assert "lambda_handlers_missing" in out["errorMessage"]
        (rec,) = records(s, rid_of(r))
        assert rec["status"] == "init_error" and rec["cold"] is True


def test_api_errors_and_configuration(svc, lam):
    ex = lam.exceptions
    for name in ("nope", "arn:aws:lambda:us-east-1:000000000000:function:nope",
                 "cylon-worker:v1"):
        with pytest.raises(ex.ResourceNotFoundException, match="Function not found"):
            lam.invoke(FunctionName=name, Payload=b"{}")
    with pytest.raises(ex.ResourceNotFoundException):
        lam.invoke(FunctionName="cylon-worker", Qualifier="7", Payload=b"{}")
    with pytest.raises(ex.ResourceNotFoundException):
        lam.get_function_configuration(FunctionName="nope")
    arn = svc.function_arn
    for name, q in ((arn, None), ("000000000000:function:cylon-worker", None),
                    ("cylon-worker:$LATEST", None), ("cylon-worker", "$LATEST")):
        kw = {"Qualifier": q} if q else {}
        out, ferr, _ = invoke(lam, {"op": "echo", "via": name}, FunctionName=name, **kw)
        assert ferr is None and out["via"] == name
    r = lam.invoke(FunctionName="cylon-worker", InvocationType="DryRun", Payload=b"{}")
    assert r["StatusCode"] == 204
    with pytest.raises(ex.RequestTooLargeException):
        lam.invoke(FunctionName="cylon-worker", Payload=b'"' + b"x" * (6 << 20) + b'"')
    with pytest.raises(ex.RequestTooLargeException):
        lam.invoke(FunctionName="cylon-worker", InvocationType="Event",
                   Payload=b'"' + b"x" * (1 << 20) + b'"')
    with pytest.raises(ex.InvalidRequestContentException):
        lam.invoke(FunctionName="cylon-worker", Payload=b"{not json")
    out, ferr, r = invoke(lam, {"op": "big", "bytes": 7 << 20})     # over 6 MB of response
    assert ferr == "Unhandled" and out["errorType"] == "Function.ResponseSizeTooLarge"
    cfg = lam.get_function_configuration(FunctionName="cylon-worker")
    assert cfg["FunctionName"] == "cylon-worker" and cfg["FunctionArn"] == arn
    assert arn.startswith("arn:aws:lambda:") and arn.endswith(":000000000000:function:cylon-worker")
    assert (cfg["MemorySize"], cfg["Timeout"], cfg["Runtime"]) == (512, 30, PY)
    assert cfg["Handler"] == "lambda_handlers.route" and cfg["Architectures"] == ["x86_64"]
    assert (cfg["State"], cfg["LastUpdateStatus"], cfg["PackageType"]) == ("Active",
                                                                          "Successful", "Zip")
    fn = lam.get_function(FunctionName=arn)
    assert fn["Configuration"]["MemorySize"] == 512
    assert fn["Concurrency"]["ReservedConcurrentExecutions"] == 4
    assert [f["FunctionName"] for f in lam.list_functions()["Functions"]] == ["cylon-worker"]


def test_throttle_fault_rejects_the_next_invokes(svc, lam):
    svc.set_faults(throttle_invokes=2)
    try:
        for _ in range(2):
            with pytest.raises(lam.exceptions.TooManyRequestsException) as ei:
                invoke(lam, {"op": "echo"})
            assert ei.value.response["Reason"] == \
                "ReservedFunctionConcurrentInvocationLimitExceeded"
            assert ei.value.response["Error"]["Message"] == "Rate Exceeded."
        out, ferr, _ = invoke(lam, {"op": "echo", "ok": True})
        assert ferr is None and out["ok"] is True
    finally:
        svc.set_faults(throttle_invokes=0)


def test_duplicate_fault_delivers_each_event_twice(svc, lam):
    svc.set_faults(duplicate_rate=1.0)
    try:
        rids = [rid_of(lam.invoke(FunctionName="cylon-worker", InvocationType="Event",
                                  Payload=json.dumps({"op": "echo", "i": i}).encode()))
                for i in range(2)]
    finally:
        svc.set_faults(duplicate_rate=0.0)
    got = records(svc, *rids, n=4)
    for rid in rids:
        mine = [r for r in got if r["request_id"] == rid]
        assert sorted(r["duplicate"] for r in mine) == [False, True]
        assert all(r["status"] == "ok" and r["attempt"] == 0 for r in mine)


# -- limits ----------------------------------------------------------------------------------------

def test_timeout_kills_the_environment(tmp_path):
    with service(tmp_path, timeout_s=2) as s:
        pidfile = tmp_path / "pid"
        t0 = time.monotonic()
        out, ferr, r = invoke(client(s.url), {"op": "sleep", "seconds": 10,
                                              "pidfile": str(pidfile)})
        took = time.monotonic() - t0
        assert 1.9 < took < 6
        assert ferr == "Unhandled" and out["errorType"] == "Sandbox.Timedout"
        assert out["errorMessage"] == f"RequestId: {rid_of(r)} Error: Task timed out after " \
                                      "2.00 seconds"
        (rec,) = records(s, rid_of(r))
        assert rec["status"] == "timeout" and 1900 < rec["duration_ms"] < 6000
        assert not os.path.exists(f"/proc/{int(pidfile.read_text())}")
        assert marked_pids(s.mark) == []


def test_memory_limit_kills_the_environment(tmp_path):
    with service(tmp_path, memory_mb=128) as s:
        c = client(s.url)
        _, ferr, r0 = invoke(c, {"op": "allocate", "mb": 32, "hold": 0.2})   # baseline + 32 MB fits
        assert ferr is None
        out, ferr, r = invoke(c, {"op": "allocate", "mb": 1024})
        assert ferr == "Unhandled" and out["errorType"] == "Runtime.ExitError"
        assert out["errorMessage"] == f"RequestId: {rid_of(r)} Error: Runtime exited with " \
                                      "error: signal: killed"
        ok, rec = records(s, rid_of(r0), rid_of(r))
        if ok["request_id"] != rid_of(r0):
            ok, rec = rec, ok
        assert ok["status"] == "ok" and 32 < ok["max_memory_mb"] < 128
        assert rec["status"] == "oom" and rec["max_memory_mb"] == 128
        assert rec["env_id"] == ok["env_id"] and marked_pids(s.mark) == []
        _, ferr, r2 = invoke(c, {"op": "echo"})                      # a new, cold environment
        (rec2,) = records(s, rid_of(r2))
        assert ferr is None and rec2["cold"] is True and rec2["env_id"] != rec["env_id"]


def test_concurrency_limit_queues_events_and_throttles_sync(tmp_path):
    with service(tmp_path, concurrency=1) as s:
        c = client(s.url)
        pidfile = tmp_path / "first.pid"
        first = c.invoke(FunctionName="cylon-worker", InvocationType="Event", Payload=json.dumps(
            {"op": "sleep", "seconds": 0.8, "pidfile": str(pidfile)}).encode())
        second = c.invoke(FunctionName="cylon-worker", InvocationType="Event",
                          Payload=json.dumps({"op": "sleep", "seconds": 0.05}).encode())
        assert first["StatusCode"] == second["StatusCode"] == 202
        wait_for(pidfile.exists, what="the first event to run")
        with pytest.raises(c.exceptions.TooManyRequestsException) as ei:
            invoke(c, {"op": "echo"})
        assert ei.value.response["Error"]["Code"] == "TooManyRequestsException"
        a, b = sorted(records(s, rid_of(first), rid_of(second)), key=lambda x: x["ended_at"])
        assert (a["request_id"], b["request_id"]) == (rid_of(first), rid_of(second))   # FIFO
        assert a["queued_ms"] < 500 and b["queued_ms"] > 300
        assert b["cold"] is False and b["env_id"] == a["env_id"]


def test_async_retries_after_timeout_and_error(tmp_path):
    with service(tmp_path, timeout_s=1, max_retry_attempts=1, retry_delays=(0.1,)) as s:
        c = client(s.url)
        slow = rid_of(c.invoke(FunctionName="cylon-worker", InvocationType="Event",
                               Payload=json.dumps({"op": "sleep", "seconds": 10}).encode()))
        bad = rid_of(c.invoke(FunctionName="cylon-worker", InvocationType="Event",
                              Payload=json.dumps({"op": "fail"}).encode()))
        got = records(s, slow, bad, n=4, timeout=30)
        time.sleep(0.3)                                  # past the retry delay: nothing more
        got = [r for r in s.invocations() if r["request_id"] in (slow, bad)]
        assert len(got) == 4
        for rid, status in ((slow, "timeout"), (bad, "error")):
            mine = sorted((r for r in got if r["request_id"] == rid), key=lambda r: r["attempt"])
            assert [(r["attempt"], r["status"]) for r in mine] == [(0, status), (1, status)]


# -- lifecycle and CLI -----------------------------------------------------------------------------

def test_stop_leaves_no_environment(tmp_path):
    s = service(tmp_path, concurrency=3).start()
    c = client(s.url)
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(invoke(c, {"op": "env_info"})[0]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    tmpdirs = {o["env"]["TMPDIR"] for o in outs}
    pidfile = tmp_path / "busy.pid"
    c.invoke(FunctionName="cylon-worker", InvocationType="Event",
             Payload=json.dumps({"op": "sleep", "seconds": 30, "pidfile": str(pidfile)}).encode())
    wait_for(pidfile.exists, what="the async event to run")
    assert len(marked_pids(s.mark)) >= 1 and all(os.path.isdir(d) for d in tmpdirs)
    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 10
    assert marked_pids(s.mark) == []
    assert not any(os.path.exists(d) for d in tmpdirs)          # each TMPDIR went with its env
    s.stop()                                                      # idempotent
    with pytest.raises(BotoCoreError):
        client(s.url).invoke(FunctionName="cylon-worker", Payload=b"{}")


def test_start_without_awslambdaric_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "awslambdaric", None)
    with pytest.raises(ConfigError, match=r"cylon-store\[lambda\]"):
        LocalLambda().start()


def test_cli_help_and_validation(capsys, monkeypatch):
    from cylon_store.cli import main as cli_main
    monkeypatch.setitem(sys.modules, "awslambdaric", None)       # --help needs no extra
    with pytest.raises(SystemExit) as ei:
        cli_main(["lambda", "local", "--help"])
    assert ei.value.code == 0
    assert "AWS_ENDPOINT_URL_LAMBDA=http://127.0.0.1:PORT" in capsys.readouterr().out
    for flag, value, words in (("--memory", "64", "must be 128 to 10,240 MB, got 64"),
                               ("--timeout", "901", "must be 1 to 900 seconds, got 901"),
                               ("--concurrency", "0", "must be at least 1, got 0"),
                               ("--max-retry-attempts", "3", "must be 0 to 2, got 3")):
        with pytest.raises(SystemExit) as ei:
            cli_main(["lambda", "local", flag, value])
        assert ei.value.code == 2 and words in capsys.readouterr().err


def test_cli_serves_boto3_and_exits_on_sigterm(tmp_path):
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK_VAR: mark,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "cli.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cylon_store.cli", "lambda", "local",
                                 "--port", "0", "--handler", "lambda_handlers.route",
                                 "--memory", "256", "--timeout", "30", "--concurrency", "2"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=60)
        assert line.startswith("serving lambda http://127.0.0.1:"), line
        url = line.split()[2]
        assert line.rstrip("\n") == (f"serving lambda {url} (function cylon-worker, memory 256 "
                                     "MB, timeout 30 s, concurrency 2)")
        out, ferr, _ = invoke(client(url), {"op": "echo", "via": "cli"})
        assert ferr is None and out == {"op": "echo", "via": "cli"}
        assert marked_pids(mark)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert marked_pids(mark) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
