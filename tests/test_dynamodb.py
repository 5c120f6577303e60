"""DynamoDB adapter specifics, against moto's DynamoDB server over HTTP (tests/moto_server.py):
chunking under the item limit, the commit item written last, cleanup of failed and replaced
values, UnprocessedItems/UnprocessedKeys and throttling retried with backoff and counted,
capacity units, TTL, the atomic counter, table checks and errors by code.

Faults are injected with a botocore ``before-send`` hook on the adapter's own client: the hook
answers instead of the server, with the JSON DynamoDB itself would send.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest

import cylon_store as cs
import moto_server
from cylon_store.adapters import dynamodb as D

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def endpoint():
    url = moto_server.acquire()
    yield url
    moto_server.release()


@pytest.fixture
def raw(endpoint):
    return moto_server.client("dynamodb")


@pytest.fixture
def table_name():
    return f"cylon-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def url(endpoint, table_name):
    """Default chunking and batching (the conformance suite runs with small ones)."""
    return f"dynamodb://{table_name}?endpoint_url={endpoint}&region=us-east-1"


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def items(raw, table) -> list:
    out, start = [], None
    while True:
        resp = raw.scan(TableName=table, **({"ExclusiveStartKey": start} if start else {}))
        out += resp["Items"]
        start = resp.get("LastEvaluatedKey")
        if not start:
            return out


def kinds(raw, table) -> dict:
    """Items by kind: m (commit), d (chunk), c (counter)."""
    out: dict = {}
    for it in items(raw, table):
        k = it["pk"]["S"][0]
        out[k] = out.get(k, 0) + 1
    return out


def req(store) -> dict:
    return store.stats()["requests"]


# -- fault injection ----------------------------------------------------------------------

class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body

    def read(self, *_):
        return self.body


def json_response(request, status: int, body: dict):
    from botocore.awsrequest import AWSResponse
    return AWSResponse(request.url, status, {"Content-Type": "application/x-amz-json-1.0"},
                       _Raw(json.dumps(body).encode()))


@contextmanager
def inject(store, operation: str, respond, *, times: int = 1):
    """The next ``times`` requests of ``operation`` get ``respond(request, body)`` instead of
    reaching the server (``body`` is the request's JSON)."""
    left = [times]
    lock = threading.Lock()

    def hook(request, **_):
        with lock:
            if left[0] <= 0:
                return None
            left[0] -= 1
        return respond(request, json.loads(request.body))

    events = store.adapter.client.meta.events
    events.register_last(f"before-send.dynamodb.{operation}", hook)
    try:
        yield left
    finally:
        events.unregister(f"before-send.dynamodb.{operation}", hook)


def error(code: str, status: int = 400):
    return lambda request, body: json_response(
        request, status, {"__type": f"com.amazonaws.dynamodb.v20120810#{code}",
                          "message": f"injected {code}"})


def unprocessed_items(request, body):
    return json_response(request, 200, {"UnprocessedItems": body["RequestItems"]})


def unprocessed_keys(request, body):
    table = next(iter(body["RequestItems"]))
    return json_response(request, 200, {"Responses": {table: []},
                                        "UnprocessedKeys": body["RequestItems"]})


# -- values and chunks --------------------------------------------------------------------

def test_small_value_is_one_item_one_request(url, raw, table_name):
    with cs.open_store(url) as store:
        store.adapter.client  # table created on first use
        store.reset_stats()
        store.put_bytes("small", b"hello")
        assert bytes(memoryview(store.get_bytes("small"))) == b"hello"
        r = req(store)
        assert r["dynamodb.PutItem"] == 1 and r["dynamodb.GetItem"] == 1
        assert "dynamodb.BatchWriteItem" not in r
        assert kinds(raw, table_name) == {"m": 1}


def test_large_value_is_chunked_under_the_item_limit(url, raw, table_name):
    data = payload(5 * MiB + 17)
    with cs.open_store(url) as store:
        store.put_bytes("big", data)
        n_chunks = math.ceil(len(data) / D.CHUNK_SIZE)
        assert kinds(raw, table_name) == {"m": 1, "d": n_chunks}
        assert max(D._item_size(it) for it in items(raw, table_name)) <= D.MAX_ITEM_SIZE
        assert D.CHUNK_SIZE + 100 < 400_000           # fits the limit read either way
        per_batch = D.BATCH_BYTES // D.CHUNK_SIZE
        assert req(store)["dynamodb.BatchWriteItem"] == math.ceil(n_chunks / per_batch)
        got = store.get_bytes("big")
        assert bytes(memoryview(got)) == data and got.address % 64 == 0
        for rng in [(0, 1), (D.CHUNK_SIZE - 3, D.CHUNK_SIZE + 3), (len(data) - 5, len(data) + 5),
                    (len(data), len(data) + 1), (100, 3 * MiB)]:
            assert bytes(memoryview(store.get_bytes("big", rng))) == data[rng[0]:rng[1]], rng


def test_ranged_read_fetches_only_the_chunks_it_needs(url):
    data = payload(4 * MiB)
    with cs.open_store(url) as store:
        store.put_bytes("big", data)
        store.reset_stats()
        store.get_bytes("big", (D.CHUNK_SIZE + 10, D.CHUNK_SIZE + 20))
        units = store.stats()["dynamodb.read_units"]
        # commit item (1 unit, strongly consistent) + one chunk (CHUNK_SIZE / 4 KB units, halved:
        # immutable chunks are read eventually consistent)
        assert units == 1 + math.ceil((D.CHUNK_SIZE + 40) / D.READ_UNIT) / 2


def test_chunks_missing_from_an_eventual_read_are_read_again_consistently(url):
    data = payload(1 * MiB)   # three chunks: one BatchGetItem

    def lagging_replica(request, body):
        table = next(iter(body["RequestItems"]))
        assert body["RequestItems"][table]["ConsistentRead"] is False
        return json_response(request, 200, {"Responses": {table: []}})

    with cs.open_store(url) as store:
        store.put_bytes("k", data)
        with inject(store, "BatchGetItem", lagging_replica):
            assert bytes(memoryview(store.get_bytes("k"))) == data
        assert req(store)["dynamodb.consistent_rereads"] == math.ceil(1 * MiB / D.CHUNK_SIZE)


def test_arrow_roundtrip_and_streaming_read(url):
    table = pa.table({"a": np.arange(400_000), "b": np.random.default_rng(1).random(400_000)})
    with cs.open_store(url, segment_size=1 * MiB) as store:
        store.put("t", table)
        assert store.get("t").equals(table)
        assert store.get_batches("t").read_all().equals(table)


def test_overwrite_and_delete_remove_old_chunks(url, raw, table_name):
    with cs.open_store(url) as store:
        store.put_bytes("k", payload(2 * MiB, 1))
        store.put_bytes("k", payload(1 * MiB, 2))
        assert kinds(raw, table_name) == {"m": 1, "d": math.ceil(MiB / D.CHUNK_SIZE)}
        assert bytes(memoryview(store.get_bytes("k"))) == payload(1 * MiB, 2)
        store.put_bytes("k", b"tiny")
        assert kinds(raw, table_name) == {"m": 1}
        store.put_bytes("k", payload(1 * MiB, 3))
        store.delete_many(["k", "missing"])
        assert kinds(raw, table_name) == {}


def test_delete_many_of_large_values_does_not_deadlock_the_pool(endpoint, raw, table_name):
    """Many keys, each with more chunks than one BatchWriteItem takes, and a small pool."""
    url = (f"dynamodb://{table_name}?endpoint_url={endpoint}&region=us-east-1&chunk_size=1KiB"
           f"&max_concurrency=2")
    with cs.open_store(url) as store:
        for i in range(4):
            store.put_bytes(f"k{i}", payload(60 * KiB, i))
        assert kinds(raw, table_name) == {"m": 4, "d": 4 * 60}
        done = threading.Event()
        t = threading.Thread(target=lambda: (store.delete_many([f"k{i}" for i in range(4)]),
                                             done.set()), daemon=True)
        t.start()
        assert done.wait(60), "delete_many hung"
        assert kinds(raw, table_name) == {}


def test_commit_failure_leaves_nothing(url, raw, table_name):
    """Chunks are written, then the commit item fails: the value never becomes visible and the
    chunks are deleted."""
    with cs.open_store(url, retries=1) as store:
        with inject(store, "PutItem", error("AccessDeniedException")):
            with pytest.raises(cs.PermissionDeniedError):
                store.put_bytes("k", payload(2 * MiB))
        assert not store.exists("k")
        assert kinds(raw, table_name) == {}


def test_generator_failing_midway_leaves_nothing(url, raw, table_name):
    def gen():
        for i in range(8):
            yield payload(512 * KiB, i)
        raise RuntimeError("producer died")

    with cs.open_store(url) as store:
        with pytest.raises(RuntimeError, match="producer died"):
            store.adapter.put("k", gen())
        assert store.list() == []
        assert kinds(raw, table_name) == {}


def test_create_mode_and_race(url, raw, table_name):
    with cs.open_store(url) as store:
        store.put_bytes("c", payload(1 * MiB, 1), mode="create")
        with pytest.raises(cs.AlreadyExistsError):
            store.put_bytes("c", payload(1 * MiB, 2), mode="create")
        assert bytes(memoryview(store.get_bytes("c"))) == payload(1 * MiB, 1)
        assert kinds(raw, table_name) == {"m": 1, "d": math.ceil(MiB / D.CHUNK_SIZE)}

        outcome: dict = {}

        def creator(i):
            try:
                store.put_bytes("race", f"rank{i}".encode() * 100_000, mode="create")
                outcome[i] = "won"
            except cs.AlreadyExistsError:
                outcome[i] = "lost"
            except BaseException as exc:  # any other error is a failure, shown below
                outcome[i] = exc

        threads = [threading.Thread(target=creator, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(map(str, outcome.values())) == ["lost"] * 5 + ["won"], outcome
        winners = [i for i, o in outcome.items() if o == "won"]
        assert bytes(memoryview(store.get_bytes("race"))) == f"rank{winners[0]}".encode() * 100_000
        # the losers' chunks are gone: only those of "c" and of the winner remain
        assert kinds(raw, table_name)["d"] == (math.ceil(MiB / D.CHUNK_SIZE)
                                               + math.ceil(500_000 / D.CHUNK_SIZE))


def test_value_too_large_writes_nothing(endpoint, raw, table_name):
    url = f"dynamodb://{table_name}?endpoint_url={endpoint}&region=us-east-1&max_object_size=1MiB"
    with cs.open_store(url) as store:
        assert store.capabilities.max_object_size == MiB
        with pytest.raises(cs.PayloadTooLargeError, match="max_object_size"):
            store.put_bytes("k", payload(MiB + 1))
        assert kinds(raw, table_name) == {}


def test_namespaces_share_a_table(endpoint, raw, table_name):
    a = cs.open_store(f"dynamodb://{table_name}/a?endpoint_url={endpoint}&region=us-east-1")
    b = cs.open_store(f"dynamodb://{table_name}/a/b?endpoint_url={endpoint}&region=us-east-1")
    with a, b:
        a.put_bytes("k", b"1")
        b.put_bytes("k", b"2")
        assert a.list() == ["k"] and b.list() == ["k"]
        assert bytes(memoryview(a.get_bytes("k"))) == b"1"


# -- retries, throttling and units ------------------------------------------------------------

def test_unprocessed_items_are_retried_and_counted(url):
    data = payload(3 * MiB)
    with cs.open_store(url) as store:
        with inject(store, "BatchWriteItem", unprocessed_items, times=2):
            store.put_bytes("k", data)
        with inject(store, "BatchGetItem", unprocessed_keys, times=2):
            assert bytes(memoryview(store.get_bytes("k"))) == data
        s = store.stats()
        assert s["requests"]["dynamodb.unprocessed"] > 0
        assert s["requests"]["dynamodb.throttled"] == 4 and s["requests"]["retries"] == 4


@pytest.mark.parametrize("code", ["ProvisionedThroughputExceededException", "ThrottlingException",
                                  "RequestLimitExceeded"])
def test_throttling_is_retried_and_counted(url, code):
    with cs.open_store(url) as store:
        store.put_bytes("k", payload(1 * MiB))
        store.reset_stats()
        with inject(store, "GetItem", error(code), times=2):
            with inject(store, "BatchGetItem", error(code), times=1):
                assert bytes(memoryview(store.get_bytes("k"))) == payload(1 * MiB)
        r = req(store)
        assert r["dynamodb.throttled"] == 3 and r["retries"] == 3
        assert r["dynamodb.GetItem"] == 3 and r["dynamodb.BatchGetItem"] == 2


def test_throttling_that_persists_ends_with_throttled_error(url):
    with cs.open_store(url, retries=3, retry_base=0.01, retry_cap=0.02) as store:
        store.put_bytes("k", b"v")
        with inject(store, "GetItem", error("ThrottlingException"), times=100):
            with pytest.raises(cs.ThrottledError):
                store.get_bytes("k")


def test_uncertain_commit_is_resolved_by_reading_it_back(url):
    """The commit PutItem lands but its answer is lost (turned into a 500 after the fact): the
    adapter reads the commit item back, finds its own version, and the put succeeds."""
    with cs.open_store(url, retries=1) as store:
        fired = []

        def lose_reply(http_response=None, parsed=None, **_):
            if not fired:
                fired.append(1)
                http_response.status_code = 500
                parsed["Error"] = {"Code": "InternalServerError", "Message": "injected"}

        events = store.adapter.client.meta.events
        events.register("after-call.dynamodb.PutItem", lose_reply)
        try:
            store.put_bytes("k", payload(2 * MiB))
        finally:
            events.unregister("after-call.dynamodb.PutItem", lose_reply)
        assert fired
        assert bytes(memoryview(store.get_bytes("k"))) == payload(2 * MiB)


def test_uncertain_commit_whose_check_fails_keeps_the_chunks(url):
    """The commit lands but its answer is lost, and the GetItem that would tell fails too: the
    outcome is unknown, so the chunks must stay (deleting them would lose a committed object);
    the put fails with a retryable error and the object reads back whole."""
    with cs.open_store(url, retries=1) as store:
        fired = []

        def lose_reply(http_response=None, parsed=None, **_):
            fired.append(1)
            http_response.status_code = 500
            parsed["Error"] = {"Code": "InternalServerError", "Message": "injected"}

        events = store.adapter.client.meta.events
        events.register("after-call.dynamodb.PutItem", lose_reply)
        events.register("after-call.dynamodb.GetItem", lose_reply)
        try:
            with pytest.raises(cs.TransientError):
                store.put_bytes("k", payload(2 * MiB))
        finally:
            events.unregister("after-call.dynamodb.PutItem", lose_reply)
            events.unregister("after-call.dynamodb.GetItem", lose_reply)
        assert fired
        assert bytes(memoryview(store.get_bytes("k"))) == payload(2 * MiB)


def test_single_item_calls_are_retried_by_one_layer(url):
    """A read that keeps failing is attempted ``retries`` times in all: the facade retries it,
    the adapter does not retry it again underneath (that multiplied the attempts, 5 x 5)."""
    with cs.open_store(url, retries=3, retry_base=0.001, retry_cap=0.01) as store:
        store.put_bytes("k", b"v")
        sent = []

        def fail(http_response=None, parsed=None, **_):
            sent.append(1)
            http_response.status_code = 500
            parsed["Error"] = {"Code": "InternalServerError", "Message": "injected"}

        events = store.adapter.client.meta.events
        events.register("after-call.dynamodb.GetItem", fail)
        try:
            with pytest.raises(cs.TransientError):
                store.get_bytes("k")
            assert len(sent) == 3
            sent.clear()
            with pytest.raises(cs.TransientError):
                store.head("k")
            assert len(sent) == 3
        finally:
            events.unregister("after-call.dynamodb.GetItem", fail)


def test_units_follow_aws_rules(url):
    from cylon_store.adapters.dynamodb import request_cost_usd
    with cs.open_store(url) as store:
        store.adapter.client
        store.reset_stats()
        store.put_bytes("small", b"x" * 1500)   # one item of ~1.6 KB: 2 write units
        s = store.stats()
        assert s["dynamodb.write_units"] == 2
        store.get_bytes("small")                # strongly consistent, < 4 KB: 1 read unit
        assert store.stats()["dynamodb.read_units"] == 1
        assert request_cost_usd(store.stats()) == pytest.approx(2 * 0.625e-6 + 1 * 0.125e-6)


# -- TTL, counter, table --------------------------------------------------------------------

def test_ttl_attribute_and_table_setting(endpoint, raw, table_name):
    url = f"dynamodb://{table_name}?endpoint_url={endpoint}&region=us-east-1&ttl=3600"
    import time
    with cs.open_store(url) as store:
        store.put_bytes("k", payload(1 * MiB))
        store.adapter.incr("n")
    ttl = raw.describe_time_to_live(TableName=table_name)["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] in ("ENABLED", "ENABLING") and ttl["AttributeName"] == "expires_at"
    for it in items(raw, table_name):
        assert 3500 < int(it["expires_at"]["N"]) - time.time() <= 3600


def test_atomic_counter_under_contention(url):
    with cs.open_store(url) as store:
        assert store.capabilities.atomic_counter
        got = []
        lock = threading.Lock()

        def bump():
            for _ in range(10):
                v = store.adapter.incr("ctr")
                with lock:
                    got.append(v)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(1, 41))
        store.adapter.delete_counter("ctr")
        assert store.adapter.incr("ctr") == 1
        assert store.list() == []          # counters are not values


def test_counter_rendezvous(url):
    results, errors = {}, []

    def rank():
        try:
            with cs.connect(url, job="rdv", world_size=3, rendezvous="counter", timeout=60) as comm:
                results[comm.rank] = comm.allreduce(comm.rank + 1)
        except BaseException as exc:  # shown by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {0: 6, 1: 6, 2: 6}


def test_missing_table_without_create(endpoint, table_name):
    url = f"dynamodb://{table_name}?endpoint_url={endpoint}&region=us-east-1&create_table=false"
    with cs.open_store(url) as store:
        with pytest.raises(cs.ConfigError, match="does not exist.*key schema pk"):
            store.get_bytes("k")


def test_existing_table_with_wrong_key_schema(endpoint, raw, table_name):
    raw.create_table(TableName=table_name, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                     BillingMode="PAY_PER_REQUEST")
    with cs.open_store(f"dynamodb://{table_name}?endpoint_url={endpoint}&region=us-east-1") as store:
        with pytest.raises(cs.ConfigError, match="key schema"):
            store.list()


def test_existing_table_is_used(endpoint, raw, table_name):
    raw.create_table(TableName=table_name, KeySchema=D.KEY_SCHEMA, BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                           {"AttributeName": "sk", "AttributeType": "S"}])
    with cs.open_store(f"dynamodb://{table_name}?endpoint_url={endpoint}&region=us-east-1") as store:
        store.put_bytes("k", b"v")
        assert "dynamodb.CreateTable" not in req(store)


def test_table_deleted_under_us(url, raw, table_name):
    with cs.open_store(url) as store:
        store.put_bytes("k", b"v")
        raw.delete_table(TableName=table_name)
        with pytest.raises(cs.ConfigError, match="does not exist in region us-east-1"):
            store.get_bytes("k")


@pytest.mark.parametrize("code,kind,words", [
    ("AccessDeniedException", cs.PermissionDeniedError, "access denied"),
    ("UnrecognizedClientException", cs.PermissionDeniedError, "credentials were rejected"),
    ("ExpiredTokenException", cs.PermissionDeniedError, "credentials were rejected"),
    ("InternalServerError", cs.TransientError, "may pass"),
])
def test_errors_map_by_code_and_keep_the_cause(url, code, kind, words):
    from botocore.exceptions import ClientError
    with cs.open_store(url, retries=1) as store:
        store.put_bytes("k", b"v")
        status = 500 if code == "InternalServerError" else 400
        with inject(store, "GetItem", error(code, status), times=100):
            with pytest.raises(kind) as info:
                store.get_bytes("k")
        err = info.value
        assert words in str(err) and err.backend == "dynamodb" and err.key == "k"
        assert isinstance(err.__cause__, ClientError)
        assert err.__cause__.response["Error"]["Code"] == code


def test_options_are_validated(endpoint):
    base = f"dynamodb://tbl?endpoint_url={endpoint}&region=us-east-1"
    for bad, words in [("chunk_size=500KiB", "chunk_size"), ("inline_max=1MiB", "inline_max"),
                       ("ttl=-1", "ttl"), ("max_concurrency=0", "max_concurrency")]:
        with pytest.raises(cs.ConfigError, match=words):
            cs.open_store(f"{base}&{bad}")
    with pytest.raises(cs.ConfigError, match="table name"):
        cs.open_store("dynamodb://x")


def test_no_region_is_a_config_error(monkeypatch, tmp_path):
    for var in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with cs.open_store("dynamodb://some-table") as store:
        with pytest.raises(cs.ConfigError, match="region"):
            store.list()
