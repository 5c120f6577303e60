"""``s3://bucket/prefix``: Amazon S3 and S3-compatible stores (MinIO, moto, Ceph RGW) via boto3.

Guarantees: a put becomes visible atomically — one PUT, or a multipart upload that only appears
at CompleteMultipartUpload and is aborted on any failure, so no parts are left behind;
create-if-absent is S3's conditional write (``If-None-Match: *``) on the PUT or on the completion;
reads of large objects are concurrent ranged GETs pinned to the first response's ETag, so a
reader never mixes two versions.  Errors map by S3 error code.

==================  ============================================================================
put                 atomic: one PUT up to ``multipart_threshold``, else a multipart upload of
                    ``part_size`` parts, ``max_concurrency`` in flight.  The payload is sent
                    from the caller's buffers without joining them; a streaming put holds at
                    most ``multipart_threshold`` bytes, then about (``max_concurrency`` + 2)
                    parts (S3 parts are at least 5 MiB, so this is the floor of any S3 writer)
put, mode=CREATE    ``If-None-Match: *`` on the PUT or on CompleteMultipartUpload: exactly one
                    concurrent creator wins.  Fallback for endpoints without conditional writes
                    (``conditional_create=false``, or detected when an endpoint answers
                    ``NotImplemented``): the adapter declares ``conditional_create=False``, a
                    create raises ``NotSupportedError`` instead of racing, and ranks are given
                    explicitly (``cs.launch`` does) rather than claimed by rendezvous
get                 one GET up to ``multipart_threshold`` bytes (read as raw boto3 reads it);
                    a larger object or range also reads the rest as concurrent ``part_size``
                    ranged GETs pinned to the first response's ETag, straight into one
                    64-byte-aligned Arrow buffer; ``if_version`` (an ETag) is sent as If-Match
head                HEAD; version is the ETag
delete_many         DeleteObjects, 1000 keys per request; missing keys are not an error
list                ListObjectsV2 pages; S3 is strongly consistent for list-after-write
==================  ============================================================================

Requests are counted by kind in ``store.stats()`` (``s3.PUT``, ``s3.GET``, ``s3.HEAD``,
``s3.LIST``, ``s3.DELETE``, ``s3.MULTIPART_CREATE``/``_PART``/``_COMPLETE``/``_ABORT``), every
attempt included; ``request_cost_usd`` prices them.  Listing and I/O use boto3 directly: s3fs
would add an asyncio layer (aiobotocore) and a second, separately pinned botocore for no gain in
what this contract needs.
"""

from __future__ import annotations

import bisect
import io
import itertools
import logging
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Optional, Sequence

import pyarrow as pa

from cylon_store import pricing
from cylon_store.config import Size
from cylon_store.errors import (AlreadyExistsError, ConfigError, InvalidKeyError, NotFoundError,
                                NotSupportedError, PayloadTooLargeError, PreconditionError,
                                StoreError, ThrottledError, TransientError)

from . import _aws
from .base import Capabilities, ObjectMeta, PutMode

log = logging.getLogger(__name__)

# Limits from the S3 User Guide, "Amazon S3 multipart upload limits"
# (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html).
MIN_PART_SIZE = 5 << 20          # every part but the last
MAX_PART_SIZE = 5 << 30
MAX_PARTS = 10_000
MAX_SINGLE_PUT = 5 << 30         # largest object one PutObject may write
MAX_OBJECT_SIZE = 5 << 40        # largest object
#: DeleteObjects takes at most 1000 keys (S3 API Reference, DeleteObjects).
DELETE_BATCH = 1000
#: Parts grow by doubling every this many parts, so 10,000 parts reach MAX_OBJECT_SIZE even with
#: a small ``part_size`` (S3 allows parts of different sizes).
PART_GROWTH_EVERY = 500

# AWS list prices and request classes: one table for the project, with sources (pricing.py).
PRICE_PUT_CLASS = pricing.S3_PUT_CLASS
PRICE_GET_CLASS = pricing.S3_GET_CLASS
PUT_CLASS = pricing.S3_PUT_KINDS
GET_CLASS = pricing.S3_GET_KINDS

#: boto3 operation -> request kind in stats.
_KIND = {
    "PutObject": "PUT", "GetObject": "GET", "HeadObject": "HEAD", "HeadBucket": "HEAD",
    "ListObjectsV2": "LIST", "ListObjects": "LIST", "DeleteObjects": "DELETE",
    "DeleteObject": "DELETE", "CreateMultipartUpload": "MULTIPART_CREATE",
    "UploadPart": "MULTIPART_PART", "CompleteMultipartUpload": "MULTIPART_COMPLETE",
    "AbortMultipartUpload": "MULTIPART_ABORT",
}
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def request_cost_usd(stats: dict) -> float:
    """Dollar cost of the S3 requests in a ``store.stats()`` snapshot, at list prices."""
    return pricing.store_cost_usd("s3", stats)


@dataclass(frozen=True)
class S3Config(_aws.AwsOptions):
    #: "path" for most S3-compatible servers; None: boto3's choice ("virtual" on AWS).
    addressing_style: Optional[Literal["auto", "virtual", "path"]] = None
    #: Payloads above this size are written as a multipart upload (must be <= 5 GiB).
    multipart_threshold: Size = Size(32 << 20)
    #: Size of multipart parts and of the ranges a get reads concurrently.
    part_size: Size = Size(16 << 20)
    #: Parts uploaded, or ranges read, at once per put/get (also the pool size).
    max_concurrency: int = 8
    #: Server-side encryption: "AES256" (SSE-S3) or "aws:kms" (SSE-KMS).
    sse: Optional[Literal["AES256", "aws:kms"]] = None
    #: KMS key id or ARN for SSE-KMS; None: the bucket's or the account's default key.
    sse_kms_key_id: Optional[str] = None
    #: The endpoint implements S3 conditional writes (If-None-Match: *).  False for older
    #: S3-compatible servers: create-if-absent is then declared unsupported.
    conditional_create: bool = True
    #: Let botocore add and verify CRC checksums on the wire.  Off by default: every stored
    #: object already carries xxh3 checksums that the facade verifies on each read.
    wire_checksums: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ConfigError(f"option 'part_size' must be between 5 MiB and 5 GiB (S3 multipart "
                              f"limits), got {self.part_size}")
        if not MIN_PART_SIZE <= self.multipart_threshold <= MAX_SINGLE_PUT:
            raise ConfigError(f"option 'multipart_threshold' must be between 5 MiB and 5 GiB, got "
                              f"{self.multipart_threshold}")
        if self.max_concurrency < 1:
            raise ConfigError(f"option 'max_concurrency' must be >= 1, got {self.max_concurrency}")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ConfigError("option 'sse_kms_key_id' needs sse='aws:kms'")


class _ConditionalConflict(TransientError):
    """409 ConditionalRequestConflict: a concurrent conditional write is in flight; retry."""


class S3Adapter(_aws.AwsAdapter):
    scheme = "s3"
    service = "s3"
    thread_name_prefix = "cylon-s3"
    #: The facade retries whole operations; ``_call`` retries only where asked.
    default_retry = "none"
    not_applied = (ThrottledError, _aws.ConnectFailedError, _ConditionalConflict)
    Config = S3Config
    capabilities = Capabilities(conditional_create=True, byte_ranges=True,
                                max_object_size=MAX_OBJECT_SIZE, notification=False,
                                atomic_counter=False, streaming_put=True, billing="requests")

    def _locate(self, bucket: str, prefix: str) -> None:
        if not bucket:
            raise ConfigError(f"S3 URL needs a bucket: s3://bucket/prefix, got "
                              f"{self.location!r}", backend="s3")
        if not _BUCKET_RE.match(bucket):
            raise ConfigError(f"invalid S3 bucket name {bucket!r}", backend="s3")
        if "//" in prefix:
            raise ConfigError(f"S3 prefix {prefix!r} has an empty segment", backend="s3")
        self.bucket = bucket
        self.prefix = prefix
        self._prefix = f"{prefix}/" if prefix else ""
        config = self.config
        if not config.conditional_create:
            self.capabilities = _with(self.capabilities, conditional_create=False)
        self._bucket_known = False
        sse = {}
        if config.sse:
            sse["ServerSideEncryption"] = config.sse
            if config.sse_kms_key_id:
                sse["SSEKMSKeyId"] = config.sse_kms_key_id
        self._sse = sse

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # -- plumbing (client, pool, close and _call are AwsAdapter's) ------------------------
    def _make_client(self):
        cfg = self.config
        extra = {}
        if cfg.addressing_style:
            extra["s3"] = {"addressing_style": cfg.addressing_style}
        mode = "when_supported" if cfg.wire_checksums else "when_required"
        extra["request_checksum_calculation"] = mode
        extra["response_checksum_validation"] = mode
        client = _aws.make_client("s3", cfg, on_request=self._count, extra_config=extra)
        # botocore sends "Expect: 100-continue" (one more round trip) for file bodies but not
        # for bytes; ours are files only to avoid a copy.
        from botocore.handlers import add_expect_header
        for op in ("PutObject", "UploadPart"):
            client.meta.events.unregister(f"before-call.s3.{op}", add_expect_header)
        return client

    def _count(self, operation: str) -> None:
        self.stats.count(f"s3.{_KIND.get(operation, operation)}")

    def _object_key(self, key: str) -> str:
        if len((self._prefix + key).encode("utf-8", "surrogatepass")) > 1024:
            raise InvalidKeyError("key plus the store prefix is longer than S3's 1024 bytes",
                                  backend="s3", key=key)
        return self._prefix + key

    def _overrides(self, kw: dict, *, create: bool = False, pinned: bool = False) -> dict:
        """S3's own error codes (``create``: a create-if-absent put; ``pinned``: a read
        conditional on an ETag)."""
        overrides = {
            "NoSuchBucket": lambda: ConfigError(
                f"bucket {self.bucket!r} does not exist (create it, or check the URL, the region "
                f"and endpoint_url)", **kw),
            "InvalidBucketName": lambda: ConfigError(f"invalid bucket name {self.bucket!r}", **kw),
            "NoSuchKey": lambda: NotFoundError("no such key", **kw),
            "ConditionalRequestConflict": lambda: _ConditionalConflict(
                "a concurrent conditional write to this key is in progress", **kw),
            "InvalidArgument": lambda: ConfigError(
                "S3 rejected a request argument (InvalidArgument): check the sse and "
                "sse_kms_key_id options", **kw),
            "NoSuchUpload": lambda: StoreError(
                "the multipart upload disappeared (aborted by a lifecycle rule or another "
                "client)", **kw),
        }
        if create:
            overrides["PreconditionFailed"] = lambda: AlreadyExistsError(
                "key already exists (create-if-absent)", **kw)
            overrides["NotImplemented"] = lambda: self._no_conditional_writes(kw["op"], kw["key"])
        elif pinned:
            overrides["PreconditionFailed"] = lambda: PreconditionError(
                "object changed since it was first read", **kw)
        return overrides

    def _map_code(self, code: str, status: int, kw: dict, *, create: bool = False,
                  pinned: bool = False) -> StoreError:
        if code.startswith("KMS."):   # the KMS error codes S3 passes on: KMS.NotFoundException...
            return ConfigError(f"SSE-KMS failed ({code}): check sse_kms_key_id and the key's "
                               f"policy", **kw)
        return super()._map_code(code, status, kw, create=create, pinned=pinned)

    # -- put ----------------------------------------------------------------------------
    def put(self, key, chunks: Iterable, mode=PutMode.OVERWRITE) -> int:
        k = self._object_key(key)
        views = _aws.iter_views(chunks)
        head: list = []
        size = 0
        threshold = self.config.multipart_threshold
        for v in views:
            head.append(v)
            size += len(v)
            if size > threshold:
                return self._put_multipart(k, key, itertools.chain(head, views), mode)
        self._put_single(k, key, head, mode)
        return size

    def _put_single(self, k: str, key: str, views: list, mode: PutMode) -> None:
        if mode is PutMode.CREATE:
            self._require_conditional(key)
            self._call("put", key, lambda: self.client.put_object(
                Bucket=self.bucket, Key=k, Body=_body(views), IfNoneMatch="*", **self._sse),
                retry="safe", create=True)
        else:
            self._call("put", key, lambda: self.client.put_object(
                Bucket=self.bucket, Key=k, Body=_body(views), **self._sse))

    def _require_conditional(self, key: str) -> None:
        if not self.capabilities.conditional_create:
            raise NotSupportedError(
                "this S3 endpoint has no conditional writes (If-None-Match), so create-if-absent "
                "is not available: use mode='overwrite', and explicit ranks", backend="s3",
                op="put", key=key)

    def _no_conditional_writes(self, op: str, key: Optional[str]) -> NotSupportedError:
        """The endpoint answered NotImplemented to If-None-Match: declare the capability off, so
        that the facade and the communicator stop relying on it."""
        if self.capabilities.conditional_create:
            log.warning("%s: the endpoint does not implement S3 conditional writes; "
                        "create-if-absent is now declared unsupported", self.describe())
            self.stats.count("s3.conditional_unsupported")
            self.capabilities = _with(self.capabilities, conditional_create=False)
        return NotSupportedError("this S3 endpoint does not implement conditional writes "
                                 "(If-None-Match); create-if-absent is not available",
                                 backend="s3", op=op, key=key)

    def _put_multipart(self, k: str, key: str, views: Iterator[memoryview], mode: PutMode) -> int:
        create = mode is PutMode.CREATE
        if create:
            self._require_conditional(key)
        upload_id = self._call("put", key, lambda: self.client.create_multipart_upload(
            Bucket=self.bucket, Key=k, **self._sse), retry="all")["UploadId"]
        size = 0
        # At most max_concurrency parts in flight (bounds memory); any failure aborts the upload.
        with _aws.Gate(self.pool, self.config.max_concurrency,
                       on_error=lambda: self._abort(k, key, upload_id)) as gate:
            for number, body in enumerate(_parts(views, self.config.part_size), start=1):
                if number > MAX_PARTS:
                    raise PayloadTooLargeError(f"object exceeds {MAX_PARTS} multipart parts "
                                               f"(S3's limit)", backend="s3", op="put", key=key)
                size += sum(len(v) for v in body)
                gate.submit(self._upload_part, k, key, upload_id, number, body)
            parts = [{"PartNumber": n, "ETag": etag}
                     for n, etag in enumerate(gate.results(), start=1)]
            self._complete(k, key, upload_id, parts, create)
        return size

    def _upload_part(self, k, key, upload_id, number, views: list) -> str:
        return self._call("put", key, lambda: self.client.upload_part(
            Bucket=self.bucket, Key=k, UploadId=upload_id, PartNumber=number, Body=_body(views)),
            retry="all")["ETag"]

    def _complete(self, k, key, upload_id, parts, create: bool) -> None:
        cond = {"IfNoneMatch": "*"} if create else {}
        self._call("put", key, lambda: self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=k, UploadId=upload_id, MultipartUpload={"Parts": parts},
            **cond), retry="safe", create=create)

    def _abort(self, k, key, upload_id) -> None:
        try:
            self._call("put", key, lambda: self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=k, UploadId=upload_id), retry="all")
        except StoreError as exc:
            # Parts stay billed until a lifecycle rule (AbortIncompleteMultipartUpload) ends them.
            self.stats.count("s3.abort_failed")
            log.warning("%s: could not abort multipart upload %s of %r: %s", self.describe(),
                        upload_id, key, exc)

    # -- get ----------------------------------------------------------------------------
    def get(self, key, byte_range=None, if_version=None):
        k = self._object_key(key)
        step = self.config.part_size
        if byte_range is None:
            start, end = 0, None
        else:
            start, end = (int(x) for x in byte_range)
            if start < 0 or end < start:
                raise ConfigError(f"invalid byte range {byte_range!r}", backend="s3", op="get",
                                  key=key)
            if end == start:
                return self._empty(key, if_version)
        # The first GET covers up to multipart_threshold bytes: a value that was written with
        # one PUT is read with one GET; beyond, the rest comes in concurrent part_size ranges.
        first = self.config.multipart_threshold
        first_end = start + first if end is None else min(end, start + first)
        pinned = if_version is not None
        cond = {"IfMatch": if_version} if pinned else {}
        try:
            resp = self._call("get", key, lambda: self.client.get_object(
                Bucket=self.bucket, Key=k, Range=f"bytes={start}-{first_end - 1}", **cond),
                pinned=pinned)
        except StoreError as exc:
            code = _aws.error_code(exc.__cause__)[0] if exc.__cause__ is not None else ""
            if code == "InvalidRange":  # the range starts at or after the end (or it is empty)
                return self._empty(key, if_version)
            raise
        body = resp["Body"]
        try:
            m = _RANGE_RE.match(resp.get("ContentRange") or "")
            if m and m.group(3) != "*":
                total = int(m.group(3))
            else:  # the endpoint ignored Range and sent the whole object
                total = int(resp["ContentLength"])
                if start:
                    data = self._read_whole(body, total, key)
                    stop = total if end is None else min(end, total)
                    return data.slice(min(start, stop), max(0, stop - start))
                first_end = total
            stop = total if end is None else min(end, total)
            first_len = min(first_end, stop) - start
        except BaseException:
            body.close()
            raise
        if start + first_len >= stop:  # one response: read it as raw boto3 does
            return self._read_whole(body, first_len, key)
        try:
            out = pa.allocate_buffer(stop - start)
            view = memoryview(out).cast("B")
            etag = resp.get("ETag")
            offsets = list(range(start + first_len, stop, step))
            if len(offsets) > 1 and stop - offsets[-1] < step // 4:
                offsets.pop()  # a short tail rides with the range before it
            bounds = list(zip(offsets, offsets[1:] + [stop]))
            futures = [self.pool.submit(self._read_range, k, key, lo, view[lo - start:hi - start],
                                        etag, pinned) for lo, hi in bounds]
        except BaseException:
            body.close()
            raise
        try:
            self._read_into(body, view[:first_len], key)
            for f in futures:
                f.result()
        except BaseException as exc:
            _aws.cancel_all(futures)
            body.close()
            if isinstance(exc, PreconditionError) and not pinned:
                raise TransientError("object was replaced while it was read; read it again",
                                     backend="s3", op="get", key=key) from exc
            raise
        return out

    def _read_range(self, k, key, off, piece, etag, pinned) -> None:
        def attempt():
            resp = self._call("get", key, lambda: self.client.get_object(
                Bucket=self.bucket, Key=k, Range=f"bytes={off}-{off + len(piece) - 1}",
                **({"IfMatch": etag} if etag else {})), pinned=True)
            self._read_into(resp["Body"], piece, key)
        self._retry.call(attempt)

    def _read_into(self, body, view: memoryview, key) -> None:
        got = 0
        try:
            while got < len(view):
                n = body.readinto(view[got:])
                if not n:
                    break
                got += n
        except BaseException as exc:
            body.close()
            raise self._map(exc, "get", key) from exc
        finally:
            if got >= len(view):
                body.close()
        if got != len(view):
            raise TransientError(f"response ended after {got} of {len(view)} bytes", backend="s3",
                                 op="get", key=key)

    def _read_whole(self, body, size: int, key) -> pa.Buffer:
        """One response read as raw boto3 reads it (one copy, from the socket into bytes); the
        bytes are 16-byte aligned, which Arrow's zero-copy decoding accepts."""
        try:
            data = body.read()
        except BaseException as exc:
            body.close()
            raise self._map(exc, "get", key) from exc
        if len(data) != size:
            raise TransientError(f"response ended after {len(data)} of {size} bytes",
                                 backend="s3", op="get", key=key)
        return pa.py_buffer(data)

    def _empty(self, key, if_version) -> pa.Buffer:
        meta = self.head(key)
        if if_version is not None and meta.version != if_version:
            raise PreconditionError("object changed since it was first read", backend="s3",
                                    op="get", key=key)
        return pa.allocate_buffer(0)

    # -- head, delete, list -------------------------------------------------------------
    def head(self, key) -> ObjectMeta:
        k = self._object_key(key)
        try:
            resp = self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket,
                                                                           Key=k))
        except NotFoundError:
            self._check_bucket("head", key)
            raise
        return ObjectMeta(key, int(resp["ContentLength"]), resp.get("ETag", ""))

    def _check_bucket(self, op: str, key: Optional[str]) -> None:
        """A HEAD answers a bare 404 for a missing bucket too: tell the two apart, once."""
        if self._bucket_known:
            return
        try:
            self._call(op, key, lambda: self.client.head_bucket(Bucket=self.bucket))
        except NotFoundError as exc:
            raise ConfigError(f"bucket {self.bucket!r} does not exist (create it, or check the "
                              f"URL, the region and endpoint_url)", backend="s3", op=op,
                              key=key) from exc.__cause__
        self._bucket_known = True

    def delete_many(self, keys: Sequence[str]) -> None:
        objects = [{"Key": self._object_key(k)} for k in keys]
        batches = [objects[i:i + DELETE_BATCH] for i in range(0, len(objects), DELETE_BATCH)]
        if len(batches) == 1:
            self._delete_batch(batches[0])
            return
        for f in [self.pool.submit(self._delete_batch, b) for b in batches]:
            f.result()

    def _delete_batch(self, objects: list) -> None:
        resp = self._call("delete", None, lambda: self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}))
        errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            key = first.get("Key", "")[len(self._prefix):]
            err = _aws.map_error_code(first.get("Code", ""), backend="s3", op="delete", key=key)
            if isinstance(err, ThrottledError):
                self.stats.count("s3.throttled")
            raise err

    def list(self, prefix: str) -> list[ObjectMeta]:
        full = self._prefix + prefix
        strip = len(self._prefix)

        def run():
            out = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=full)
            for page in pages:
                for o in page.get("Contents", ()):
                    out.append(ObjectMeta(o["Key"][strip:], int(o["Size"]), o.get("ETag", "")))
            return out

        return self._call("list", prefix, run)

    def sweep(self, prefix: str) -> int:
        """Abort the multipart uploads under ``prefix`` that a killed writer left open (S3
        keeps, and bills, their parts until then; a lifecycle rule with
        AbortIncompleteMultipartUpload is the safety net).  Run it when no job under
        ``prefix`` is running."""
        full = self._prefix + prefix

        def run():
            aborted = 0
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for u in page.get("Uploads", ()):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"],
                                                       UploadId=u["UploadId"])
                    aborted += 1
            return aborted

        return self._call("sweep", prefix, run, retry="all")


# -- helpers ------------------------------------------------------------------------------

def _with(caps: Capabilities, **changes) -> Capabilities:
    from dataclasses import replace
    return replace(caps, **changes)


def _body(views: list):
    """A request body over ``views`` without copying them: the one bytes chunk as is, else a
    file over the buffers (a fresh one per attempt: botocore reads it to sign and to send)."""
    if len(views) == 1 and isinstance(views[0], (bytes, bytearray)):
        return views[0]
    return _ChunkReader(views)


class _ChunkReader(io.RawIOBase):
    """A read-only, seekable file over a list of buffers.  ``read`` hands out slices of the
    caller's buffers (zero-copy where a read falls inside one), which the HTTP layer sends and
    hashes as they are."""

    def __init__(self, views: list):
        super().__init__()
        self._views = [v if isinstance(v, memoryview) else memoryview(v) for v in views]
        self._starts = list(itertools.accumulate((len(v) for v in self._views), initial=0))
        self._size = self._starts[-1]
        self._pos = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def __len__(self):  # what botocore sends as Content-Length
        return self._size - self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def read(self, n=-1):
        if n is None or n < 0:
            n = self._size - self._pos
        pieces = []
        while n > 0 and self._pos < self._size:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            v = self._views[i]
            a = self._pos - self._starts[i]
            b = min(len(v), a + n)
            pieces.append(v[a:b])
            n -= b - a
            self._pos += b - a
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def part_size_for(number: int, part_size: int) -> int:
    """Size of part ``number`` (1-based): doubling every PART_GROWTH_EVERY parts, capped."""
    return min(MAX_PART_SIZE, part_size << ((number - 1) // PART_GROWTH_EVERY))


def _parts(views: Iterator, part_size: int) -> Iterator[list]:
    """Part bodies (lists of buffer slices).  A short tail (less than a quarter part, e.g. the
    framing after a table of exactly 128 MiB) rides with the part before it instead of costing
    one more request, so each part is held until the next one is cut."""
    held = None
    for number, piece in enumerate(_aws.cut(views, lambda n: part_size_for(n, part_size),
                                            join=False), start=1):
        size = sum(len(v) for v in piece)
        if size < part_size_for(number, part_size) and held is not None:  # the (short) last one
            held_size = sum(len(v) for v in held)
            if size < part_size_for(number, part_size) // 4 and held_size + size <= MAX_PART_SIZE:
                yield held + piece
                return
            yield held
            yield piece
            return
        if held is not None:
            yield held
        held = piece
    if held is not None:
        yield held
