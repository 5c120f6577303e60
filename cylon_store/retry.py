"""The one retry layer: bounded attempts, capped exponential backoff with full jitter, and only
for operations the caller declares idempotent.  Only ``ThrottledError`` and ``TransientError``
(``StoreError.retryable``) are retried; every retry is counted in the store's stats.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Iterator, TypeVar

import tenacity

from .errors import StoreError

T = TypeVar("T")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, StoreError) and exc.retryable


def call(fn: Callable[[], T], *, idempotent: bool, attempts: int, base: float, cap: float,
         on_retry: Callable[[BaseException], None] | None = None) -> T:
    """Run ``fn``; retry it on a retryable error if ``idempotent``; re-raise the last error."""
    if not idempotent or attempts <= 1:
        return fn()
    # The first attempt runs bare (a collective makes thousands of small calls: the retry
    # machinery is only built once one has failed).
    try:
        return fn()
    except BaseException as exc:
        if not _retryable(exc):
            raise
        first = exc

    def before_sleep(state: tenacity.RetryCallState) -> None:
        # Only called after a failed attempt, so the outcome holds an exception.
        exc = state.outcome.exception() if state.outcome is not None else None
        if on_retry is not None and exc is not None:
            on_retry(exc)

    if on_retry is not None:
        on_retry(first)
    time.sleep(random.uniform(0, min(cap, base)))
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts - 1),
        wait=tenacity.wait_random_exponential(multiplier=base, max=cap),
        retry=tenacity.retry_if_exception(_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)


def poll_delays(first: float = 0.001, cap: float = 0.1, factor: float = 2.0) -> Iterator[float]:
    """Delays for a polling waiter: capped exponential growth, each one jittered in [d/2, d]."""
    d = first
    while True:
        yield random.uniform(d / 2, d)
        d = min(cap, d * factor)
