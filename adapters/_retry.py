"""Retries an adapter runs itself, on the project's one retry layer (``cylon_store.retry``).

The facade retries whole operations; an adapter retries only what the facade cannot see or must
not repeat whole: one multipart part, BatchWriteItem's UnprocessedItems, a Redis notification,
the checkout of a connection before a non-idempotent command.  Those retries use the store's own
options (``retries``, ``retry_base``, ``retry_cap``), the same backoff as the facade, retry only
``StoreError.retryable`` errors (``ThrottledError``, ``TransientError``) of calls the adapter
declares idempotent, and count every retry in ``store.stats()["requests"]["retries"]`` exactly
as the facade does.  An adapter must not also retry what the facade retries (the attempts would
multiply), and the SDKs' own retries stay off (boto3: one attempt per call; redis-py: no retry).
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from cylon_store import retry
from cylon_store.config import StoreOptions

T = TypeVar("T")


class RetryPolicy:
    """The retry parameters of ``StoreOptions``, and ``on_retry`` (which counts the retry)."""

    def __init__(self, options: Optional[StoreOptions], on_retry: Callable[[BaseException], None]):
        o = options or StoreOptions()
        self.attempts, self.base, self.cap = o.retries, o.retry_base, o.retry_cap
        self.on_retry = on_retry

    def call(self, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        return retry.call(fn, idempotent=idempotent, attempts=self.attempts, base=self.base,
                          cap=self.cap, on_retry=self.on_retry)


def counting_retries(adapter) -> RetryPolicy:
    """The policy of ``adapter`` (a ``BlobAdapter``): its store's options, each retry counted
    under ``retries`` in its stats, as ``Store._retrying`` counts the facade's."""
    return RetryPolicy(adapter.options, lambda exc: adapter.stats.count("retries"))
