"""S3 adapter specifics, against moto's S3 server over HTTP (tests/moto_server.py): multipart
uploads and their cleanup, conditional create, ranged reads, SSE, request counting, retries of
injected SlowDown responses, and the mapping of S3 errors by code.

Faults are injected with a botocore ``before-send`` hook on the adapter's own client: the hook
answers instead of the server, so the adapter sees exactly what S3 would send.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest

import cylon_store as cs
import moto_server

MiB = 1 << 20
BUCKET = "cylon-s3-tests"


@pytest.fixture(scope="module")
def endpoint():
    url = moto_server.acquire()
    moto_server.client("s3").create_bucket(Bucket=BUCKET)
    yield url
    moto_server.release()


@pytest.fixture
def raw(endpoint):
    return moto_server.client("s3")


@pytest.fixture
def url(endpoint):
    return (f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}?endpoint_url={endpoint}&region=us-east-1"
            f"&multipart_threshold=5MiB&part_size=5MiB")


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def uploads(raw) -> list:
    return raw.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


# -- fault injection ----------------------------------------------------------------------

class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body

    def read(self, *_):
        return self.body


def error_response(request, status: int, code: str):
    from botocore.awsrequest import AWSResponse
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f'<Message>injected {code}</Message></Error>').encode()
    return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))


@contextmanager
def inject(store, operation: str, status: int, code: str, *, times: int = 1, when=None):
    """The next ``times`` requests of ``operation`` (that satisfy ``when(request)``) get an
    error response instead of reaching the server."""
    left = [times]
    lock = threading.Lock()

    def hook(request, **_):
        if when is not None and not when(request):
            return None
        with lock:
            if left[0] <= 0:
                return None
            left[0] -= 1
        return error_response(request, status, code)

    events = store.adapter.client.meta.events
    events.register_last(f"before-send.s3.{operation}", hook)
    try:
        yield left
    finally:
        events.unregister(f"before-send.s3.{operation}", hook)


def part_number(n: int):
    return lambda request: f"partNumber={n}" in request.url


def req(store) -> dict:
    return store.stats()["requests"]


# -- multipart ----------------------------------------------------------------------------

def test_multipart_roundtrip_counts_parts_and_reads_ranges_concurrently(url, raw):
    data = payload(12 * MiB + 123)
    with cs.open_store(url) as store:
        store.put_bytes("mp", data)
        r = req(store)
        assert (r["s3.MULTIPART_CREATE"], r["s3.MULTIPART_PART"], r["s3.MULTIPART_COMPLETE"]) == (1, 3, 1)
        assert "s3.PUT" not in r
        store.reset_stats()
        got = store.get_bytes("mp")
        assert bytes(memoryview(got)) == data
        assert req(store)["s3.GET"] == 3            # one ranged GET per 5 MiB part
        assert got.address % 64 == 0                # read straight into one aligned Arrow buffer
        assert bytes(memoryview(store.get_bytes("mp", (5 * MiB - 10, 10 * MiB + 10)))) == \
            data[5 * MiB - 10:10 * MiB + 10]
    assert uploads(raw) == []


def test_single_put_below_threshold(url):
    with cs.open_store(url) as store:
        store.put_bytes("small", payload(5 * MiB))   # exactly the threshold: one PUT
        assert req(store) == {"s3.PUT": 1, "put": 1}


def test_generator_failing_midway_leaves_no_object_and_no_parts(url, raw):
    def gen():
        for i in range(6):
            yield payload(3 * MiB, i)
        raise RuntimeError("producer died")

    with cs.open_store(url) as store:
        with pytest.raises(RuntimeError, match="producer died"):
            store.adapter.put("broken", gen())
        assert not store.exists("broken")
        assert store.list() == []
        r = req(store)
        assert r["s3.MULTIPART_ABORT"] == 1 and r["s3.MULTIPART_PART"] >= 2
        assert "s3.MULTIPART_COMPLETE" not in r
    assert uploads(raw) == []


def test_part_failing_midway_aborts_upload(url, raw):
    """A non-retryable error on part 3 of 4: the put fails with the mapped error, the upload is
    aborted (no orphaned parts) and nothing becomes visible."""
    with cs.open_store(url) as store:
        store.put_bytes("keep", b"old")
        with inject(store, "UploadPart", 403, "AccessDenied", when=part_number(3)):
            with pytest.raises(cs.PermissionDeniedError) as info:
                store.put_bytes("mp-fail", payload(16 * MiB))
        assert info.value.__cause__.response["Error"]["Code"] == "AccessDenied"
        assert store.list() == ["keep"]
        assert req(store)["s3.MULTIPART_ABORT"] == 1
    assert uploads(raw) == []


def test_complete_failing_aborts_upload(url, raw):
    with cs.open_store(url, retries=1) as store:
        with inject(store, "CompleteMultipartUpload", 500, "InternalError"):
            with pytest.raises(cs.TransientError):
                store.put_bytes("mp-complete", payload(11 * MiB))
        assert not store.exists("mp-complete")
    assert uploads(raw) == []


def test_slowdown_on_a_part_is_retried_inside_the_adapter(url, raw):
    data = payload(11 * MiB)
    with cs.open_store(url) as store:
        with inject(store, "UploadPart", 503, "SlowDown", times=2, when=part_number(2)):
            store.put_bytes("mp-slow", data)
        r = req(store)   # 11 MiB: parts of 5 and 6 MiB (a short tail rides with the last part)
        assert r["s3.MULTIPART_PART"] == 2 + 2 and r["s3.throttled"] == 2 and r["retries"] == 2
        assert bytes(memoryview(store.get_bytes("mp-slow"))) == data
    assert uploads(raw) == []


def test_multipart_create_if_absent(url, raw):
    with cs.open_store(url) as store:
        store.put_bytes("c", b"first", mode="create")
        with pytest.raises(cs.AlreadyExistsError):
            store.put_bytes("c", payload(11 * MiB), mode="create")   # fails at completion
        assert bytes(memoryview(store.get_bytes("c"))) == b"first"
        store.put_bytes("c2", payload(11 * MiB), mode="create")
        assert store.head("c2").size == 11 * MiB
    assert uploads(raw) == []


def test_concurrent_creators_exactly_one_wins(url):
    with cs.open_store(url) as store:
        outcome: dict = {}

        def creator(i):
            try:
                store.put_bytes("race", f"rank{i}".encode(), mode="create")
                outcome[i] = "won"
            except cs.AlreadyExistsError:
                outcome[i] = "lost"
            except BaseException as exc:  # any other error is a failure, shown below
                outcome[i] = exc

        threads = [threading.Thread(target=creator, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(map(str, outcome.values())) == ["lost"] * 7 + ["won"], outcome
        winner = next(i for i, o in outcome.items() if o == "won")
        assert bytes(memoryview(store.get_bytes("race"))) == f"rank{winner}".encode()


def test_part_growth_reaches_the_object_limit():
    from cylon_store.adapters.s3 import MAX_OBJECT_SIZE, MAX_PARTS, part_size_for
    total = sum(part_size_for(n, 5 * MiB) for n in range(1, MAX_PARTS + 1))
    assert total >= MAX_OBJECT_SIZE


# -- reads --------------------------------------------------------------------------------

def test_ranges(url):
    data = payload(6 * MiB + 5)
    with cs.open_store(url) as store:
        store.put_bytes("r", data)
        store.put_bytes("empty", b"")
        for rng in [(0, 1), (10, 5 * MiB + 20), (6 * MiB, 6 * MiB + 100), (6 * MiB + 5, 6 * MiB + 9),
                    (7 * MiB, 8 * MiB), (3, 3)]:
            assert bytes(memoryview(store.get_bytes("r", rng))) == data[rng[0]:rng[1]], rng
        assert bytes(memoryview(store.get_bytes("empty"))) == b""
        assert bytes(memoryview(store.get_bytes("empty", (0, 10)))) == b""
        with pytest.raises(cs.NotFoundError):
            store.get_bytes("missing", (0, 10))


def test_if_version_and_replaced_during_read(url, raw):
    data = payload(11 * MiB)
    with cs.open_store(url) as store:
        store.put_bytes("v", data)
        version = store.head("v").version
        assert bytes(memoryview(store.adapter.get("v", (0, 4), if_version=version))) == data[:4]
        with pytest.raises(cs.PreconditionError):
            store.adapter.get("v", (0, 4), if_version='"not-the-etag"')

        # Replace the object after the first ranged GET: the later ranges are pinned to the
        # first response's ETag, so the read fails instead of mixing two versions.
        prefix = store.adapter._prefix
        fired = []

        def replace_once(request, **_):
            if not fired and "bytes=0-" not in str(request.headers.get("Range", b"")):
                fired.append(1)
                raw.put_object(Bucket=BUCKET, Key=prefix + "v", Body=payload(11 * MiB, 9))

        events = store.adapter.client.meta.events
        events.register_first("before-send.s3.GetObject", replace_once)
        try:
            with pytest.raises(cs.TransientError, match="replaced"):
                store.adapter.get("v")
        finally:
            events.unregister("before-send.s3.GetObject", replace_once)
        # Through the facade the transient error is retried: a consistent new version.
        assert bytes(memoryview(store.get_bytes("v"))) == payload(11 * MiB, 9)


def test_arrow_roundtrip_streaming(url):
    table = pa.table({"a": np.arange(1_500_000), "b": np.random.default_rng(1).random(1_500_000)})
    with cs.open_store(url, segment_size=4 * MiB) as store:
        store.put("t", table)
        assert store.get("t").equals(table)
        assert store.get_batches("t").read_all().equals(table)


# -- retries and counting -----------------------------------------------------------------

def test_slowdown_retried_by_the_facade_and_counted(url):
    with cs.open_store(url) as store:
        with inject(store, "PutObject", 503, "SlowDown", times=2):
            store.put_bytes("k", b"v")
        with inject(store, "GetObject", 503, "SlowDown", times=1):
            assert bytes(memoryview(store.get_bytes("k"))) == b"v"
        with inject(store, "HeadObject", 503, "", times=1):   # HEAD errors have no body
            assert store.exists("k")
        r = req(store)
        assert r["s3.PUT"] == 3 and r["s3.GET"] == 2 and r["s3.HEAD"] == 2
        assert r["s3.throttled"] == 4 and r["retries"] == 4


def test_throttling_that_persists_ends_with_throttled_error(url):
    with cs.open_store(url, retries=3, retry_base=0.01, retry_cap=0.02) as store:
        with inject(store, "PutObject", 503, "SlowDown", times=100):
            with pytest.raises(cs.ThrottledError):
                store.put_bytes("k", b"v")
        assert req(store)["s3.PUT"] == 3   # attempts don't multiply: boto3's retries are off


def test_create_is_retried_only_when_surely_not_applied(url):
    with cs.open_store(url) as store:
        with inject(store, "PutObject", 503, "SlowDown", times=1):
            store.put_bytes("c", b"1", mode="create")         # throttled: retried inside
        with inject(store, "PutObject", 500, "InternalError", times=1):
            with pytest.raises(cs.TransientError):            # outcome unknown: not retried
                store.put_bytes("c2", b"1", mode="create")
        with inject(store, "PutObject", 409, "ConditionalRequestConflict", times=1):
            store.put_bytes("c3", b"1", mode="create")        # S3 says: retry


def test_connection_refused_is_transient():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"s3://{BUCKET}/x?endpoint_url=http://127.0.0.1:{port}&region=us-east-1&connect_timeout=1"
    with cs.open_store(url, retries=2, retry_base=0.01, retry_cap=0.02) as store:
        with pytest.raises(cs.TransientError) as info:
            store.get_bytes("k")
        assert "EndpointConnectionError" in str(info.value)
        assert store.stats()["requests"]["retries"] == 1


def test_request_cost(url):
    from cylon_store.adapters.s3 import request_cost_usd
    with cs.open_store(url) as store:
        store.put_bytes("a", payload(11 * MiB))       # 1 create + 2 parts (5, 6 MiB) + 1 complete
        store.get_bytes("a")                          # 2 ranged GETs (5, 6 MiB)
        store.list()                                  # 1 LIST
        store.delete("a")                             # free
        r = req(store)
        assert (r["s3.MULTIPART_PART"], r["s3.GET"]) == (2, 2)
        want = 5 * 0.005 / 1000 + 2 * 0.0004 / 1000
        assert request_cost_usd(store.stats()) == pytest.approx(want)


# -- errors by code -----------------------------------------------------------------------

@pytest.mark.parametrize("status,code,kind,words", [
    (403, "AccessDenied", cs.PermissionDeniedError, "access denied"),
    (403, "InvalidAccessKeyId", cs.PermissionDeniedError, "credentials were rejected"),
    (403, "SignatureDoesNotMatch", cs.PermissionDeniedError, "credentials were rejected"),
    (400, "ExpiredToken", cs.PermissionDeniedError, "credentials were rejected"),
    (301, "PermanentRedirect", cs.ConfigError, "wrong region"),
    (400, "AuthorizationHeaderMalformed", cs.ConfigError, "wrong region"),
    (400, "EntityTooLarge", cs.PayloadTooLargeError, "too large"),
    (404, "NoSuchBucket", cs.ConfigError, "does not exist"),
    (400, "KMS.NotFoundException", cs.ConfigError, "sse_kms_key_id"),
    (500, "InternalError", cs.TransientError, "may pass"),
])
def test_errors_map_by_code_and_keep_the_cause(url, status, code, kind, words):
    from botocore.exceptions import ClientError
    with cs.open_store(url, retries=1) as store:
        # (boto3 follows one PermanentRedirect to the bucket's region by itself: persist it)
        with inject(store, "PutObject", status, code, times=3):
            with pytest.raises(kind) as info:
                store.put_bytes("k", b"v")
        err = info.value
        assert words in str(err) and err.backend == "s3" and err.key == "k"
        assert isinstance(err.__cause__, ClientError)
        assert err.__cause__.response["Error"]["Code"] == code
        assert store.list() == []


def test_missing_bucket(endpoint):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/p?endpoint_url={endpoint}&region=us-east-1"
    with cs.open_store(url) as store:
        for op in (lambda: store.get_bytes("a"), lambda: store.exists("a"),
                   lambda: store.put_bytes("a", b"1"), lambda: store.list()):
            with pytest.raises(cs.ConfigError, match="does not exist"):
                op()


def test_missing_credentials(endpoint, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    url = f"s3://{BUCKET}/p?endpoint_url={endpoint}&region=us-east-1"
    with cs.open_store(url) as store:
        with pytest.raises(cs.PermissionDeniedError, match="no usable AWS credentials"):
            store.put_bytes("a", b"1")


def test_unknown_profile_is_a_config_error(endpoint):
    with pytest.raises(cs.ConfigError, match="profile"):
        with cs.open_store(f"s3://{BUCKET}/p?endpoint_url={endpoint}&profile=nope-{uuid.uuid4().hex}") as store:
            store.list()


# -- conditional writes fallback, SSE, options ----------------------------------------------

def test_endpoint_without_conditional_writes(url):
    with cs.open_store(url) as store:
        assert store.capabilities.conditional_create
        with inject(store, "PutObject", 501, "NotImplemented"):
            with pytest.raises(cs.NotSupportedError, match="conditional writes"):
                store.put_bytes("c", b"1", mode="create")
        assert not store.capabilities.conditional_create    # declared off from now on
        with pytest.raises(cs.NotSupportedError):
            store.put_bytes("c", b"1", mode="create")
        store.put_bytes("c", b"1")                          # overwrite still works
    with cs.open_store(url, conditional_create=False) as store:
        assert not store.capabilities.conditional_create
        with pytest.raises(cs.NotSupportedError):
            store.put_bytes("d", b"1", mode="create")


@pytest.mark.parametrize("options,want", [
    ({"sse": "AES256"}, ("AES256", None)),
    ({"sse": "aws:kms", "sse_kms_key_id": "alias/cylon-test"}, ("aws:kms", "alias/cylon-test")),
])
def test_server_side_encryption(url, raw, options, want):
    with cs.open_store(url, **options) as store:
        store.put_bytes("small", b"secret")
        store.put_bytes("large", payload(11 * MiB))
        prefix = store.adapter._prefix
        for key in ("small", "large"):
            head = raw.head_object(Bucket=BUCKET, Key=prefix + key)
            assert head["ServerSideEncryption"] == want[0]
            if want[1]:
                assert want[1] in head["SSEKMSKeyId"]
        assert bytes(memoryview(store.get_bytes("small"))) == b"secret"


def test_options_are_validated(endpoint):
    base = f"s3://{BUCKET}/p?endpoint_url={endpoint}"
    for bad, words in [("part_size=1MiB", "part_size"), ("multipart_threshold=6GiB", "multipart_threshold"),
                       ("sse_kms_key_id=k", "sse='aws:kms'"), ("sse=rot13", "sse"),
                       ("addressing_style=sideways", "addressing_style"), ("max_concurrency=0", "max_concurrency"),
                       ("bogus=1", "bogus")]:
        with pytest.raises(cs.ConfigError, match=words):
            cs.open_store(f"{base}&{bad}")
    with pytest.raises(cs.ConfigError, match="bucket"):
        cs.open_store("s3:///nobucket")


def test_endpoint_from_aws_environment(endpoint, monkeypatch):
    """boto3's own chain: AWS_ENDPOINT_URL_S3 and AWS_DEFAULT_REGION, no URL options."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with cs.open_store(f"s3://{BUCKET}/env-{uuid.uuid4().hex[:6]}?addressing_style=path") as store:
        store.put_bytes("k", b"v")
        assert store.list() == ["k"]
        store.delete("k")


def test_pickled_store_reopens_lazily(url):
    with cs.open_store(url) as store:
        store.put_bytes("k", b"v")
        clone = pickle.loads(pickle.dumps(store))
        assert clone.adapter._client is None           # no client until first use
        assert bytes(memoryview(clone.get_bytes("k"))) == b"v"
        clone.close()


def test_prefixes_isolate_stores(endpoint):
    a = cs.open_store(f"s3://{BUCKET}/iso/a?endpoint_url={endpoint}")
    b = cs.open_store(f"s3://{BUCKET}/iso/ab?endpoint_url={endpoint}")
    with a, b:
        a.put_bytes("k", b"1")
        b.put_bytes("k", b"2")
        assert a.list() == ["k"] and b.list() == ["k"]
        assert bytes(memoryview(a.get_bytes("k"))) == b"1"
        a.delete("k")
        b.delete("k")


def test_delete_many_in_batches_of_1000(url):
    with cs.open_store(url) as store:
        keys = [f"d/{i:04d}" for i in range(1005)]
        pool_keys = keys[:40]
        for k in pool_keys:
            store.put_bytes(k, b"x")
        store.reset_stats()
        store.delete_many(keys)
        assert req(store)["s3.DELETE"] == 2
        assert store.list("d/") == []


def test_import_does_not_load_boto3():
    code = ("import sys, cylon_store, cylon_store.adapters.s3, cylon_store.adapters.dynamodb; "
            "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
