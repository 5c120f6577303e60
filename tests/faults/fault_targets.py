"""The backends of the fault suite as ``Target``s: how to reach one store through a proxy
(``url_via(host, port)``, with the fault tests' options: short timeouts, fast retries, small
chunks so that the chunked and multipart paths run), the same store directly (``direct_url``,
for listing leftovers and cleaning up), its secrets and a count of everything the backend holds
for it (``raw_count``: chunks, uploads, items — what a ``_cylon/`` listing cannot see).

Each factory makes a fresh store (prefix, table) per call.  The servers come from the fixtures
in ``conftest.py``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from harness import RETRY_OPTS, query

REDIS_PASSWORD = "faults-redis-pw-" + uuid.uuid4().hex[:12]
S3_BUCKET = "cylon-faults"


@dataclass
class Target:
    name: str
    host: str
    port: int
    #: URL of the store through ``host:port`` (a proxy), with the backend's fault options.
    url_via: Callable[[str, int], str]
    #: The same store reached directly (for listing leftovers and cleaning up).
    direct_url: str
    #: Rows per (sender, destination) pair: about 1 MB per rank (S3: 5.8 MB, for multipart).
    rows: int
    #: Strings that must appear in no error or log message (password, token).
    secrets: tuple = ()
    #: Objects of any kind the backend holds for this store (chunks, uploads, items...).
    raw_count: Optional[Callable[[], int]] = None


def _hostport(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.split("://", 1)[-1].rstrip("/").rsplit(":", 1)
    return host, int(port)


def redis_target(server, **extra) -> Target:
    prefix = f"f-{uuid.uuid4().hex[:12]}:"
    opts = {"prefix": prefix, "chunk_size": "64KiB", "socket_timeout": 5, "connect_timeout": 2,
            **RETRY_OPTS, **extra}

    def url_via(host, port):
        return f"redis://default:{REDIS_PASSWORD}@{host}:{port}/0?{query(opts)}"

    def raw_count():
        client = server.client(password=REDIS_PASSWORD)
        try:
            return sum(1 for _ in client.scan_iter(match=prefix + "*", count=1000))
        finally:
            client.close()

    return Target("redis", "127.0.0.1", server.port, url_via, url_via("127.0.0.1", server.port),
                  rows=8000, secrets=(REDIS_PASSWORD,), raw_count=raw_count)


def s3_target(endpoint: str, **extra) -> Target:
    import moto_server
    prefix = f"f-{uuid.uuid4().hex[:12]}"
    opts = {"region": moto_server.REGION, "multipart_threshold": "5MiB", "part_size": "5MiB",
            "max_concurrency": 4, "connect_timeout": 2, "read_timeout": 5, **RETRY_OPTS, **extra}
    host, port = _hostport(endpoint)

    def url_via(h, p):
        return f"s3://{S3_BUCKET}/{prefix}?endpoint_url=http://{h}:{p}&{query(opts)}"

    def raw_count():
        c = moto_server.client("s3")
        objects = c.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix + "/").get("KeyCount", 0)
        uploads = len(c.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=prefix + "/")
                      .get("Uploads", []))
        return objects + uploads

    # About 5.8 MB per rank: each rank's combined object (one per sender) crosses the 5 MiB
    # multipart threshold, so uploads go in parts and reads in ranges.
    return Target("s3", host, port, url_via, url_via(host, port), rows=48_000,
                  raw_count=raw_count)


def dynamodb_target(endpoint: str, **extra) -> Target:
    import moto_server
    table = f"cylon-f-{uuid.uuid4().hex[:12]}"
    opts = {"region": moto_server.REGION, "chunk_size": "64KiB", "batch_bytes": "256KiB",
            "max_concurrency": 2, "connect_timeout": 2, "read_timeout": 5, **RETRY_OPTS, **extra}
    host, port = _hostport(endpoint)

    def url_via(h, p):
        return f"dynamodb://{table}?endpoint_url=http://{h}:{p}&{query(opts)}"

    def raw_count():
        c = moto_server.client("dynamodb")
        try:
            return c.scan(TableName=table, Select="COUNT")["Count"]
        except c.exceptions.ResourceNotFoundException:
            return 0

    return Target("dynamodb", host, port, url_via, url_via(host, port), rows=8000,
                  raw_count=raw_count)


def flight_target(service, **extra) -> Target:
    prefix = f"f-{uuid.uuid4().hex[:12]}/"
    opts = {"token": service.token, "prefix": prefix, "call_timeout": 5,
            "message_size": "64KiB", **RETRY_OPTS, **extra}
    host, port = _hostport(service.url)

    def url_via(h, p):
        return f"flight://{h}:{p}?{query(opts)}"

    direct = url_via(host, port)

    def raw_count():
        import cylon_store as cs
        with cs.open_store(direct) as store:
            return len(store.list(""))

    return Target("flight", host, port, url_via, direct, rows=8000, secrets=(service.token,),
                  raw_count=raw_count)
