"""``dynamodb://table[/namespace]``: values stored as DynamoDB items, chunked under the item limit.

Guarantees: a value becomes visible atomically, because its *commit item* is written last (its
chunks first, under a version id nobody knows yet); create-if-absent is a conditional PutItem of
the commit item (exactly one concurrent creator wins); commit items and listings are read
strongly consistent (immutable chunks need not be); an atomic counter (UpdateItem ADD) serves
the rank rendezvous.  Errors map by DynamoDB error code.

Table (created on demand, on-demand billing; or an existing table with this key schema)::

    pk  String  partition key        sk  String  sort key

=================  =============================  ===========================================
item               pk                             sk / attributes
=================  =============================  ===========================================
commit (one/key)   ``m#{namespace}``              sk = key; v = version, n = size, c = chunk
                                                  count (0: inline), s = chunk size,
                                                  b = the value itself when it is small
chunk              ``d#{version}#{i}``            sk = ``-``; b = bytes [i*s, (i+1)*s)
counter            ``c#{namespace}``              sk = key; v = the count
=================  =============================  ===========================================

Every item may carry ``expires_at`` (epoch seconds) when ``ttl`` is set: DynamoDB's TTL then
deletes what a crashed writer left behind.  Chunks of one value live in different partitions
(the chunk index is in the partition key), so a large value is not limited by the write rate of
one partition; commit items of a namespace share one partition, so ``list`` is a single Query.

==================  ============================================================================
put                 small values: one PutItem; larger: BatchWriteItem of the chunks (25 per
                    request, UnprocessedItems retried with backoff), then the commit PutItem
                    (ReturnValues=ALL_OLD names the replaced version, whose chunks are deleted).
                    A failed put deletes the chunks it wrote.
get                 GetItem (strongly consistent) of the commit item; then the chunks that cover
                    the byte range by BatchGetItem, concurrently, eventually consistent (chunks
                    are immutable: a lagging replica can only answer "not yet", and those are
                    re-read strongly consistent)
head                GetItem of the commit item; version is the commit's version id
delete_many         DeleteItem (ALL_OLD) per key, then the chunks of what it removed
list                Query of the namespace's commit partition, ``begins_with(sk, prefix)``
==================  ============================================================================

``store.stats()`` counts requests by API name (``dynamodb.PutItem`` ...) and the capacity
units the requests consume by AWS's published rules (``dynamodb.write_units``,
``dynamodb.read_units``), computed from item sizes so that emulators report the same figures as
AWS; ``request_cost_usd`` prices them at on-demand list prices.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import uuid
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa

from cylon_store import pricing
from cylon_store.config import Size
from cylon_store.errors import (AlreadyExistsError, ConfigError, NotFoundError,
                                PayloadTooLargeError, PreconditionError, StoreError,
                                ThrottledError, TransientError)
from cylon_store.retry import poll_delays

from . import _aws
from .base import Capabilities, ObjectMeta, PutMode

log = logging.getLogger(__name__)

# Limits from the DynamoDB Developer Guide, "Service, account, and table quotas in Amazon
# DynamoDB" (https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/ServiceQuotas.html):
#: "The maximum item size in DynamoDB is 400 KB, which includes both attribute name binary
#: length (UTF-8 length) and attribute value lengths (again binary length)."
MAX_ITEM_SIZE = 400 * 1024
#: Bytes of a value per chunk item (the default and the maximum of ``chunk_size``): under the
#: limit read either as 400,000 or 409,600 bytes, leaving room for the chunk's keys and
#: attribute names (about 60 bytes) and ``expires_at``.
CHUNK_SIZE = 390 * 1024
#: BatchWriteItem: at most 25 put or delete requests, 16 MB per call.
BATCH_WRITE_ITEMS = 25
#: BatchGetItem: at most 100 keys and 16 MB of response per call.
BATCH_GET_KEYS = 100
BATCH_GET_BYTES = 16 * 1000 * 1000
#: Default payload per batch request.  botocore holds about five copies of a request's payload
#: while it is in flight (base64, JSON text, the HTTP body, the decoded bytes), so memory per
#: put or get is about 5 x batch_bytes x max_concurrency, whatever the value's size.
BATCH_BYTES = 2 << 20
#: Capacity unit sizes: one write unit per 1 KB written, one strongly consistent read unit per
#: 4 KB read (Developer Guide, "Read/write capacity mode").
WRITE_UNIT = 1024
READ_UNIT = 4096
#: Values up to this size live inside their commit item (one request per put and per get); the
#: default keeps a commit item with a typical key within one 4 KB read unit, which matters
#: because ``list`` reads (and pays for) whole commit items.
INLINE_MAX = 3 * 1024
#: Largest value by default: beyond this, S3 is the right store (a get fans out to
#: size/CHUNK_SIZE items).  ``max_object_size`` raises it.
DEFAULT_MAX_OBJECT_SIZE = 1 << 30

# On-demand list prices: one table for the project, with sources (pricing.py).
PRICE_WRITE_UNIT = pricing.DYNAMODB_WRITE_UNIT
PRICE_READ_UNIT = pricing.DYNAMODB_READ_UNIT

PK, SK = "pk", "sk"
TTL_ATTRIBUTE = "expires_at"
KEY_SCHEMA = [{"AttributeName": PK, "KeyType": "HASH"}, {"AttributeName": SK, "KeyType": "RANGE"}]
_TABLE_RE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
#: Seconds to wait for a table created on demand to become ACTIVE.
TABLE_ACTIVE_TIMEOUT = 300.0


class _CommitUnknown(Exception):
    """A commit whose outcome could not be learned (its reply and the check both failed)."""

    def __init__(self, error: StoreError):
        super().__init__(str(error))
        self.error = error


def request_cost_usd(stats: dict) -> float:
    """Dollar cost of the capacity units in a ``store.stats()`` snapshot (on-demand prices)."""
    return pricing.store_cost_usd("dynamodb", stats)


@dataclass(frozen=True)
class DynamoDBConfig(_aws.AwsOptions):
    #: Create the table (on-demand billing) if it does not exist.
    create_table: bool = True
    #: Seconds after which DynamoDB's TTL may delete an item (None: never).  Enables TTL on
    #: ``expires_at`` for the table if it is not enabled yet.
    ttl: Optional[float] = None
    #: Values up to this size are stored inside their commit item.
    inline_max: Size = Size(INLINE_MAX)
    #: Largest value a put accepts.
    max_object_size: Size = Size(DEFAULT_MAX_OBJECT_SIZE)
    #: Batch requests in flight at once per put/get/delete (also the pool size).
    max_concurrency: int = 4
    #: Bytes of a value per chunk item (at most CHUNK_SIZE, which fits the 400 KB item limit).
    chunk_size: Size = Size(CHUNK_SIZE)
    #: Payload per BatchWriteItem/BatchGetItem request (bounds memory, see BATCH_BYTES).
    batch_bytes: Size = Size(BATCH_BYTES)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.inline_max <= MAX_ITEM_SIZE - 8 * 1024:
            raise ConfigError(f"option 'inline_max' must be between 0 and {MAX_ITEM_SIZE - 8192} "
                              f"bytes (the item limit less room for the key), got {self.inline_max}")
        if self.ttl is not None and self.ttl <= 0:
            raise ConfigError(f"option 'ttl' must be a positive number of seconds, got {self.ttl}")
        if self.max_concurrency < 1:
            raise ConfigError(f"option 'max_concurrency' must be >= 1, got {self.max_concurrency}")
        if self.max_object_size < 0:
            raise ConfigError("option 'max_object_size' must be >= 0")
        if not 1024 <= self.chunk_size <= CHUNK_SIZE:
            raise ConfigError(f"option 'chunk_size' must be between 1 KiB and {CHUNK_SIZE} bytes "
                              f"(DynamoDB's 400 KB item limit), got {self.chunk_size}")
        if self.batch_bytes < 1:
            raise ConfigError(f"option 'batch_bytes' must be positive, got {self.batch_bytes}")


class DynamoDBAdapter(_aws.AwsAdapter):
    scheme = "dynamodb"
    service = "dynamodb"
    thread_name_prefix = "cylon-ddb"
    #: One retry layer per call: the facade retries the idempotent operations (get, head,
    #: delete, list, delete_counter) as a whole, so their single-item calls are sent once here
    #: (retrying them here too multiplied the attempts: 5 x 5).  The adapter retries only what
    #: the facade cannot: the table set-up ("all", once per adapter), the commit and the counter
    #: ("safe": only when surely not applied), the check of a commit whose outcome is unknown,
    #: and the unprocessed items of its batch loops.
    default_retry = "none"
    Config = DynamoDBConfig
    capabilities = Capabilities(conditional_create=True, byte_ranges=True,
                                max_object_size=DEFAULT_MAX_OBJECT_SIZE, notification=False,
                                atomic_counter=True, streaming_put=True, billing="units")

    def _locate(self, table: str, namespace: str) -> None:
        if not _TABLE_RE.match(table):
            raise ConfigError(f"invalid DynamoDB table name {table!r} in {self.location!r}: "
                              f"3-255 letters, digits, '_', '-' or '.'", backend="dynamodb")
        self.table = table
        self.namespace = namespace
        self._commit_pk = f"m#{self.namespace}"
        self._counter_pk = f"c#{self.namespace}"
        if self.config.max_object_size != DEFAULT_MAX_OBJECT_SIZE:
            self.capabilities = dataclasses.replace(self.capabilities,
                                                    max_object_size=self.config.max_object_size)
        self._table_ready = False

    def describe(self) -> str:
        return f"dynamodb://{self.table}" + (f"/{self.namespace}" if self.namespace else "")

    # -- plumbing (client building, pool, close and _call are AwsAdapter's) ---------------
    @property
    def client(self):
        """The boto3 DynamoDB client; the first use also checks (or creates) the table."""
        c = super().client
        if not self._table_ready:
            self._ensure_table(c)
        return c

    def _overrides(self, kw: dict, *, create: bool = False, pinned: bool = False) -> dict:
        """DynamoDB's own error codes (``create``: the conditional put of a commit item; reads
        check versions themselves, so ``pinned`` changes nothing)."""
        region = self._client.meta.region_name if self._client is not None else None
        overrides = {
            "ResourceNotFoundException": lambda: ConfigError(
                f"table {self.table!r} does not exist in region {region} (deleted, or the wrong "
                f"region or endpoint_url)", **kw),
            "ValidationException": lambda: StoreError(
                "DynamoDB rejected the request (ValidationException)", **kw),
        }
        if create:
            overrides["ConditionalCheckFailedException"] = lambda: AlreadyExistsError(
                "key already exists (create-if-absent)", **kw)
        return overrides

    def _write_units(self, *item_sizes: int) -> None:
        self.stats.add("dynamodb.write_units", sum(max(1, math.ceil(s / WRITE_UNIT))
                                                   for s in item_sizes))

    def _read_units(self, *item_sizes: int, consistent: bool = True) -> None:
        units = sum(max(1, math.ceil(s / READ_UNIT)) for s in item_sizes)
        self.stats.add("dynamodb.read_units", units if consistent else units / 2)

    # -- the table ----------------------------------------------------------------------
    def _ensure_table(self, client) -> None:
        with self._lock:
            if self._table_ready:
                return
            created = False
            try:
                desc = self._call("connect", None, lambda: client.describe_table(TableName=self.table),
                                  retry="all")
            except ConfigError:  # ResourceNotFoundException
                if not self.config.create_table:
                    raise ConfigError(
                        f"table {self.table!r} does not exist in region "
                        f"{client.meta.region_name}; create it with key schema {PK} (String, "
                        f"HASH) and {SK} (String, RANGE), or pass create_table=true",
                        backend="dynamodb", op="connect") from None
                desc = self._create_table(client)
                created = True
            table = desc["Table"]
            schema = sorted((k["AttributeName"], k["KeyType"]) for k in table["KeySchema"])
            types = {a["AttributeName"]: a["AttributeType"]
                     for a in table.get("AttributeDefinitions", ())}
            if schema != [(PK, "HASH"), (SK, "RANGE")] or types.get(PK) != "S" or types.get(SK) != "S":
                raise ConfigError(
                    f"table {self.table!r} has key schema {schema} ({types}); cylon-store needs "
                    f"{PK} (String, HASH) and {SK} (String, RANGE): use another table",
                    backend="dynamodb", op="connect")
            if table.get("TableStatus") != "ACTIVE":
                self._wait_active(client)
            if self.config.ttl is not None:
                self._ensure_ttl(client, created)
            self._table_ready = True

    def _create_table(self, client) -> dict:
        log.info("creating DynamoDB table %s (on-demand)", self.table)
        try:
            self._call("connect", None, lambda: client.create_table(
                TableName=self.table, KeySchema=KEY_SCHEMA, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": PK, "AttributeType": "S"},
                                      {"AttributeName": SK, "AttributeType": "S"}]),
                       retry="all")
        except StoreError as exc:
            # Another process is creating it at the same moment: wait for it like for ours.
            if _aws.error_code(exc.__cause__)[0] != "ResourceInUseException":
                raise
        return self._wait_active(client)

    def _wait_active(self, client) -> dict:
        deadline = time.monotonic() + TABLE_ACTIVE_TIMEOUT
        delays = poll_delays(first=0.05, cap=2.0)
        while True:
            try:
                desc = self._call("connect", None, lambda: client.describe_table(TableName=self.table),
                                  retry="all")
                if desc["Table"].get("TableStatus") == "ACTIVE":
                    return desc
            except ConfigError:  # not visible yet right after CreateTable
                pass
            if time.monotonic() > deadline:
                raise TransientError(f"table {self.table!r} did not become ACTIVE within "
                                     f"{TABLE_ACTIVE_TIMEOUT:g}s", backend="dynamodb", op="connect")
            time.sleep(next(delays))

    def _ensure_ttl(self, client, created: bool) -> None:
        if not created:
            desc = self._call("connect", None, lambda: client.describe_time_to_live(
                TableName=self.table), retry="all").get("TimeToLiveDescription", {})
            status = desc.get("TimeToLiveStatus")
            if status in ("ENABLED", "ENABLING"):
                if desc.get("AttributeName") != TTL_ATTRIBUTE:
                    raise ConfigError(
                        f"table {self.table!r} has TTL on attribute {desc.get('AttributeName')!r}; "
                        f"cylon-store's ttl option uses {TTL_ATTRIBUTE!r}", backend="dynamodb",
                        op="connect")
                return
        try:
            self._call("connect", None, lambda: client.update_time_to_live(
                TableName=self.table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}),
                retry="all")
        except StoreError as exc:
            # ValidationException: TTL is already being enabled by another process.
            if _aws.error_code(exc.__cause__)[0] != "ValidationException":
                raise

    # -- items --------------------------------------------------------------------------
    def _expiry(self) -> dict:
        if self.config.ttl is None:
            return {}
        return {TTL_ATTRIBUTE: {"N": str(int(time.time() + self.config.ttl))}}

    def _commit_key(self, key: str) -> dict:
        return {PK: {"S": self._commit_pk}, SK: {"S": key}}

    @staticmethod
    def _chunk_key(version: str, i: int) -> dict:
        return {PK: {"S": f"d#{version}#{i}"}, SK: {"S": "-"}}

    # -- put ----------------------------------------------------------------------------
    def put(self, key, chunks: Iterable, mode=PutMode.OVERWRITE) -> int:
        client = self.client
        create = mode is PutMode.CREATE
        version = uuid.uuid4().hex
        chunk_size = self.config.chunk_size
        per_batch = max(1, min(BATCH_WRITE_ITEMS, self.config.batch_bytes // chunk_size))
        views = _aws.iter_views(chunks)
        head: list = []
        size = 0
        for v in views:
            head.append(v)
            size += len(v)
            if size > self.config.inline_max:
                break
        else:
            data = b"".join(head)
            item = {**self._commit_key(key), "v": {"S": version}, "n": {"N": str(size)},
                    "c": {"N": "0"}, "s": {"N": str(chunk_size)}, "b": {"B": data},
                    **self._expiry()}
            try:
                self._commit(client, key, item, version, create)
            except _CommitUnknown as unknown:  # an inline value has no chunks to keep or lose
                raise unknown.error from unknown.error.__cause__
            return size

        def all_views():
            yield from head
            yield from views

        written = 0
        size = 0
        # At most max_concurrency batches in flight (bounds memory); any failure deletes the
        # chunks written so far.
        with _aws.Gate(self.pool, self.config.max_concurrency,
                       on_error=lambda: self._delete_chunks_quietly(version, written,
                                                                    chunk_size)) as gate:
            batch: list = []
            for i, data in enumerate(_aws.cut(all_views(), lambda n: chunk_size)):
                size += len(data)
                if size > self.config.max_object_size:
                    raise PayloadTooLargeError(
                        f"value exceeds max_object_size={self.config.max_object_size} bytes "
                        f"(DynamoDB is no place for large values; use S3)", backend="dynamodb",
                        op="put", key=key)
                batch.append({**self._chunk_key(version, i), "b": {"B": data}, **self._expiry()})
                written = i + 1
                if len(batch) == per_batch:
                    gate.submit(self._batch_put, key, batch)
                    batch = []
            if batch:
                self._batch_put(key, batch)
            gate.results()
        item = {**self._commit_key(key), "v": {"S": version}, "n": {"N": str(size)},
                "c": {"N": str(written)}, "s": {"N": str(chunk_size)}, **self._expiry()}
        try:
            self._commit(client, key, item, version, create)
        except _CommitUnknown as unknown:
            # The commit may have landed: its chunks stay (deleting them could lose a
            # committed object).  If it did not, they are orphans no listing finds: the
            # table's TTL (option ttl=...) removes them; `cylon-store clean` cannot.
            raise unknown.error from unknown.error.__cause__
        except BaseException:
            self._delete_chunks_quietly(version, written, chunk_size)
            raise
        return size

    def _commit(self, client, key, item, version, create: bool) -> None:
        """Write the commit item last: the value becomes visible at once, or not at all."""
        params = {"TableName": self.table, "Item": item}
        if create:
            params["ConditionExpression"] = f"attribute_not_exists({PK})"
        else:
            params["ReturnValues"] = "ALL_OLD"
        new_size = _item_size(item)
        try:
            resp = self._call("put", key, lambda: client.put_item(**params), retry="safe",
                              create=create)
        except AlreadyExistsError:
            self._write_units(new_size)  # a failed condition still consumes the write
            raise
        except StoreError as exc:
            if not exc.retryable:
                raise
            # Unknown outcome (connection lost): the commit item says whether ours landed.
            try:
                # Retried here: nothing above this put retries a create or a stream.
                current = self._get_commit(client, key, "put", retry="all")
            except StoreError:
                raise _CommitUnknown(exc) from exc.__cause__
            if current is None or current["v"]["S"] != version:
                raise
            self._write_units(new_size)
            return
        old = resp.get("Attributes")
        self._write_units(max(new_size, _item_size(old) if old else 0))
        if old:
            self._delete_chunks_quietly(old["v"]["S"], int(old["c"]["N"]), int(old["s"]["N"]))

    def _batch_put(self, key, items: list) -> None:
        self._batch_write(key, [{"PutRequest": {"Item": it}} for it in items],
                          [_item_size(it) for it in items])

    def _batch_write(self, key, requests: list, sizes: list) -> None:
        """BatchWriteItem; UnprocessedItems are re-sent with backoff (counted as throttling)."""
        pending = list(zip(requests, sizes))

        def attempt():
            nonlocal pending
            reqs = [r for r, _ in pending]
            resp = self._call("put", None, lambda: self._client.batch_write_item(
                RequestItems={self.table: reqs}), retry="none")
            left = resp.get("UnprocessedItems", {}).get(self.table, [])
            still = _match_unprocessed(pending, left) if left else []
            unprocessed = {id(r) for r, _ in still}
            self._write_units(*(s for r, s in pending if id(r) not in unprocessed))
            pending = still
            self._raise_unprocessed(left, "items", "put", key)

        self._retry.call(attempt)

    def _raise_unprocessed(self, left: list, what: str, op: str, key) -> None:
        """Count what a batch request left unprocessed, and raise ``_Unprocessed`` (throttling:
        the batch loop's retry re-sends it with backoff)."""
        if left:
            self.stats.count("dynamodb.unprocessed", len(left))
            self.stats.count("dynamodb.throttled")
            raise _Unprocessed(f"{len(left)} {what} left unprocessed (capacity)",
                               backend="dynamodb", op=op, key=key)

    def _delete_chunks(self, version: str, count: int, chunk_size: int) -> None:
        reqs = [{"DeleteRequest": {"Key": self._chunk_key(version, i)}} for i in range(count)]
        # Deleting an item consumes units for its size: all chunks are full but the last.
        self._batch_write_all(reqs, [chunk_size] * count)

    def _batch_write_all(self, reqs: list, sizes: list) -> None:
        """BatchWriteItem of any number of requests, 25 per call, concurrently in the pool.
        Called only from callers' threads, never from a pool task (no nested waits)."""
        groups = [(reqs[i:i + BATCH_WRITE_ITEMS], sizes[i:i + BATCH_WRITE_ITEMS])
                  for i in range(0, len(reqs), BATCH_WRITE_ITEMS)]
        if len(groups) <= 1:
            for r, n in groups:
                self._batch_write(None, r, n)
            return
        futures = [self.pool.submit(self._batch_write, None, r, n) for r, n in groups]
        wait(futures)
        for f in futures:
            f.result()

    def _delete_chunks_quietly(self, version: str, count: int, chunk_size: int) -> None:
        if count <= 0:
            return
        try:
            self._delete_chunks(version, count, chunk_size)
        except StoreError as exc:
            self.stats.count("dynamodb.orphaned_chunks", count)
            log.warning("%s: could not delete %d chunks of version %s (%s); %s", self.describe(),
                        count, version, exc, "the TTL will remove them" if self.config.ttl else
                        "set ttl=... so that DynamoDB removes such leftovers")

    # -- get ----------------------------------------------------------------------------
    def _get_commit(self, client, key: str, op: str, retry: str = "none") -> Optional[dict]:
        resp = self._call(op, key, lambda: client.get_item(
            TableName=self.table, Key=self._commit_key(key), ConsistentRead=True), retry=retry)
        item = resp.get("Item")
        self._read_units(_item_size(item) if item else 1)
        return item

    def get(self, key, byte_range=None, if_version=None):
        client = self.client
        item = self._get_commit(client, key, "get")
        if item is None:
            raise NotFoundError("no such key", backend="dynamodb", op="get", key=key)
        version = item["v"]["S"]
        if if_version is not None and version != if_version:
            raise PreconditionError("object changed since it was first read", backend="dynamodb",
                                    op="get", key=key)
        size = int(item["n"]["N"])
        start, stop = 0, size
        if byte_range is not None:
            start, end = (int(x) for x in byte_range)
            if start < 0 or end < start:
                raise ConfigError(f"invalid byte range {byte_range!r}", backend="dynamodb",
                                  op="get", key=key)
            stop = min(end, size)
            start = min(start, stop)
        out = pa.allocate_buffer(stop - start)
        view = memoryview(out).cast("B")
        count = int(item["c"]["N"])
        if count == 0:
            view[:] = memoryview(item["b"]["B"])[start:stop]
            return out
        if stop == start:
            return out
        chunk = int(item["s"]["N"])
        first, last = start // chunk, (stop - 1) // chunk
        indices = list(range(first, last + 1))
        per = max(1, min(BATCH_GET_KEYS, self.config.batch_bytes // chunk, BATCH_GET_BYTES // chunk))
        groups = [indices[i:i + per] for i in range(0, len(indices), per)]

        def fetch(group):
            got = self._batch_get(key, version, group)
            for i in group:
                data = got.get(i)
                if data is None:
                    if if_version is not None:
                        raise PreconditionError("object changed since it was first read",
                                                backend="dynamodb", op="get", key=key)
                    raise TransientError("object was replaced while it was read; read it again",
                                         backend="dynamodb", op="get", key=key)
                lo, hi = max(start, i * chunk), min(stop, (i + 1) * chunk)
                view[lo - start:hi - start] = memoryview(data)[lo - i * chunk:hi - i * chunk]

        if len(groups) == 1:
            fetch(groups[0])
            return out
        # All in the pool: at most max_concurrency requests in flight (memory, see BATCH_BYTES).
        futures = [self.pool.submit(fetch, g) for g in groups]
        try:
            for f in futures:
                f.result()
        except BaseException:
            _aws.cancel_all(futures)
            raise
        return out

    def _batch_get(self, key, version: str, indices: list) -> dict:
        """Chunks ``indices`` of ``version``; missing chunks are absent from the result.

        Chunks are immutable (a new value gets a new version id, hence new chunk keys), so an
        eventually consistent read returns the right bytes or nothing, never stale bytes: the
        chunks are read eventually consistent (half the read units) and only those a lagging
        replica did not return yet are read again strongly consistent."""
        found = self._batch_get_round(key, version, indices, consistent=False)
        missing = [i for i in indices if i not in found]
        if missing:
            self.stats.count("dynamodb.consistent_rereads", len(missing))
            found.update(self._batch_get_round(key, version, missing, consistent=True))
        return found

    def _batch_get_round(self, key, version: str, indices: list, *, consistent: bool) -> dict:
        """One BatchGetItem of ``indices``, UnprocessedKeys re-requested with backoff."""
        pending = [self._chunk_key(version, i) for i in indices]
        found: dict[int, bytes] = {}

        def attempt():
            nonlocal pending
            resp = self._call("get", None, lambda: self._client.batch_get_item(RequestItems={
                self.table: {"Keys": pending, "ConsistentRead": consistent}}), retry="none")
            for it in resp.get("Responses", {}).get(self.table, ()):
                found[int(it[PK]["S"].rsplit("#", 1)[1])] = it["b"]["B"]
                self._read_units(_item_size(it), consistent=consistent)
            left = resp.get("UnprocessedKeys", {}).get(self.table, {}).get("Keys", [])
            pending = left
            self._raise_unprocessed(left, "keys", "get", key)

        self._retry.call(attempt)
        return found

    # -- head, delete, list -------------------------------------------------------------
    def head(self, key) -> ObjectMeta:
        item = self._get_commit(self.client, key, "head")
        if item is None:
            raise NotFoundError("no such key", backend="dynamodb", op="head", key=key)
        return ObjectMeta(key, int(item["n"]["N"]), item["v"]["S"])

    def delete_many(self, keys: Sequence[str]) -> None:
        """DeleteItem (ALL_OLD) of each commit item, concurrently; then the chunks of what they
        removed, all together in batches of 25."""
        client = self.client
        keys = list(dict.fromkeys(keys))

        def delete_one(key):
            resp = self._call("delete", key, lambda: client.delete_item(
                TableName=self.table, Key=self._commit_key(key), ReturnValues="ALL_OLD"))
            old = resp.get("Attributes")
            self._write_units(_item_size(old) if old else 1)
            return old

        removed, failed = [], []
        if len(keys) <= 1:
            for k in keys:
                try:
                    removed.append(delete_one(k))
                except StoreError as exc:
                    failed.append(exc)
        else:
            futures = [self.pool.submit(delete_one, k) for k in keys]
            wait(futures)
            for f in futures:
                try:
                    removed.append(f.result())
                except StoreError as exc:
                    failed.append(exc)
        # The chunks of every commit item that did go are deleted before any failure is
        # raised: a retry of the whole call finds those items gone, and nothing could find
        # their chunks afterwards (they are not under any listable key).
        reqs, sizes = [], []
        for old in removed:
            if old and int(old["c"]["N"]):
                version, chunk = old["v"]["S"], int(old["s"]["N"])
                for i in range(int(old["c"]["N"])):
                    reqs.append({"DeleteRequest": {"Key": self._chunk_key(version, i)}})
                    sizes.append(chunk)
        self._batch_write_all(reqs, sizes)
        if failed:
            raise failed[0]

    def list(self, prefix: str) -> list[ObjectMeta]:
        client = self.client
        values: dict[str, dict[str, str]] = {":p": {"S": self._commit_pk}}
        params: dict[str, Any] = {"TableName": self.table, "ConsistentRead": True,
                                  "ExpressionAttributeValues": values}
        if prefix:
            params["KeyConditionExpression"] = f"{PK} = :p AND begins_with({SK}, :s)"
            values[":s"] = {"S": prefix}
        else:
            params["KeyConditionExpression"] = f"{PK} = :p"
        out = []
        start = None
        while True:
            page = dict(params, **({"ExclusiveStartKey": start} if start else {}))
            resp = self._call("list", prefix, lambda: client.query(**page))
            items = resp.get("Items", ())
            # A Query's read units are the summed size of the items read, rounded up once.
            self.stats.add("dynamodb.read_units",
                           max(1, math.ceil(sum(_item_size(i) for i in items) / READ_UNIT)))
            for it in items:
                out.append(ObjectMeta(it[SK]["S"], int(it["n"]["N"]), it["v"]["S"]))
            start = resp.get("LastEvaluatedKey")
            if not start:
                return out

    # -- atomic counter -----------------------------------------------------------------
    def incr(self, key: str) -> int:
        client = self.client
        names = {"#v": "v"}
        values = {":one": {"N": "1"}}
        expr = "ADD #v :one"
        if self.config.ttl is not None:
            names["#x"] = TTL_ATTRIBUTE
            values[":x"] = self._expiry()[TTL_ATTRIBUTE]
            expr += " SET #x = :x"
        # Not idempotent: retried only when the service surely did not apply it (throttling).
        resp = self._call("incr", key, lambda: client.update_item(
            TableName=self.table, Key={PK: {"S": self._counter_pk}, SK: {"S": key}},
            UpdateExpression=expr, ExpressionAttributeNames=names,
            ExpressionAttributeValues=values, ReturnValues="UPDATED_NEW"), retry="safe")
        self._write_units(1)
        return int(resp["Attributes"]["v"]["N"])

    def delete_counter(self, key: str) -> None:
        client = self.client
        self._call("delete_counter", key, lambda: client.delete_item(
            TableName=self.table, Key={PK: {"S": self._counter_pk}, SK: {"S": key}}))
        self._write_units(1)


# -- helpers ------------------------------------------------------------------------------

def _value_size(v: dict) -> int:
    (t, x), = v.items()
    if t == "S":
        return len(x.encode("utf-8"))
    if t == "B":
        return len(x)
    if t == "N":  # about one byte per two significant digits, plus one
        return len(x.lstrip("-").replace(".", "")) // 2 + 1
    if t == "BOOL" or t == "NULL":
        return 1
    return len(str(x))


def _item_size(item: Optional[dict]) -> int:
    """Item size as DynamoDB bills it: attribute names plus values, in bytes."""
    if not item:
        return 0
    return sum(len(name.encode("utf-8")) + _value_size(v) for name, v in item.items())


class _Unprocessed(ThrottledError):
    """Batch items the service left unprocessed (capacity): retried with backoff."""


def _match_unprocessed(pending: list, left: list) -> list:
    """The (request, size) pairs of ``pending`` that the service returned as unprocessed."""
    def ident(req):
        body = req.get("PutRequest", {}).get("Item") or req.get("DeleteRequest", {}).get("Key")
        return (body[PK]["S"], body[SK]["S"], "PutRequest" in req)

    wanted = {ident(r) for r in left}
    return [(r, s) for r, s in pending if ident(r) in wanted]
