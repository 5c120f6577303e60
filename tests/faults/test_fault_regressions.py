"""Deterministic reproductions of the defects the fault suite found (each fails until fixed).

Each test injects one fault at one precise point (the proxies hit the first eligible
connection or request, then practically none), so the outcome does not depend on timing:

1. S3/DynamoDB: a connection reset or a read timeout is mapped to a non-retryable
   ``StoreError("request failed (0)")`` instead of a retryable ``TransientError``, so no retry
   layer ever retries a network failure (``adapters/_aws.py``, ``AwsAdapter._map``: botocore's
   ``HTTPClientError`` family carries a ``response`` attribute set to None, so the
   ``hasattr(exc, "response")`` test sends it down the ``ClientError`` path, code "" status 0).
2. DynamoDB ``delete_many``: when one ``DeleteItem`` of a batch fails (throttled), the
   ``ALL_OLD`` attributes of those that succeeded are dropped with the error; the facade's
   retry then finds those commit items gone, so their chunk items are never deleted — and
   ``cylon-store clean``, which lists commit items, cannot find them either.
3. Rendezvous: a rank whose hello record was written but whose rendezvous then fails with a
   store error (not a timeout, not a cancel) leaves the record behind
   (``rendezvous.handshake`` deletes it only on those two paths).
4. Redis: a create-if-absent put whose connection checkout fails (nothing sent yet) is not
   retried, although the adapter retries exactly that checkout before INCR; one dropped
   connection makes the rank rendezvous (hello records are created with ``mode="create"``) fail.
"""

from __future__ import annotations

import contextlib
import io
import uuid

import pytest

import cylon_store as cs
from cylon_store.cli import main as cli_main
from fault_targets import dynamodb_target, redis_target, s3_target
from http_faults import ThrottleProxy
from proxy import FaultProxy

FAST = {"retries": 4, "retry_base": 0.01, "retry_cap": 0.05}


# -- 1. network failures of S3 and DynamoDB are retryable ---------------------------------------

def _hit_first_connection(proxy: FaultProxy, fault: str) -> None:
    """Reset the first connection at its first byte, or stall it past the read timeout; the
    proxy spares the next 99."""
    if fault == "reset":
        proxy.reset_after(0, 0.01)
    else:
        proxy.stall(2.5, 0.01)


@pytest.mark.parametrize("fault", ["reset", "read_timeout"])
@pytest.mark.parametrize("backend", ["s3", "dynamodb"])
def test_aws_network_failure_is_retried(backend, fault, moto_endpoint):
    make = s3_target if backend == "s3" else dynamodb_target
    target = make(moto_endpoint, read_timeout=0.5, connect_timeout=1, **FAST)
    with FaultProxy(target.host, target.port) as proxy:
        _hit_first_connection(proxy, fault)
        with cs.open_store(target.url_via(proxy.host, proxy.port)) as store:
            try:
                listed = store.list("")     # idempotent: the facade retries it
            except cs.StoreError as exc:
                pytest.fail(f"one {fault} of one connection failed an idempotent {backend} "
                            f"list: {type(exc).__name__} (retryable={exc.retryable}): {exc}; "
                            f"cause {type(exc.__cause__).__name__}")
            assert listed == []
            assert store.stats()["requests"].get("retries", 0) >= 1
        assert proxy.stats()["resets" if fault == "reset" else "stalls"] == 1


# -- 2. DynamoDB delete_many leaks chunk items ------------------------------------------------

def test_dynamodb_delete_many_leaks_no_chunks_when_one_delete_is_throttled(moto_endpoint):
    target = dynamodb_target(moto_endpoint, **FAST)
    payload = b"x" * (200 << 10)          # 4 chunks of 64 KiB each
    with cs.open_store(target.direct_url) as store:
        store.put_bytes("a", payload)
        store.put_bytes("b", payload)
        assert target.raw_count() == 2 + 2 * 4
    # The first DeleteItem is throttled (the other one of the two succeeds); nothing else is.
    with ThrottleProxy(target.host, target.port, p=0.01, spread="even",
                       ops={"DeleteItem"}) as proxy:
        with cs.open_store(target.url_via(proxy.host, proxy.port)) as store:
            store.delete_many(["a", "b"])   # succeeds on the facade's retry
            assert store.list("") == []
        assert proxy.stats()["throttled"] == 1
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["clean", target.direct_url]) == 0
    left = target.raw_count()
    assert left == 0, (f"{left} chunk items of a deleted value are left in the table (neither "
                       f"delete_many's retry nor `cylon-store clean` can find them)")


# -- 3. a failed rendezvous leaves its hello record -------------------------------------------

def test_failed_rendezvous_leaves_no_hello_record(moto_endpoint):
    target = s3_target(moto_endpoint, retries=2, retry_base=0.01, retry_cap=0.02)
    job = f"rdv-{uuid.uuid4().hex[:8]}"
    # Writes pass; every read (LIST, GET, HEAD) is throttled: the hello record is written,
    # then the rendezvous cannot list the others' records and fails with ThrottledError.
    with ThrottleProxy(target.host, target.port, p=1.0, spread="even",
                       ops={"GET", "HEAD"}) as proxy:
        with pytest.raises(cs.ThrottledError):
            cs.connect(target.url_via(proxy.host, proxy.port), job=job, rank=0, world_size=2,
                       timeout=10)
    with cs.open_store(target.direct_url) as store:
        left = store.list("_cylon/")
        store.delete_many(left)
    assert left == [], f"the failed rank left {left} (only `cylon-store clean` removes it)"


# -- 4. Redis: a create whose connection checkout failed is not retried -----------------------

def test_redis_create_retries_a_checkout_that_sent_nothing(redis_server):
    target = redis_target(redis_server, **FAST)
    with FaultProxy(target.host, target.port) as proxy:
        proxy.drop(0.01)   # the first connection is reset as it opens; the next 99 are not
        with cs.open_store(target.url_via(proxy.host, proxy.port)) as store:
            try:
                store.put_bytes("_cylon/j/hello/000000", b"hello", mode="create")
            except cs.TransientError as exc:
                pytest.fail(f"a create-if-absent put failed on a connection that broke before "
                            f"anything was sent, without a retry: {exc}")
            assert store.get_bytes("_cylon/j/hello/000000").to_pybytes() == b"hello"
            store.delete("_cylon/j/hello/000000")
        assert proxy.stats()["drops"] == 1
