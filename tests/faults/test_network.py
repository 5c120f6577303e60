"""A 4-rank exchange through a TCP fault proxy, for every networked backend and fault.

Faults (``proxy.FaultProxy``, seeded per test):

- ``reset``: 20% of the connections that carry 256 KiB are reset (RST) right there, in the
  middle of a message (every rank sends about 1 MB; to S3 about 6 MB, in multipart parts);
- ``stall``: 10% of the connections that carry 128 KiB have their data held for 1.5 s right
  there, mid-transfer; shorter than every timeout (socket/read/call timeouts of 5 s, collective
  timeout of 20 s).  The moto server closes its connection after every response, so for S3 and
  DynamoDB a connection is one request;
- ``drop``: 20% of new connections are accepted and reset at once.

The proxy hits the first eligible connection and then one in five (one in ten for the stall),
so every test sees its fault (gRPC keeps a single connection).

The exchange must either complete with every row delivered exactly once (checked by a content
digest per rank) or fail cleanly: ``RankFailedError`` caused by a ``StoreError`` it names, on
every rank a ``StoreError``, within the collective timeout + 30 s, and no secret (Redis
password, service token) in any error or log message.  Afterwards a direct listing of
``_cylon/`` must be empty, or ``cylon-store clean`` must empty it.  The proxy's counters must
show that the fault happened.
"""

from __future__ import annotations

import logging
import zlib

import pytest

from harness import check_outcome, run_exchange, settle_leftovers
from proxy import FaultProxy

BACKENDS = ["redis", "s3", "dynamodb", "flight"]

FAULTS = {
    "reset": lambda p: p.reset_after(256 << 10, 0.2),
    "stall": lambda p: p.stall(1.5, 0.1, after_bytes=128 << 10),
    "drop": lambda p: p.drop(0.2),
}
#: The counter that proves the fault was applied.
EVIDENCE = {"reset": "resets", "stall": "stalls", "drop": "drops"}


def _seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("target", BACKENDS, indirect=True)
def test_exchange_through_faulty_network(target, fault, request, fault_report, caplog):
    with FaultProxy(target.host, target.port, seed=_seed(request)) as proxy:
        FAULTS[fault](proxy)
        url = target.url_via(proxy.host, proxy.port)
        with caplog.at_level(logging.DEBUG):
            res = run_exchange(url, backend=target.name, fault=fault, rows=target.rows)
        proxy.passthrough()
        res.fault_stats = proxy.stats()
    try:
        settle_leftovers(res, target.direct_url, target.raw_count)
    finally:
        fault_report.update(res.record())
    check_outcome(res, secrets=target.secrets, log_records=tuple(caplog.records))
    assert res.fault_stats[EVIDENCE[fault]] > 0, (
        f"the {fault} fault never happened: {res.fault_stats}")
