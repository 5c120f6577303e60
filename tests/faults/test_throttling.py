"""A 4-rank exchange while the service throttles a fraction of the requests.

``http_faults.ThrottleProxy`` sits between the adapters and the moto server and answers 10% or
50% of the HTTP requests itself: S3 with ``503 SlowDown``, DynamoDB with ``400
ProvisionedThroughputExceededException``.  Throttling means the request was not applied, so the
retry layer may repeat even non-idempotent requests (create-if-absent, the commit of a value);
with enough attempts (``retries=10``) the exchange should complete with every row delivered
exactly once; if the attempts run out, it must fail cleanly (a ``ThrottledError`` named in the
launch error), within the timeout, leaving nothing that ``cylon-store clean`` cannot remove.
"""

from __future__ import annotations

import logging
import math
import zlib

import pytest

import cylon_store as cs
from fault_targets import dynamodb_target, s3_target
from harness import check_outcome, run_exchange, settle_leftovers
from http_faults import ThrottleProxy

#: Enough attempts that 50% throttling rarely exhausts them (0.5^10 per operation).
THROTTLE_OPTS = {"retries": 10, "retry_base": 0.01, "retry_cap": 0.2}


@pytest.mark.slow
@pytest.mark.parametrize("p", [0.1, 0.5], ids=["10pct", "50pct"])
@pytest.mark.parametrize("backend", ["s3", "dynamodb"])
def test_exchange_under_throttling(backend, p, moto_endpoint, request, fault_report, caplog):
    make = s3_target if backend == "s3" else dynamodb_target
    target = make(moto_endpoint, **THROTTLE_OPTS)
    fault = f"throttle {int(p * 100)}%"
    seed = zlib.crc32(request.node.nodeid.encode())
    with ThrottleProxy(target.host, target.port, p=p, seed=seed) as proxy:
        url = target.url_via(proxy.host, proxy.port)
        with caplog.at_level(logging.DEBUG):
            res = run_exchange(url, backend=backend, fault=fault, rows=target.rows)
        proxy.passthrough()
        res.fault_stats = proxy.stats()
    try:
        settle_leftovers(res, target.direct_url, target.raw_count)
    finally:
        fault_report.update(res.record())
    check_outcome(res, secrets=target.secrets, log_records=tuple(caplog.records))
    stats = res.fault_stats
    assert stats.get("throttled", 0) > 0, f"nothing was throttled: {stats}"
    # The proxy throttled about the fraction asked for: each request is a seeded draw, so the
    # count is binomial; 4 standard deviations (plus 2) make a false alarm negligible.
    n = stats["requests"]
    assert abs(stats["throttled"] - p * n) <= 4 * math.sqrt(n * p * (1 - p)) + 2, stats
    # The large-value paths ran: S3 multipart uploads (CreateMultipartUpload and
    # CompleteMultipartUpload are POSTs), DynamoDB chunk items (BatchWriteItem).
    big = "s3.requests.POST" if backend == "s3" else "dynamodb.requests.BatchWriteItem"
    assert stats.get(big, 0) > 0, stats
    if res.error is not None:
        assert isinstance(res.error.__cause__, cs.ThrottledError), (
            f"the exchange failed under throttling with something else than ThrottledError: "
            f"{res.error}")
