"""Redis-specific behaviour, against real redis-server processes on loopback: AUTH, TLS, a
one-node cluster, faults mid-transfer (client kill, server restart) handled by retry without a
torn value, maxmemory, atomic visibility of chunked values, TTLs, blocking wake-up, and the
counter rendezvous of independent OS processes.  (The conformance and communicator suites run
on Redis through tests/servers/redis.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pyarrow as pa
import pytest

import cylon_store as cs
from cylon_store.adapters import redis as R

from servers import started_backend as _backend
from servers import free_port
from servers.redis import launch, launch_cluster, make_tls_cert


# -- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The session's redis-server (shared with the conformance and communicator suites)."""
    return _backend("redis", tmp_path_factory).traits["server"]


@pytest.fixture
def url(server) -> str:
    return server.url(prefix=f"t-{uuid.uuid4().hex[:12]}:")


@pytest.fixture
def private(tmp_path):
    """A redis-server of this test alone (for faults, limits and passwords)."""
    servers = []

    def start(*args, **kw):
        s = launch(tmp_path, *args, **kw)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


def prefix_of(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["prefix"]


def redis_keys(client, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=R.glob_escape(prefix.encode()) + b"*", count=1000))


def table(nbytes: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"x": rng.random(max(1, nbytes // 8)), "tag": np.full(max(1, nbytes // 8), seed)})


def kill_clients(client) -> None:
    """CLIENT KILL every normal connection but the killer's own."""
    client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")


# -- configuration --------------------------------------------------------------------------
def test_import_does_not_load_redis():
    code = ("import sys, cylon_store as cs\n"
            "assert 'redis' in cs.registry.schemes() and 'rediss' in cs.registry.schemes()\n"
            "assert 'redis' not in sys.modules, 'import cylon_store loaded redis-py'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_options_and_url(server, url):
    with cs.open_store(url, chunk_size="64KiB", ttl=30, hash_tag="key") as store:
        cfg = store.adapter.config
        assert (cfg.chunk_size, cfg.ttl, cfg.hash_tag) == (65536, 30.0, "key")
    with pytest.raises(cs.ConfigError, match="chunk_sise"):
        cs.open_store(url, chunk_sise=1)
    with pytest.raises(cs.ConfigError, match="database number"):
        cs.open_store(f"redis://127.0.0.1:{server.port}/zero")
    with pytest.raises(cs.ConfigError, match="prefix"):
        cs.open_store(url.split("?")[0], prefix="a{b}")
    with pytest.raises(cs.ConfigError, match="chunk_size"):
        cs.open_store(url, chunk_size="1GiB")
    with pytest.raises(cs.ConfigError, match="rediss"):
        cs.open_store(url, tls_ca_certs="/x.pem")
    secret = f"redis://user:s3cret@127.0.0.1:{server.port}/0"
    with cs.open_store(secret) as store:
        assert "s3cret" not in repr(store) and "s3cret" not in store.adapter.describe()
        assert "s3cret" not in repr(store.adapter.config)


def test_special_keys_and_prefixes(url, server):
    """Braces (hash-tag syntax) and glob characters in keys and list prefixes are data."""
    keys = ["a{b}/c", "a{b}/d*", "a{/x", "}/y", "glob/*", "glob/?", "glob/[ab]", "glob/\u00e9t\u00e9",
            "sp ace/k", "p/q/r"]
    with cs.open_store(url) as store:
        for k in keys:
            store.put_bytes(k, k.encode())
        assert store.list("") == sorted(keys)
        assert store.list("a{b}/") == ["a{b}/c", "a{b}/d*"]
        assert store.list("a{") == ["a{/x", "a{b}/c", "a{b}/d*"]
        assert store.list("glob/*") == ["glob/*"]
        assert store.list("glob/[") == ["glob/[ab]"]
        assert store.list("glob/?") == ["glob/?"]
        for k in keys:
            assert bytes(memoryview(store.get_bytes(k))) == k.encode()
        store.delete_many(keys)
        assert store.list("") == []
    assert redis_keys(server.client(), prefix_of(url)) == []


def test_foreign_value_is_integrity_error(url, server):
    with cs.open_store(url) as store:
        rkey = store.adapter.keys.record("foreign")
        server.client().set(rkey, b"not ours")
        with pytest.raises(cs.IntegrityError) as info:
            store.get("foreign")
        assert info.value.key == "foreign" and "redis" in str(info.value)
        assert store.list("") == []   # foreign values are not listed as objects
        store.delete("foreign")


def test_lost_chunk_is_integrity_error(url, server):
    """A chunk removed behind the store's back (eviction) is reported, not retried forever."""
    with cs.open_store(url, chunk_size="64KiB") as store:
        store.put_bytes("lost", os.urandom(300_000))
        chunks = [k for k in redis_keys(server.client(), prefix_of(url)) if b":d:" in k]
        assert len(chunks) == 5
        server.client().delete(chunks[2])
        with pytest.raises(cs.IntegrityError, match="missing"):
            store.get_bytes("lost")
        store.delete("lost")
    assert redis_keys(server.client(), prefix_of(url)) == []


# -- chunking and atomic visibility ---------------------------------------------------------
@pytest.mark.parametrize("nbytes", [0, 100, 65536 - 64, 65536, 65537, 1_000_003])
def test_chunk_boundaries(url, nbytes):
    data = os.urandom(nbytes)
    with cs.open_store(url, chunk_size="64KiB") as store:
        pieces = [data[:7], memoryview(data)[7:70_000], pa.py_buffer(data[70_000:])]
        assert store.put_bytes("cb", pieces) == nbytes
        assert store.head("cb").size == nbytes
        assert bytes(memoryview(store.get_bytes("cb"))) == data
        for start, end in ((0, 1), (65535, 65537), (1000, nbytes + 10), (nbytes, nbytes),
                           (nbytes // 3, 2 * nbytes // 3), (nbytes + 5, nbytes + 9)):
            got = bytes(memoryview(store.get_bytes("cb", byte_range=(start, end))))
            assert got == data[start:end], (start, end)
        store.delete("cb")


def test_parsed_reader_fallback(url, monkeypatch):
    """Without direct socket reads (redis-py's parser instead) every read path still works."""
    monkeypatch.setattr(R, "DIRECT_READS", False)
    data = os.urandom(200_000)
    with cs.open_store(url, chunk_size="64KiB") as store:
        for key, value in (("inline", data[:5000]), ("chunked", data)):
            store.put_bytes(key, value)
            assert bytes(memoryview(store.get_bytes(key))) == value
            assert bytes(memoryview(store.get_bytes(key, byte_range=(100, 150_000)))) == value[100:150_000]
        t = table(300_000, 4)
        store.put("t", t)
        assert store.get("t").equals(t) and store.get_batches("t").read_all().equals(t)
        with pytest.raises(cs.NotFoundError):
            store.get("missing")
        store.delete_many(["inline", "chunked", "t"])


def test_chunked_put_invisible_until_commit(url, server):
    """A streaming multi-chunk put: its chunks are in Redis, the object is not visible."""
    paused, resume = threading.Event(), threading.Event()
    batch = table(256 << 10, 1).to_batches()[0]

    def batches():
        for i in range(12):
            if i == 8:
                paused.set()
                assert resume.wait(30)
            yield batch

    with cs.open_store(url, chunk_size="256KiB") as store, cs.open_store(url) as reader:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("info", store.put("obj", batches())))
        t.start()
        assert paused.wait(30)
        chunks = [k for k in redis_keys(server.client(), prefix_of(url)) if b":d:" in k]
        assert len(chunks) >= 6, "chunks are written before the commit record"
        assert not reader.exists("obj") and reader.list("") == []
        with pytest.raises(cs.NotFoundError):
            reader.get("obj")
        resume.set()
        t.join(30)
        assert result["info"]["batches"] == 12
        assert reader.get("obj").num_rows == 12 * batch.num_rows


def test_overwrites_never_torn(url):
    """Readers racing a writer that replaces multi-chunk values see one version or the other."""
    a, b = table(700_000, 1), table(900_000, 2)
    stop = threading.Event()
    errors, reads = [], [0]
    with cs.open_store(url, chunk_size="64KiB") as store:
        store.put("race", a)

        def writer():
            i = 0
            while not stop.is_set():
                store.put("race", b if i % 2 else a)
                i += 1

        def reader(streaming):
            with cs.open_store(url) as mine:
                while not stop.is_set():
                    try:
                        got = mine.get_batches("race").read_all() if streaming else mine.get("race")
                    except cs.PreconditionError:
                        continue   # a streaming read pinned to a version that was replaced
                    except Exception as exc:  # noqa: BLE001
                        errors.append(exc)
                        return
                    if not (got.equals(a) or got.equals(b)):
                        errors.append(AssertionError("torn read"))
                        return
                    reads[0] += 1

        threads = [threading.Thread(target=writer)] + [
            threading.Thread(target=reader, args=(s,)) for s in (False, True)]
        for t in threads:
            t.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[0]
    assert reads[0] > 5


def test_ttl_on_every_key(url, server):
    client = server.client()
    with cs.open_store(url, ttl=30, chunk_size="64KiB") as store:
        store.put("small", table(1000, 1))
        store.put("big", table(300_000, 2))
        store.adapter.notify("chan")
        store.adapter.incr("count")
        keys = redis_keys(client, prefix_of(url))
        assert len(keys) >= 8
        ttls = {k: client.pttl(k) for k in keys}
        assert all(0 < t <= (30 + R.CHUNK_TTL_MARGIN) * 1000 for t in ttls.values()), ttls
        record = client.pttl(store.adapter.keys.record("big"))
        assert record <= 30_000
        assert all(t > record for k, t in ttls.items() if b":d:" in k)
        store.delete_many(["small", "big"])
        store.adapter.wait("chan", 0)
        store.adapter.delete_counter("count")
    assert redis_keys(client, prefix_of(url)) == []
    with cs.open_store(url) as store:  # no ttl option: keys persist
        store.put("k", table(10, 1))
        assert client.pttl(store.adapter.keys.record("k")) == -1
        store.delete("k")


# -- notification and counter ---------------------------------------------------------------
def test_blocking_wakeup(url, server):
    with cs.open_store(url) as store:
        a = store.adapter
        t0 = time.monotonic()
        assert a.wait("ch", 0) == [] and time.monotonic() - t0 < 0.5   # drains, never blocks
        threading.Timer(0.3, a.notify, args=("ch", b"key/1")).start()
        t0 = time.monotonic()
        assert a.wait("ch", 10) == [b"key/1"]
        assert 0.2 < time.monotonic() - t0 < 3, "woken by the notification, not the timeout"
        for i in range(5):
            a.notify("ch", b"k%d" % i)
        assert a.wait("ch", 10) == [b"k0", b"k1", b"k2", b"k3", b"k4"]   # one wait takes all
        assert a.wait("ch", 0.05) == []
        assert a.wait("ch", 0) == []
    assert redis_keys(server.client(), prefix_of(url)) == []


def test_notification_off_polls(url):
    with cs.open_store(url, notification=False) as store:
        assert store.capabilities.notification is False
        with pytest.raises(cs.NotSupportedError):
            store.adapter.notify("ch")
        assert store.capabilities.atomic_counter


RANK_CODE = """
import json, os, sys, pyarrow as pa, cylon_store as cs
url, job = sys.argv[1], sys.argv[2]
c = cs.connect(url, job=job, world_size=8, timeout=120, info={"addr": f"proc-{os.getpid()}"})
addrs = [m["info"]["addr"] for m in c.members]
out = c.exchange([pa.table({"src": [c.rank], "dst": [d]}) for d in range(8)])
ok = all(t["src"][0].as_py() == s and t["dst"][0].as_py() == c.rank for s, t in enumerate(out))
total = c.allreduce(c.rank)
print(json.dumps({"rank": c.rank, "counter": c._used_counter, "addrs": addrs, "ok": ok,
                  "total": total, "me": f"proc-{os.getpid()}"}))
c.close()
"""


def test_counter_rendezvous_eight_processes(url, server):
    """8 independent processes get ranks 0..7 by INCR, all-gather their addresses, exchange,
    and leave nothing behind; the same job id then works again without flushing Redis."""
    import json
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CYLON_STORE_RANK", "CYLON_STORE_WORLD", "OMPI_", "PMI"))}
    for run in range(2):
        procs = [subprocess.Popen([sys.executable, "-c", RANK_CODE, url, "rdv-job"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
            outs.append(json.loads(out.strip().splitlines()[-1]))
        assert sorted(o["rank"] for o in outs) == list(range(8)), run
        assert all(o["counter"] and o["ok"] and o["total"] == 28 for o in outs)
        by_rank = {o["rank"]: o["me"] for o in outs}
        assert all(o["addrs"] == [by_rank[r] for r in range(8)] for o in outs)
        assert redis_keys(server.client(), prefix_of(url)) == [], f"leftovers after run {run}"


# -- errors ---------------------------------------------------------------------------------
def test_connection_refused(tmp_path):
    port = free_port()
    with cs.open_store(f"redis://127.0.0.1:{port}/0", retries=3, retry_base=0.01,
                       retry_cap=0.02) as store:
        with pytest.raises(cs.TransientError) as info:
            store.get("k")
        assert f"127.0.0.1:{port}" in str(info.value) and info.value.key == "k"
        assert store.stats()["requests"]["retries"] == 2


def test_timeout_is_transient():
    """A server that accepts and never answers: the read times out, is retried, then fails."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        with cs.open_store(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2, connect_timeout=0.5,
                           retries=2, retry_base=0.01, retry_cap=0.02) as store:
            t0 = time.monotonic()
            with pytest.raises(cs.TransientError, match="did not answer in time"):
                store.head("k")
            assert time.monotonic() - t0 < 5
            assert store.stats()["requests"]["retries"] == 1


def test_auth(private):
    srv = private(password="s3cret")
    base = f"127.0.0.1:{srv.port}/0?prefix=auth:"
    for good in (f"redis://:s3cret@{base}", f"redis://default:s3cret@{base}"):
        with cs.open_store(good) as store:
            store.put("k", table(100, 1))
            assert store.get("k").num_rows == 12
    with cs.open_store(f"redis://{base}", password="s3cret") as store:
        assert store.list("") == ["k"]
    for bad in (f"redis://:wrong@{base}", f"redis://{base}"):
        with cs.open_store(bad, retry_base=0.01) as store:
            with pytest.raises(cs.PermissionDeniedError, match="authentication|ACL") as info:
                store.get("k")
            assert isinstance(info.value, PermissionError)
            assert store.stats()["requests"].get("retries", 0) == 0, "not retried"
    # an ACL user that may not touch this prefix: NOPERM is a permission error too
    srv.client(password="s3cret").execute_command(
        "ACL", "SETUSER", "limited", "on", ">pw", "~other:*", "+@all")
    with cs.open_store(f"redis://limited:pw@{base}") as store:
        with pytest.raises(cs.PermissionDeniedError, match="ACL"):
            store.put("k", table(10, 1))


def test_no_secret_in_errors_or_repr(private):
    """The password of a redis:// URL never appears in a timeout or rendezvous error, nor in a
    store's repr (open or closed) — seen before: '(store redis://default:s3cret@...)'."""
    srv = private(password="s3cret")
    url = f"redis://default:s3cret@127.0.0.1:{srv.port}/0?prefix=leak:"
    with pytest.raises(cs.ExchangeTimeoutError) as info:
        cs.connect(url, job="leak", rank=0, world_size=2, timeout=0.5)
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    store = cs.open_store(url)
    store.put("k", table(10, 1))
    assert "s3cret" not in repr(store) and "s3cret" not in store.safe_url
    store.delete("k")
    store.close()
    assert "s3cret" not in repr(store)


def test_tls(private, tmp_path):
    cert, key = make_tls_cert(tmp_path)
    srv = private(tls=(cert, key))
    url = srv.url(prefix="tls:", tls_ca_certs=cert, chunk_size="64KiB")
    with cs.open_store(url) as store:
        assert store.adapter.describe().startswith("rediss://")
        t = table(500_000, 3)
        store.put("t", t)
        assert store.get("t").equals(t) and store.get_batches("t").read_all().equals(t)
        store.adapter.notify("c")
        assert store.adapter.wait("c", 5)
        store.delete("t")
    with cs.open_store(srv.url(prefix="tls:"), retry_base=0.01) as store:
        with pytest.raises(cs.PermissionDeniedError, match="tls_ca_certs"):
            store.list("")
        assert store.stats()["requests"].get("retries", 0) == 0
    with cs.open_store(srv.url(prefix="tls:", tls_verify="false")) as store:
        assert store.list("") == []


def test_maxmemory_clear_error_and_nothing_left(private):
    srv = private("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    client = srv.client()
    for chunk in ("1MiB", "64MiB"):   # chunked (fails mid-way) and inline (fails at commit)
        with cs.open_store(srv.url(prefix="mm:", chunk_size=chunk)) as store:
            with pytest.raises(cs.PayloadTooLargeError, match="maxmemory") as info:
                store.put("huge", table(24 << 20, 1))
            assert info.value.key == "huge" and "redis" in str(info.value)
            assert store.list("") == []
            assert redis_keys(client, "mm:") == [], "partial chunks were removed"
            deadline = time.monotonic() + 10
            while client.info("memory")["used_memory"] > 6 << 20 and time.monotonic() < deadline:
                time.sleep(0.05)   # the server frees the failed put's buffers
            store.put("small", table(1000, 2))           # the store still works
            assert store.get("small").num_rows == 125
            store.delete("small")


# -- faults mid-transfer --------------------------------------------------------------------
def _fail_once_after(monkeypatch, n_chunks: int, action):
    """Run ``action`` once, when the n-th chunk of a put is about to be sent."""
    original = R._Session.send_chunk
    state = {"calls": 0, "fired": False}

    def send_chunk(self, *a, **kw):
        state["calls"] += 1
        if state["calls"] == n_chunks and not state["fired"]:
            state["fired"] = True
            action()
        return original(self, *a, **kw)
    monkeypatch.setattr(R._Session, "send_chunk", send_chunk)
    return state


def _chunks_in_redis(client, prefix):
    return [k for k in redis_keys(client, prefix) if b":d:" in k]


def test_client_kill_mid_put_is_retried_and_never_torn(private, monkeypatch):
    srv = private()
    killer = srv.client()
    url = srv.url(prefix="kill:", chunk_size="256KiB")
    v1, v2 = table(6 << 20, 1), table(6 << 20, 2)
    with cs.open_store(url) as store:
        store.put("obj", v1)
        stop, seen, errors = threading.Event(), [], []

        def reader():
            with cs.open_store(url, retry_base=0.01) as mine:
                while not stop.is_set():
                    try:
                        got = mine.get("obj")
                    except Exception as exc:  # noqa: BLE001
                        errors.append(exc)
                        return
                    seen.append(1 if got.equals(v1) else 2 if got.equals(v2) else 0)

        t = threading.Thread(target=reader)
        t.start()
        state = _fail_once_after(monkeypatch, 6, lambda: kill_clients(killer))
        store.put("obj", v2)
        stop.set()
        t.join(30)
        assert state["fired"] and store.stats()["requests"]["retries"] >= 1
        assert not errors, errors[0]
        assert seen and 0 not in seen, "a reader saw a torn value"
        assert store.get("obj").equals(v2)
        nchunks = R.Header.parse(killer.getrange(store.adapter.keys.record("obj"), 0, 63),
                                 key="obj", op="test").nchunks
        assert len(_chunks_in_redis(killer, "kill:")) == nchunks, "the failed attempt's chunks are gone"


def test_client_kill_mid_get_is_retried(private, monkeypatch):
    srv = private()
    killer = srv.client()
    data = os.urandom(32 << 20)
    with cs.open_store(srv.url(prefix="kg:")) as store:
        store.put_bytes("big", data)
        original = R.RespReader.read_into
        fired = []

        def read_into(self, view):
            if view.nbytes >= (1 << 20) and not fired:
                fired.append(1)
                kill_clients(killer)
            return original(self, view)
        monkeypatch.setattr(R.RespReader, "read_into", read_into)
        assert bytes(memoryview(store.get_bytes("big"))) == data
        assert fired and store.stats()["requests"]["retries"] >= 1


def test_server_restart_mid_put_is_retried(private, monkeypatch):
    srv = private()
    url = srv.url(prefix="rs:", chunk_size="256KiB")
    v = table(4 << 20, 5)
    with cs.open_store(url, retries=8, retry_base=0.1) as store:
        store.put("warm", table(10, 1))
        _fail_once_after(monkeypatch, 4, srv.restart)
        store.put("obj", v)
        assert store.stats()["requests"]["retries"] >= 1
        assert store.get("obj").equals(v)
        assert store.list("") == ["obj"]   # the restart lost "warm": no persistence configured


def test_create_mode_is_not_retried(private, monkeypatch):
    """create-if-absent is not idempotent: a fault is reported, not retried, nothing is left."""
    srv = private()
    killer = srv.client()
    with cs.open_store(srv.url(prefix="cr:", chunk_size="256KiB")) as store:
        _fail_once_after(monkeypatch, 3, lambda: kill_clients(killer))
        with pytest.raises(cs.TransientError):
            store.put("c", table(2 << 20, 1), mode="create")
        assert store.stats()["requests"].get("retries", 0) == 0
        assert store.list("") == [] and redis_keys(killer, "cr:") == []
        store.put("c", table(2 << 20, 1), mode="create")
        with pytest.raises(cs.AlreadyExistsError):
            store.put("c", table(10, 1), mode="create")


# -- cluster --------------------------------------------------------------------------------
@pytest.mark.parametrize("hash_tag", ["parent", "key"])
def test_one_node_cluster(tmp_path, hash_tag):
    """Every operation through the cluster client: a CROSSSLOT anywhere would fail here."""
    srv = launch_cluster(tmp_path)
    try:
        url = srv.url(prefix="cl:", cluster="true", chunk_size="64KiB", hash_tag=hash_tag)
        with cs.open_store(url) as store:
            t = table(400_000, 1)
            for k in ("a/x", "a/y", "b/x", "c"):
                store.put(k, t)
            store.put("a/x", table(300_000, 2))
            assert store.get("a/y").equals(t) and store.get_batches("b/x").read_all().equals(t)
            assert store.list("") == ["a/x", "a/y", "b/x", "c"] and store.list("a/") == ["a/x", "a/y"]
            store.delete_many(["a/x", "a/y", "b/x", "c"])
            assert store.list("") == []
            a = store.adapter
            a.notify("ch")
            assert a.wait("ch", 2) and a.incr("n") == 1
            a.delete_counter("n")

            def rank(r):
                with cs.connect(url, job="cj", rank=r, world_size=3, timeout=60) as comm:
                    out = comm.exchange([pa.table({"v": [r * 10 + d]}) for d in range(3)])
                    return [o["v"][0].as_py() for o in out]
            results = [None] * 3
            threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, rank(r)))
                       for r in range(3)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            assert results == [[s * 10 + d for s in range(3)] for d in range(3)]
        assert redis_keys(srv.client(), "cl:") == []
    finally:
        srv.stop()
