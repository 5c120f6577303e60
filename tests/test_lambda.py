"""Serverless runs end to end, exactly as on AWS: ``cs.launch(..., launcher="lambda")`` invokes
through boto3's Lambda client with ``AWS_ENDPOINT_URL_LAMBDA`` pointing at the local Lambda
service, whose every invocation runs ``cylon_store.serverless.handler`` in AWS's own runtime
interface client (awslambdaric). Stores are the suite's real servers: S3 and DynamoDB on moto's
HTTP server, redis-server, a directory (Lambda mounts EFS as one) and shared memory.

Checked: the kernel's answers against pyarrow on every backend, the report, and the faults — a
rank over its timeout, over its memory, a throttled invoke, duplicate deliveries, a handler that
raises, an interrupted driver — each with nothing left in the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import cylon_store as cs
from cylon_store.serverless import driver as D
from cylon_store.serverless.local import LocalLambda

from kernel_helpers import assert_same_rows, random_table, split_rows
from test_comm import rank_collectives

COMM_TIMEOUT = 30


@pytest.fixture(scope="module")
def service():
    """One local Lambda service for the module: warm environments are reused across tests, as
    on AWS. Environments get the suite's dummy AWS credentials through the environment."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with LocalLambda(function="cylon-worker", memory_mb=1024, timeout_s=120, concurrency=8,
                     retry_delays=(0.5, 1.0), log=open(os.devnull, "w")) as svc:
        yield svc


@pytest.fixture
def on_service(service, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", service.url)
    service.set_faults(throttle_invokes=0, duplicate_rate=0.0)
    yield service
    service.set_faults(throttle_invokes=0, duplicate_rate=0.0)


def wait_idle(service, timeout=60.0):
    """Until the service runs nothing and has nothing queued (late duplicates included)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if service.busy() == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"local Lambda service still busy after {timeout} s")


@pytest.fixture
def lambda_url(store_url):
    """The backend's store as Lambda ranks reach it: memory:// in shared memory (one machine)."""
    return store_url + "?shared=true" if store_url.startswith("memory://") else store_url


def assert_nothing_left(url):
    with cs.open_store(url) as store:
        assert store.list("") == [], store.list("")[:10]


# -- the kernel through Lambda, every backend -----------------------------------------------------

def rank_kernel(comm, left, right):
    from cylon_store import kernel as K
    me, P = comm.rank, comm.world_size
    lpart, rpart = split_rows(left, P)[me], split_rows(right, P)[me]
    joined = K.join(comm, lpart, rpart, on="k0")
    grouped = K.groupby(comm, lpart, "k0", [("v", "sum"), ("x", "count")])
    ordered = K.sort(comm, lpart, "v")
    uniq = K.unique(comm, lpart, on=["k0"])
    return joined, grouped, ordered, uniq, comm.allreduce(lpart.num_rows)


def test_kernel_on_every_backend(on_service, lambda_url):
    store_url = lambda_url
    left = random_table(600, seed=1, key_kinds=("int64",), cardinality=40)
    right = random_table(300, seed=2, key_kinds=("int64",), cardinality=40, prefix="k", value_cols=False)
    right = right.append_column("w", pa.array(np.arange(right.num_rows), pa.int64()))
    P = 3
    out, report = cs.launch(rank_kernel, P, store=store_url, launcher="lambda", function="cylon-worker",
                            args=(left, right), comm_timeout=COMM_TIMEOUT, timeout=300, report=True)
    joined = pa.concat_tables([o[0] for o in out])
    expected = left.join(right, keys="k0", join_type="inner")
    assert_same_rows(joined.select(expected.column_names), expected)
    grouped = pa.concat_tables([o[1] for o in out])
    exp_g = left.group_by("k0").aggregate([("v", "sum"), ("x", "count")])
    assert_same_rows(grouped.select(exp_g.column_names), exp_g)
    ordered = [o[2] for o in out]
    vs = pa.concat_tables(ordered)["v"]
    assert len(vs) == left.num_rows
    non_null = pc.drop_null(vs).to_numpy()
    assert (np.diff(non_null) >= 0).all()
    uniq = pa.concat_tables([o[3] for o in out])
    assert sorted(uniq["k0"].to_pylist(), key=lambda v: (v is None, v)) == \
        sorted(set(left["k0"].to_pylist()), key=lambda v: (v is None, v))
    assert [o[4] for o in out] == [left.num_rows] * P
    # the report: per rank billed time, the run's GB-s, requests and dollars
    d = json.loads(json.dumps(report.to_dict()))
    assert d["world_size"] == P and len(d["ranks"]) == P and d["invocations"] == P
    assert all(r["billed_ms"] >= 1 and r["memory_mb"] == 1024 for r in d["ranks"])
    assert d["gb_seconds"] > 0 and d["store_requests_total"] > 0
    scheme = store_url.split("://")[0]
    assert set(d["dollars"]) == {"lambda_compute", "lambda_requests", scheme, "total"}
    assert d["dollars"]["total"] == pytest.approx(sum(v for k, v in d["dollars"].items() if k != "total"))
    if scheme in ("s3", "dynamodb"):
        assert d["dollars"][scheme] > 0
    wait_idle(on_service)
    assert_nothing_left(store_url)


def test_collectives_and_warm_starts(on_service, tmp_path):
    url = f"file://{tmp_path}"
    first, r1 = cs.launch(rank_collectives, 4, store=url, launcher="lambda", function="cylon-worker",
                          comm_timeout=COMM_TIMEOUT, timeout=300, report=True)
    second, r2 = cs.launch(rank_collectives, 4, store=url, launcher="lambda", function="cylon-worker",
                           comm_timeout=COMM_TIMEOUT, timeout=300, report=True)
    assert first == second
    assert r2.cold_starts < 4  # idle environments were reused
    wait_idle(on_service)
    assert_nothing_left(url)


# -- faults -----------------------------------------------------------------------------------------

def rank_raises(comm):
    comm.barrier()
    if comm.rank == 1:
        raise ValueError("rank 1 is broken on purpose")
    comm.barrier()
    return comm.rank


def test_handler_that_raises(on_service, tmp_path):
    url = f"file://{tmp_path}"
    t0 = time.monotonic()
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_raises, 3, store=url, launcher="lambda", function="cylon-worker",
                  comm_timeout=COMM_TIMEOUT, timeout=120)
    assert info.value.rank == 1 and "broken on purpose" in str(info.value)
    assert "ValueError" in (info.value.remote_traceback or "")
    assert time.monotonic() - t0 < COMM_TIMEOUT  # the others were aborted, not timed out
    wait_idle(on_service)
    assert_nothing_left(url)


def rank_sleeps(comm, who, seconds):
    comm.barrier()
    if comm.rank == who:
        time.sleep(seconds)
    comm.barrier()
    return comm.rank


def rank_allocates(comm, who, mb):
    comm.barrier()
    if comm.rank == who:
        block = np.ones(mb * 1024 * 1024 // 8)  # touched: resident
        time.sleep(5)
        return float(block.sum())
    comm.barrier()
    return comm.rank


@pytest.fixture(scope="module")
def tight_service():
    """A function with a 6 s timeout and 512 MB, as a user would deploy a small one."""
    with LocalLambda(function="tight", memory_mb=512, timeout_s=6, concurrency=4,
                     retry_delays=(0.3, 0.6), log=open(os.devnull, "w")) as svc:
        yield svc


def test_rank_over_its_timeout(tight_service, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", tight_service.url)
    url = f"file://{tmp_path}"
    t0 = time.monotonic()
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_sleeps, 3, store=url, launcher="lambda", function="tight", args=(2, 60),
                  comm_timeout=COMM_TIMEOUT, timeout=120)
    assert info.value.rank == 2 and "deadline" in str(info.value), str(info.value)
    assert time.monotonic() - t0 < 40
    wait_idle(tight_service)
    records = [r for r in tight_service.invocations() if r["function"] == "tight"]
    assert any(r["status"] == "timeout" for r in records)
    assert_nothing_left(url)


def test_rank_over_its_memory(tight_service, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", tight_service.url)
    url = f"file://{tmp_path}"
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_allocates, 2, store=url, launcher="lambda", function="tight", args=(1, 1024),
                  comm_timeout=COMM_TIMEOUT, timeout=120)
    assert info.value.rank == 1 and "memory" in str(info.value), str(info.value)
    wait_idle(tight_service)
    assert any(r["status"] == "oom" for r in tight_service.invocations())
    assert_nothing_left(url)


def test_throttled_invokes_are_retried(on_service, tmp_path):
    url = f"file://{tmp_path}"
    on_service.set_faults(throttle_invokes=3)
    values, report = cs.launch(rank_collectives, 2, store=url, launcher="lambda",
                               function="cylon-worker", comm_timeout=COMM_TIMEOUT, timeout=120,
                               report=True)
    assert values == [values[0]] * 2 and report.throttled_invokes == 3 and report.invocations == 2
    wait_idle(on_service)
    assert_nothing_left(url)


def test_throttled_for_good_names_the_rank(on_service, tmp_path, monkeypatch):
    url = f"file://{tmp_path}"
    monkeypatch.setattr(D, "INVOKE_ATTEMPTS", 3)
    on_service.set_faults(throttle_invokes=10**6)
    with pytest.raises(cs.RankFailedError, match="could not be invoked"):
        cs.launch(rank_collectives, 2, store=url, launcher="lambda", function="cylon-worker",
                  comm_timeout=COMM_TIMEOUT, timeout=120)
    on_service.set_faults(throttle_invokes=0)
    wait_idle(on_service)
    assert_nothing_left(url)


def rank_counts_rows(comm, rows):
    t = pa.table({"id": np.arange(comm.rank * rows, (comm.rank + 1) * rows)})
    dest = t["id"].to_numpy() % comm.world_size
    got = pa.concat_tables(comm.exchange([t.filter(pa.array(dest == d)) for d in range(comm.world_size)]))
    return got["id"].to_pylist()


def test_duplicate_deliveries_are_fenced(on_service, lambda_url):
    store_url = lambda_url
    on_service.set_faults(duplicate_rate=1.0)
    before = len(on_service.invocations())
    out = cs.launch(rank_counts_rows, 3, store=store_url, launcher="lambda", function="cylon-worker",
                    args=(200,), comm_timeout=COMM_TIMEOUT, timeout=120)
    ids = sorted(i for part in out for i in part)
    assert ids == list(range(600))  # every row exactly once
    wait_idle(on_service)
    records = on_service.invocations()[before:]
    assert sum(1 for r in records if r["duplicate"]) >= 3
    assert_nothing_left(store_url)


def test_direct_transports_and_private_memory_refused(on_service):
    before = len(on_service.invocations())
    for url in ("ucx://", "mpi://"):
        with pytest.raises(cs.ConfigError, match="inbound connections"):
            cs.launch(rank_collectives, 2, store=url, launcher="lambda", function="cylon-worker")
    with pytest.raises(cs.ConfigError, match="own"):
        cs.launch(rank_collectives, 2, store="memory://", launcher="lambda", function="cylon-worker")
    with pytest.raises(cs.ConfigError, match="function="):
        cs.launch(rank_collectives, 2, store="file:///tmp", launcher="lambda")
    with pytest.raises(cs.ConfigError, match="not found"):
        cs.launch(rank_collectives, 2, store="file:///tmp", launcher="lambda", function="nope")
    with pytest.raises(cs.ConfigError, match="report"):
        cs.launch(rank_collectives, 2, report=True)
    assert len(on_service.invocations()) == before  # nothing was invoked


_INTERRUPTED = textwrap.dedent("""
    import sys, time
    import cylon_store as cs

    def forever(comm):
        while True:
            comm.barrier()
            time.sleep(0.05)

    print("starting", flush=True)
    cs.launch(forever, 3, store=sys.argv[1], launcher="lambda", function="cylon-worker",
              comm_timeout=60, timeout=300)
""")


def test_interrupted_driver_leaves_nothing(on_service, tmp_path):
    url = f"file://{tmp_path / 'store'}"
    script = tmp_path / "driver.py"
    script.write_text(_INTERRUPTED)
    env = {**os.environ, "AWS_ENDPOINT_URL_LAMBDA": on_service.url,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, str(script), url], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "starting"
        claims = os.path.join(str(tmp_path / "store"), "_cylon")
        end = time.monotonic() + 60
        while time.monotonic() < end:  # until the three ranks have claimed their slots
            if len([f for d, _, files in os.walk(claims) if d.endswith("claim") for f in files]) == 3:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    wait_idle(on_service)
    assert_nothing_left(url)


def test_lambda_local_launcher_starts_its_own_service():
    """launcher='lambda-local': a service started and stopped by launch; memory:// is shared."""
    values, report = cs.launch(rank_collectives, 2, launcher="lambda-local",
                               local_options={"memory_mb": 768, "concurrency": 2,
                                              "log": open(os.devnull, "w")},
                               comm_timeout=COMM_TIMEOUT, timeout=120, report=True)
    assert values == [values[0]] * 2 and report.memory_mb == 768 and report.cold_starts == 2
    assert report.store == "memory" and report.dollars["memory"] == 0


def test_rank_that_never_starts_is_named(tmp_path):
    """A concurrency limit below the world size: one rank waits in Lambda's queue and never
    starts while the other holds the only environment; the driver names it after start_timeout
    (8 s: the first rank's own cold start must fit in it on a loaded machine)."""
    url = f"file://{tmp_path}"
    t0 = time.monotonic()
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_collectives, 2, store=url, launcher="lambda-local", start_timeout=8,
                  local_options={"concurrency": 1, "log": open(os.devnull, "w")},
                  comm_timeout=COMM_TIMEOUT, timeout=120)
    # Which of the two gets the only environment is Lambda's (asynchronous invocations carry
    # no order): the other one is named.
    assert info.value.rank in (0, 1) and "never started" in str(info.value), str(info.value)
    assert f"rank(s) [{info.value.rank}]" in str(info.value), str(info.value)
    assert time.monotonic() - t0 < COMM_TIMEOUT
    assert_nothing_left(url)
