"""S3 on moto's HTTP server (shared with the dynamodb backend): one bucket, a fresh prefix per
store.  Small multipart settings so that ordinary tests exercise multipart uploads and
concurrent ranged reads too."""

import uuid

import moto_server

from . import Backend

NAME = "s3"
BUCKET = "cylon-test"


def start(tmp_path_factory) -> Backend:
    endpoint = moto_server.acquire()
    moto_server.client("s3").create_bucket(Bucket=BUCKET)

    def make_url() -> str:
        return (f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}?endpoint_url={endpoint}"
                f"&region={moto_server.REGION}&multipart_threshold=5MiB&part_size=5MiB")

    return Backend(NAME, make_url, stop=moto_server.release, traits={"processes": True})
