"""The shuffle service (``cylon-store serve``, ``cylon_store.service``) and its ``flight://``
client, against real service processes on loopback: the bearer token (URL, environment, token
file; never printed), TLS, spilling to disk and giving it back, a put whose payload fails, the
per-group TTL and ``cylon-store clean``, 64 concurrent ranks and waiters, graceful shutdown,
the ``stats`` action, the command line, Lambda ranks over the service, and bad URLs.

(The conformance, communicator and kernel suites already run over flight:// through the
``backend`` fixture; this file tests what only the service does.)  Every test starts its own
service(s) and stops them, whatever happens.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pytest

import cylon_store as cs
from cylon_store.service import SCHEMA, data_batch

from servers import free_port
from servers.flight import launch
from servers.redis import make_tls_cert
from test_comm import rank_collectives

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# -- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture
def services():
    """``start(*serve_args, token=...)`` -> a service of this test alone, stopped at teardown."""
    started = []

    def start(*args, **kw):
        svc = launch(*args, **kw)
        started.append(svc)
        return svc
    yield start
    for svc in started:
        svc.stop()


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    """Tests decide themselves whether the client finds a token in the environment."""
    monkeypatch.delenv("CYLON_STORE_TOKEN", raising=False)


def table_of(nbytes: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"x": rng.random(max(1, nbytes // 8))})


def small_table(tag: int = 0) -> pa.Table:
    return pa.table({"a": [1, 2, 3], "tag": [tag] * 3})


def server_stats(store) -> dict:
    return store.adapter.server_stats()


def wait_until(cond, timeout: float, what: str, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s: {what}")


def spill_files(directory) -> list:
    return [os.path.join(r, f) for r, _, files in os.walk(directory) for f in files]


def service_output(svc) -> str:
    """Everything a stopped service printed (stdout after its 'serving' line, and stderr)."""
    assert svc.proc.poll() is not None
    end = time.monotonic() + 2   # the helper's stderr reader reaches EOF right after the exit
    while time.monotonic() < end and not any("shutting down" in x for x in svc.stderr_lines):
        time.sleep(0.05)
    rest = svc.proc.stdout.read() if svc.proc.stdout else ""
    return svc.url + "\n" + rest + "".join(svc.stderr_lines)


def grpc_location(svc) -> str:
    return svc.url.replace("flight+tls://", "grpc+tls://").replace("flight://", "grpc://")


def call_options(token, timeout=10.0) -> fl.FlightCallOptions:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return fl.FlightCallOptions(headers=headers, timeout=timeout)


def raw_put(client, token, key, data: bytes, *, declared="exact", commit="exact"):
    """One DoPut as the protocol describes it (descriptor, one data batch, commit metadata)."""
    n = len(data) if declared == "exact" else declared
    desc = fl.FlightDescriptor.for_command(msgpack.packb({"k": key, "m": "overwrite", "n": n}))
    writer, reader = client.do_put(desc, SCHEMA, call_options(token))
    try:
        batch = data_batch(pa.py_buffer(data))
        if commit is None:
            writer.write_batch(batch)
        else:
            sent = len(data) if commit == "exact" else commit
            writer.write_with_metadata(batch, pa.py_buffer(msgpack.packb({"n": sent})))
        writer.done_writing()
        reply = reader.read()
    finally:
        writer.close()
    return msgpack.unpackb(reply.to_pybytes()) if reply is not None else None


def full_text(exc: BaseException) -> str:
    """The whole traceback a log would show, causes included."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc)


def run_cli(*args, token=None, timeout=60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CYLON_STORE_TOKEN"}
    if token:
        env["CYLON_STORE_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "cylon_store.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- 1. the token -----------------------------------------------------------------------------
def test_wrong_or_missing_token_is_refused_and_stores_nothing(services):
    """A wrong or missing token: PermissionDeniedError on put and get, nothing stored, and
    neither token in any message, traceback, repr or str of the store."""
    right, wrong = f"right-{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"
    svc = services(token=right)
    t = small_table()
    for url in (f"{svc.url}?token={wrong}", svc.url):
        with cs.open_store(url) as store:
            for op in (lambda: store.put("auth/a", t), lambda: store.get("auth/a")):
                with pytest.raises(cs.PermissionDeniedError) as info:
                    op()
                text = full_text(info.value)
                assert right not in text and wrong not in text, text
            for shown in (repr(store), str(store), store.safe_url):
                assert right not in shown and wrong not in shown, shown

    # The service itself refuses (not only the client's first ping): raw Flight calls.
    client = fl.FlightClient(grpc_location(svc))
    try:
        for token in (wrong, None):
            with pytest.raises(fl.FlightUnauthenticatedError) as info:
                raw_put(client, token, "auth/raw", b"x" * 100)
            assert right not in str(info.value) and wrong not in str(info.value)
            with pytest.raises(fl.FlightUnauthenticatedError):
                client.do_get(fl.Ticket(msgpack.packb({"k": "auth/raw"})),
                              call_options(token)).read_all()
            with pytest.raises(fl.FlightUnauthenticatedError):
                list(client.do_action(fl.Action("list", msgpack.packb({})), call_options(token)))
    finally:
        client.close()

    with cs.open_store(svc.store_url()) as store:
        assert store.list("") == []
        st = server_stats(store)
        assert st["objects"] == 0 and st["bytes_memory"] == 0 and st["memory_reserved"] == 0
        assert st["bytes_in"] == 0 and "put" not in st["requests"], st
        assert right not in repr(store) and right not in str(store)
    assert svc.stop() == 0
    out = service_output(svc)
    assert right not in out and wrong not in out, out


def test_token_from_the_environment(services, monkeypatch):
    """CYLON_STORE_TOKEN is the client's token when the URL has none; a token in the URL wins."""
    svc = services()
    t = small_table(7)
    monkeypatch.setenv("CYLON_STORE_TOKEN", svc.token)
    with cs.open_store(svc.url) as store:
        store.put("env/a", t)
        assert store.get("env/a").equals(t)
        assert svc.token not in repr(store) and svc.token not in str(store)
    with cs.open_store(f"{svc.url}?token=not-{uuid.uuid4().hex}") as store:
        with pytest.raises(cs.PermissionDeniedError):
            store.get("env/a")


def test_token_file(services, tmp_path):
    """serve --token-file F: the file's (stripped) content is the token, and the service never
    prints it."""
    token = f"file-token-{uuid.uuid4().hex}"
    path = tmp_path / "token"
    path.write_text(f"  {token}\n")
    svc = services("--token-file", str(path), token=None)
    t = small_table(3)
    with cs.open_store(f"{svc.url}?token={token}") as store:
        store.put("tf/a", t)
        assert store.get("tf/a").equals(t)
    for url in (svc.url, f"{svc.url}?token={token}x"):
        with cs.open_store(url) as store:
            with pytest.raises(cs.PermissionDeniedError):
                store.list("")
    assert svc.stop() == 0
    out = service_output(svc)
    assert token not in out, out


# -- 2. TLS -------------------------------------------------------------------------------------
def test_tls(services, tmp_path):
    """flight+tls:// with ?ca= round-trips a table; a plain flight:// client, or one that does
    not trust the certificate, fails promptly with a StoreError."""
    cert, key = make_tls_cert(tmp_path)
    svc = services("--tls-cert", cert, "--tls-key", key)
    assert svc.url.startswith("flight+tls://127.0.0.1:")
    t = table_of(3 * MiB, seed=1)
    with cs.open_store(svc.store_url(ca=cert)) as store:
        store.put("tls/a", t)
        assert store.get("tls/a").equals(t)
        assert store.list("tls/") == ["tls/a"]

    plain = svc.url.replace("flight+tls://", "flight://", 1)
    for url in (f"{plain}?token={svc.token}&call_timeout=5&retries=1",
                svc.store_url(call_timeout=5, retries=1)):  # TLS, but no CA: not trusted
        t0 = time.monotonic()
        with cs.open_store(url) as store:
            with pytest.raises(cs.StoreError):
                store.put("tls/b", small_table())
        assert time.monotonic() - t0 < 30, "the refused connection hung"
    with cs.open_store(svc.store_url(ca=cert)) as store:
        assert store.list("") == ["tls/a"]


# -- 3. spilling --------------------------------------------------------------------------------
def test_spill_to_disk_reads_back_and_gives_everything_back(services, tmp_path):
    """Above the high watermark writes go to the spill directory (and keep going there until
    memory drops below the low one); spilled objects read back whole (get, get_batches, byte
    ranges); deleting them empties the directory, and so does stopping the service."""
    spill = tmp_path / "spill"
    svc = services("--memory-limit", "4MiB", "--spill-dir", str(spill))
    # 1.5 MiB tables: two fill memory past the low watermark (70%), a third would pass the
    # high one (90%), so the service is observably spilling between calls.
    tables = {f"sp/{i}": table_of(int(1.5 * MiB), seed=i) for i in range(5)}
    seen = []
    with cs.open_store(svc.store_url()) as store:
        for k, t in tables.items():
            store.put(k, t)
            seen.append(server_stats(store))
        last = seen[-1]
        assert last["objects"] == 5
        assert last["objects_on_disk"] >= 3 and last["bytes_disk"] > 0, last
        assert any(s["spilling"] for s in seen), seen
        assert last["bytes_memory"] <= 4 * MiB
        assert spill_files(spill), "nothing was written to the spill directory"

        # While spilling, even a small write goes to disk (hysteresis), ...
        before = server_stats(store)
        assert before["spilling"], before
        store.put("sp/small-1", small_table(1))
        after = server_stats(store)
        assert after["objects_on_disk"] == before["objects_on_disk"] + 1, (before, after)
        assert after["bytes_memory"] == before["bytes_memory"]

        for k, t in tables.items():
            assert store.get(k).equals(t), k
            assert store.get_batches(k).read_all().equals(t), k
            size = store.head(k).size
            whole = store.get_bytes(k).to_pybytes()
            assert len(whole) == size
            part = store.get_bytes(k, (1000, size - 17))
            assert part.to_pybytes() == whole[1000:size - 17], k

        # ... until deletions bring memory below the low watermark: then writes use memory.
        store.delete("sp/0")   # the first two tables are the ones in memory
        st = server_stats(store)
        assert st["bytes_memory"] < before["bytes_memory"] and not st["spilling"], (before, st)
        store.put("sp/small-2", small_table(2))
        st2 = server_stats(store)
        assert st2["bytes_memory"] > st["bytes_memory"] and \
            st2["objects_on_disk"] == st["objects_on_disk"], (st, st2)

        store.delete_many(store.list(""))
        st = server_stats(store)
        assert st["objects"] == 0 and st["objects_on_disk"] == 0, st
        assert st["bytes_disk"] == 0 and st["bytes_memory"] == 0 and st["memory_reserved"] == 0
        assert spill_files(spill) == []

        # Stopping the service removes what is still spilled.
        for k in list(tables)[:4]:
            store.put(k, tables[k])
        assert server_stats(store)["objects_on_disk"] > 0
        assert spill_files(spill)
    assert svc.stop() == 0
    assert spill_files(spill) == []
    assert os.listdir(spill) == []


def test_write_above_the_limit_without_spill_dir(services):
    """Without a spill directory, a write that does not fit fails with PayloadTooLargeError
    naming the memory limit, and leaves nothing behind (a table, and a streamed put)."""
    svc = services("--memory-limit", "4MiB")
    with cs.open_store(svc.store_url(retries=1)) as store:
        with pytest.raises(cs.PayloadTooLargeError) as info:
            store.put("full/a", table_of(5 * MiB, seed=1))
        message = str(info.value)
        assert "memory" in message and str(4 * MiB) in message, message
        assert store.list("") == []
        st = server_stats(store)
        assert st["objects"] == 0 and st["bytes_memory"] == 0 and st["memory_reserved"] == 0, st

        kept = table_of(1 * MiB, seed=2)
        store.put("full/kept", kept)
        batches = table_of(6 * MiB, seed=3).to_batches(max_chunksize=64 << 10)
        with pytest.raises(cs.PayloadTooLargeError):
            store.put("full/stream", iter(batches))
        assert store.list("") == ["full/kept"]
        st = server_stats(store)
        assert st["objects"] == 1 and st["memory_reserved"] == st["bytes_memory"], st
        assert store.get("full/kept").equals(kept)


# -- 4. a payload that fails midway ---------------------------------------------------------------
def failing_batches(n_ok: int, rows: int, before_raising=lambda: None):
    for i in range(n_ok):
        yield pa.record_batch({"x": np.full(rows, i, dtype=np.float64)})
    before_raising()
    raise RuntimeError("the payload broke midway")


@pytest.mark.parametrize("spill", [False, True], ids=["memory", "spill-dir"])
def test_put_whose_payload_raises_stores_nothing(services, tmp_path, spill):
    """A put whose batch iterator raises re-raises that error and stores nothing (no object,
    no reserved memory, no spill file)."""
    spill_dir = tmp_path / "spill"
    args = ("--memory-limit", "4MiB", "--spill-dir", str(spill_dir)) if spill else ()
    svc = services(*args)
    # In the spill case, the payload fails only once the put is being written to disk.
    on_disk = (lambda: wait_until(lambda: spill_files(spill_dir), 20, "the put spilled")) \
        if spill else (lambda: None)
    with cs.open_store(svc.store_url()) as store:
        with pytest.raises(RuntimeError, match="broke midway"):
            store.put("fail/a", failing_batches(3, 2 * MiB // 8, on_disk))
        assert not store.exists("fail/a")
        st = wait_until(lambda: (lambda s: s if s["memory_reserved"] == 0 else None)(
            server_stats(store)), 10, "the failed put's reservation given back")
        assert st["objects"] == 0 and st["bytes_memory"] == 0 and st["bytes_disk"] == 0, st
        if spill:
            wait_until(lambda: spill_files(spill_dir) == [], 10, "the temporary spill file removed")
        # The service is fine afterwards.
        store.put("fail/b", small_table())
        assert store.list("") == ["fail/b"]


# -- 5. expiry and clean-up -----------------------------------------------------------------------
def test_ttl_expires_idle_groups_only(services):
    """--ttl: a group without requests for ttl seconds is removed whole (objects, channels),
    while a group kept busy stays; once idle it goes too."""
    svc = services("--ttl", "1")
    with cs.open_store(svc.store_url()) as store:
        store.put("_cylon/jobA/x", small_table(1))
        store.put("other/y", small_table(2))
        store.notify("other/ch", b"left behind")
        end = time.monotonic() + 2.2
        while time.monotonic() < end:
            store.head("_cylon/jobA/x")  # touches group _cylon/jobA/ only
            time.sleep(0.3)
        assert store.list("") == ["_cylon/jobA/x"]   # list("") touches no group
        st = server_stats(store)
        assert st["objects"] == 1 and st["channels"] == 0, st

        time.sleep(1.5)
        wait_until(lambda: store.list("") == [], 10, "the idle job group expired")
        st = server_stats(store)
        assert st["objects"] == 0 and st["bytes_memory"] == 0 and st["groups"] == 0, st


def test_cli_clean_removes_job_keys(services):
    """`cylon-store clean URL [--job J] [--dry-run]` over flight:// (token from the environment)
    deletes the job keys under _cylon/ and the job's counter, nothing else, printing no token."""
    svc = services()
    url = svc.url
    with cs.open_store(svc.store_url()) as store:
        for k in ("_cylon/jobA/x", "_cylon/jobA/run/y", "_cylon/jobB/z", "keep/me"):
            store.put(k, small_table())
        store.incr("_cylon/jobA/counter")
        assert server_stats(store)["counters"] == 1

        r = run_cli("clean", url, "--dry-run", token=svc.token)
        assert r.returncode == 0, r.stderr
        assert "_cylon/jobA/x" in r.stdout and "would delete 3" in r.stdout, r.stdout
        assert len(store.list("")) == 4

        r = run_cli("clean", url, "--job", "jobA", token=svc.token)
        assert r.returncode == 0, r.stderr
        assert "deleted 2" in r.stdout, r.stdout
        assert store.list("") == ["_cylon/jobB/z", "keep/me"]
        assert server_stats(store)["counters"] == 0

        r = run_cli("clean", url, token=svc.token)
        assert r.returncode == 0, r.stderr
        assert store.list("") == ["keep/me"]
        assert svc.token not in r.stdout + r.stderr

        r = run_cli("clean", url)  # no token: refused, one line, exit 1
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert store.list("") == ["keep/me"]


# -- 6. concurrency -------------------------------------------------------------------------------
def rank_allgather_exchange(comm):
    me, P = comm.rank, comm.world_size
    gathered = comm.allgather(pa.table({"rank": [me], "sq": [me * me]}))
    parts = [pa.table({"src": [me], "dst": [d], "v": [me * 1000 + d]}) for d in range(P)]
    received = comm.exchange(parts)
    comm.barrier()
    return ([(t["rank"][0].as_py(), t["sq"][0].as_py()) for t in gathered],
            sorted((row["src"], row["dst"], row["v"]) for t in received for row in t.to_pylist()))


@pytest.mark.slow
def test_64_ranks_as_threads(services):
    """64 concurrent ranks over one service: allgather and exchange deliver every rank's data
    exactly once, and the job leaves nothing behind."""
    svc = services()
    P = 64
    results = cs.launch(rank_allgather_exchange, P, store=svc.store_url(prefix="c64/"),
                        launcher="threads", timeout=240, comm_timeout=120)
    assert len(results) == P
    for dst, (gathered, received) in enumerate(results):
        assert gathered == [(r, r * r) for r in range(P)], dst
        assert received == [(src, dst, src * 1000 + dst) for src in range(P)], dst
    with cs.open_store(svc.store_url()) as store:
        assert store.list("") == []


def test_64_concurrent_waiters(services):
    """64 threads blocked in wait() on their own channels: each gets exactly its own message."""
    svc = services()
    n = 64
    got: dict = {}
    errors: list = []
    with cs.open_store(svc.store_url()) as store:
        server_stats(store)  # connected before the threads start

        def waiter(i):
            try:
                got[i] = store.wait(f"w/ch{i}", 60)
            except BaseException as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=waiter, args=(i,), daemon=True) for i in range(n)]
        for th in threads:
            th.start()
        wait_until(lambda: server_stats(store)["requests"].get("wait", 0) >= n, 30,
                   "all waiters blocked in the service")
        time.sleep(0.2)
        for i in range(n):
            store.notify(f"w/ch{i}", f"message {i}".encode())
        for th in threads:
            th.join(30)
        assert not any(th.is_alive() for th in threads), "a waiter was not released"
        assert errors == []
        assert got == {i: [f"message {i}".encode()] for i in range(n)}
        assert server_stats(store)["channels"] == 0


# -- 7. graceful shutdown -------------------------------------------------------------------------
def stop_in_thread(svc) -> tuple:
    codes: list = []
    th = threading.Thread(target=lambda: codes.append(svc.stop(signal.SIGTERM, timeout=60)))
    th.start()
    return th, codes


def assert_refused_promptly(svc):
    """After shutdown a new call is a TransientError, not a hang."""
    t0 = time.monotonic()
    with cs.open_store(svc.store_url(retries=1, call_timeout=3)) as store:
        with pytest.raises(cs.TransientError):
            store.list("")
    assert time.monotonic() - t0 < 30


def test_sigterm_during_a_large_put(services):
    """SIGTERM while a 64 MiB put runs: the put completes whole or fails with a StoreError
    (never anything else, never a hang), and the service exits 0."""
    svc = services()
    big = pa.table({"x": np.arange(8 * MiB, dtype=np.float64)})  # 64 MiB
    outcome: dict = {}
    with cs.open_store(svc.store_url(retries=1, call_timeout=60)) as store:
        server_stats(store)

        def put():
            try:
                outcome["info"] = store.put("big", big)
            except BaseException as exc:
                outcome["error"] = exc
        putter = threading.Thread(target=put, daemon=True)
        putter.start()
        wait_until(lambda: not putter.is_alive() or
                   server_stats(store)["requests"].get("put", 0) >= 1, 30, "the put started")
        stopper, codes = stop_in_thread(svc)
        stopper.join(90)
        putter.join(90)
        assert not putter.is_alive() and not stopper.is_alive()
        assert codes == [0]
        if "error" in outcome:
            assert isinstance(outcome["error"], cs.StoreError), full_text(outcome["error"])
        else:
            assert outcome["info"]["rows"] == big.num_rows
        with pytest.raises(cs.TransientError):
            store.head("big")
    assert_refused_promptly(svc)


def test_sigterm_during_a_streamed_put(services):
    """A streamed put still sending when SIGTERM arrives ends with success or a StoreError, the
    service exits 0 after it, and later calls are refused."""
    svc = services()
    outcome: dict = {}

    def slow_batches():
        for i in range(16):
            yield pa.record_batch({"x": np.full(512 << 10, i, dtype=np.float64)})  # 4 MiB
            time.sleep(0.08)

    with cs.open_store(svc.store_url(retries=1, call_timeout=60)) as store:
        server_stats(store)

        def put():
            try:
                outcome["info"] = store.put("slow", slow_batches())
            except BaseException as exc:
                outcome["error"] = exc
        putter = threading.Thread(target=put, daemon=True)
        putter.start()
        wait_until(lambda: server_stats(store)["requests"].get("put", 0) >= 1, 30,
                   "the put started")
        stopper, codes = stop_in_thread(svc)
        putter.join(90)
        stopper.join(90)
        assert not putter.is_alive() and not stopper.is_alive()
        assert codes == [0]
        if "error" in outcome:
            assert isinstance(outcome["error"], cs.StoreError), full_text(outcome["error"])
        else:
            assert outcome["info"]["rows"] == 16 * (512 << 10)
    assert_refused_promptly(svc)


@pytest.mark.slow
def test_put_still_streaming_after_the_grace_period_is_refused(services):
    """Shutdown does not wait for a slow upload forever: a put still sending when ``--grace``
    ends is refused (a StoreError on the client) and the service is gone within grace + 10 s,
    long before the upload would have finished (exit 1 when gRPC still held the call and it
    had to be abandoned)."""
    svc = services("--grace", "1")
    outcome: dict = {}

    def slow_batches():
        for i in range(32):               # would take ~13 s
            yield pa.record_batch({"x": np.full(1024, i, dtype=np.float64)})
            time.sleep(0.4)

    with cs.open_store(svc.store_url(retries=1, call_timeout=60)) as store:
        server_stats(store)

        def put():
            try:
                outcome["info"] = store.put("slow", slow_batches())
            except BaseException as exc:
                outcome["error"] = exc
        putter = threading.Thread(target=put, daemon=True)
        putter.start()
        wait_until(lambda: server_stats(store)["requests"].get("put", 0) >= 1, 30,
                   "the put started")
        t0 = time.monotonic()
        stopper, codes = stop_in_thread(svc)
        stopper.join(60)
        assert codes in ([0], [1]) and time.monotonic() - t0 < 25, codes
        putter.join(60)       # the client notices at its next write or at the commit
        assert isinstance(outcome.get("error"), cs.StoreError), outcome


def test_sigterm_releases_a_waiter(services):
    """A client blocked in wait(ch, 30) is released promptly by SIGTERM (StoreError or [])."""
    svc = services()
    outcome: dict = {}
    with cs.open_store(svc.store_url(retries=1)) as store:
        server_stats(store)

        def waiter():
            t0 = time.monotonic()
            try:
                outcome["value"] = store.wait("sd/ch", 30)
            except BaseException as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - t0
        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        wait_until(lambda: server_stats(store)["requests"].get("wait", 0) >= 1, 30,
                   "the waiter is blocked")
        assert svc.stop() == 0
        th.join(40)
        assert not th.is_alive()
        assert outcome["seconds"] < 15, outcome
        if "error" in outcome:
            assert isinstance(outcome["error"], cs.StoreError), full_text(outcome["error"])
        else:
            assert outcome["value"] == []


# -- 8. the stats action --------------------------------------------------------------------------
def test_stats_counts_requests_and_bytes(services):
    """server_stats(): requests by kind at least as many as made; bytes_memory is the sum of
    the stored objects' sizes (an overwrite counts once)."""
    svc = services()
    with cs.open_store(svc.store_url()) as store:
        keys = [f"st/{i}" for i in range(5)]
        for i, k in enumerate(keys):
            store.put(k, table_of((i + 1) * 10_000, seed=i))
        store.put(keys[0], table_of(123_456, seed=99))   # overwrite: a different size
        store.put_bytes("st/raw", b"0123456789")
        puts = len(keys) + 2
        for k in keys:
            store.get(k)
        gets = len(keys)
        for k in keys + ["st/raw"]:
            store.head(k)
        heads = len(keys) + 1
        for _ in range(3):
            store.list("st/")
        st = server_stats(store)
        req = st["requests"]
        assert req.get("put", 0) >= puts and req.get("get", 0) >= gets, req
        assert req.get("head", 0) >= heads and req.get("list", 0) >= 3, req
        sizes = {k: store.head(k).size for k in store.list("")}
        assert len(sizes) == len(keys) + 1
        assert st["objects"] == len(sizes)
        assert st["bytes_memory"] == sum(sizes.values()), (st, sizes)
        assert st["memory_reserved"] == st["bytes_memory"]
        assert st["bytes_disk"] == 0 and st["objects_on_disk"] == 0
        assert st["bytes_in"] >= sum(sizes.values())
        assert st["memory_limit"] == 2 << 30 and st["spilling"] is False


# -- protocol robustness (raw Flight calls) --------------------------------------------------------
def test_malformed_puts_are_refused_as_invalid(services):
    """Raw DoPuts that break the protocol (not msgpack, more than declared, a wrong commit, no
    commit, a bad mode) are refused with code Invalid and store nothing."""
    svc = services()
    client = fl.FlightClient(grpc_location(svc))
    opts = call_options(svc.token)
    try:
        def refused(fn):
            with pytest.raises(fl.FlightServerError) as info:
                fn()
            assert info.value.extra_info == b"Invalid", (info.value.extra_info, str(info.value))

        def bad_descriptor():
            w, r = client.do_put(fl.FlightDescriptor.for_command(b"\xc1 not msgpack"), SCHEMA, opts)
            w.write_batch(data_batch(pa.py_buffer(b"x")))
            w.done_writing()
            r.read()
            w.close()

        def bad_mode():
            desc = fl.FlightDescriptor.for_command(msgpack.packb({"k": "p/m", "m": "append"}))
            w, r = client.do_put(desc, SCHEMA, opts)
            w.done_writing()
            r.read()
            w.close()

        refused(bad_descriptor)
        refused(bad_mode)
        refused(lambda: raw_put(client, svc.token, "p/a", b"x" * 10, declared=5))
        refused(lambda: raw_put(client, svc.token, "p/b", b"x" * 10, declared=20))
        refused(lambda: raw_put(client, svc.token, "p/c", b"x" * 10, declared=None, commit=7))
        refused(lambda: raw_put(client, svc.token, "p/d", b"x" * 10, commit=None))
        refused(lambda: list(client.do_action(fl.Action("nuke", b""), opts)))
        assert raw_put(client, svc.token, "p/ok", b"y" * 10) is None   # no reply message
    finally:
        client.close()
    with cs.open_store(svc.store_url()) as store:
        assert store.list("") == ["p/ok"]
        st = server_stats(store)
        assert st["bytes_memory"] == 10 and st["memory_reserved"] == 10, st
        assert store.get_bytes("p/ok").to_pybytes() == b"y" * 10


def test_malformed_tickets_and_actions_are_refused_as_invalid(services):
    """A DoGet ticket or an action body without its key is refused with code Invalid (the
    documented code for malformed requests), not an uncoded Python traceback."""
    svc = services()
    client = fl.FlightClient(grpc_location(svc))
    opts = call_options(svc.token)
    try:
        calls = {
            "get without k": lambda: client.do_get(fl.Ticket(msgpack.packb({"r": None})),
                                                   opts).read_all(),
            "head without k": lambda: list(client.do_action(
                fl.Action("head", msgpack.packb({})), opts)),
        }
        codes = {}
        for name, fn in calls.items():
            with pytest.raises((fl.FlightError, pa.ArrowException)) as info:
                fn()
            codes[name] = (getattr(info.value, "extra_info", None),
                           "Traceback" in str(info.value))
        assert codes == {name: (b"Invalid", False) for name in calls}, codes
    finally:
        client.close()


# -- 9. the command line --------------------------------------------------------------------------
def test_serve_help_mentions_docker():
    """`cylon-store serve --help` exits 0 and tells how to run the service in a container."""
    r = run_cli("serve", "--help")
    assert r.returncode == 0, r.stderr
    assert "Dockerfile" in r.stdout or "docker" in r.stdout.lower()
    assert "--token-file" in r.stdout and "--spill-dir" in r.stdout


@pytest.mark.parametrize("args, expected", [
    (["--host", "0.0.0.0"], "without a token"),
    (["--ttl", "0"], "--ttl"),
    (["--memory-limit", "3x"], "--memory-limit"),
    (["--port", "70000"], "--port"),
    (["--tls-cert", "MISSING-CERT.pem"], "--tls-cert"),
    (["--tls-cert", "{cert}"], "--tls-key"),
    (["--tls-key", "{key}"], "--tls-cert"),
    (["--token-file", "{missing}"], "--token-file"),
    (["--token-file", "{empty}"], "empty"),
], ids=["public-host-no-token", "ttl-0", "memory-limit-3x", "port-70000", "tls-cert-missing",
        "tls-cert-without-key", "tls-key-without-cert", "token-file-missing", "token-file-empty"])
def test_serve_rejects_bad_arguments(args, expected, tmp_path):
    """Bad `serve` arguments exit 2 with a one-line error naming the problem (no traceback)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not really a certificate\n")
    key.write_text("not really a key\n")
    (tmp_path / "empty").write_text("  \n")
    subst = {"cert": str(cert), "key": str(key), "missing": str(tmp_path / "nope"),
             "empty": str(tmp_path / "empty")}
    r = run_cli("serve", *[a.format(**subst) for a in args], timeout=30)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "serving" not in r.stdout, r.stderr
    line = last_line(r.stderr)
    assert line.startswith("cylon-store serve: error:") and expected in line, r.stderr


def test_serve_that_cannot_bind_leaves_nothing_behind(tmp_path):
    """A service whose port is taken exits 1 with one line saying so, and leaves nothing in its
    spill directory."""
    spill = tmp_path / "spill"
    spill.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve", "--port", str(port), "--spill-dir", str(spill), timeout=30)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert last_line(r.stderr).startswith("cylon-store serve: cannot serve on"), r.stderr
    assert list(os.walk(spill)) == [(str(spill), [], [])], list(os.walk(spill))


# -- 10. Lambda ranks over the service -------------------------------------------------------------
def rank_on_lambda(comm):
    exchanges = rank_collectives(comm)
    return exchanges, rank_allgather_exchange(comm)


def test_lambda_local_over_flight(services, tmp_path):
    """launcher='lambda-local' ranks (separate processes, as on Lambda) meet at the service:
    collectives give the right values, nothing is left, and no log or report holds the token."""
    svc = services()
    url = svc.store_url(prefix="lam/")
    log_path = tmp_path / "lambda.log"
    with open(log_path, "w") as log:
        values, report = cs.launch(rank_on_lambda, 2, store=url, launcher="lambda-local",
                                   local_options={"concurrency": 2, "log": log},
                                   comm_timeout=60, timeout=120, report=True)
    assert len(values) == 2
    assert values[0][0] == values[1][0]   # the same number of exchanges on both ranks
    for dst, (_, (gathered, received)) in enumerate(values):
        assert gathered == [(0, 0), (1, 1)]
        assert received == [(src, dst, src * 1000 + dst) for src in range(2)]
    assert report.store == "flight"
    assert svc.token not in repr(report) and svc.token not in str(report.to_dict())
    assert svc.token not in log_path.read_text()
    with cs.open_store(svc.store_url()) as store:
        assert store.list("") == []


# -- 11. bad URLs and a service that is not there ------------------------------------------------
@pytest.mark.parametrize("url, expected", [
    ("flight://nohost", "host:port"),
    ("flight://h:99999", "99999"),
    ("flight://h:0", "host:port"),
    ("flight://:8815", "host:port"),
    ("flight://user:pw-SECRET-123@h:1", "token"),
    ("flight+tls://h:1?ca=/no/such/ca.pem", "ca"),
    ("flight://h:1?call_timeout=0", "call_timeout"),
])
def test_bad_urls_are_config_errors(url, expected):
    """A malformed flight:// URL is a ConfigError naming the problem, never showing a password."""
    with pytest.raises(cs.ConfigError) as info:
        cs.open_store(url)
    text = full_text(info.value)
    assert expected in str(info.value), str(info.value)
    assert "pw-SECRET-123" not in text, text


def test_service_not_running_is_transient_and_prompt():
    """A flight:// store whose service is not running fails its first call with TransientError
    within seconds (retries=1, call_timeout=3), instead of hanging."""
    port = free_port()
    t0 = time.monotonic()
    with cs.open_store(f"flight://127.0.0.1:{port}?retries=1&call_timeout=3") as store:
        for op in (lambda: store.list(""), lambda: store.put("x/y", small_table()),
                   lambda: store.get("x/y")):
            with pytest.raises(cs.TransientError):
                op()
    assert time.monotonic() - t0 < 30
