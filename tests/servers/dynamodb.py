"""DynamoDB on moto's HTTP server (shared with the s3 backend): a fresh table per store,
created on demand by the adapter.

The URL sets small chunks and batches: botocore holds about four copies of a request's payload
(base64 in JSON), so the conformance suite's streaming-read bound (a few 256 KiB segments) needs
requests of about 128 KiB; and a 64 MiB value limit, since DynamoDB is no store for the suite's
300 MiB payload (the large-payload check then verifies the PayloadTooLargeError path, nothing
written).  tests/test_dynamodb.py covers the default settings."""

import uuid

import moto_server

from . import Backend

NAME = "dynamodb"


def start(tmp_path_factory) -> Backend:
    endpoint = moto_server.acquire()

    def make_url() -> str:
        return (f"dynamodb://cylon-{uuid.uuid4().hex[:12]}?endpoint_url={endpoint}"
                f"&region={moto_server.REGION}&chunk_size=32KiB&batch_bytes=128KiB"
                f"&max_concurrency=2&max_object_size=64MiB")

    return Backend(NAME, make_url, stop=moto_server.release, traits={"processes": True})
