"""The one public error hierarchy of cylon-store.

Every adapter maps its SDK's errors into these kinds by error code (never by message text) and
keeps the cause (``raise ... from exc``).  Messages name the backend, the operation and the key.
Errors pickle with their fields, so a launcher can re-raise a rank's error in the caller.
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "NotFoundError",
    "AlreadyExistsError",
    "PreconditionError",
    "NotSupportedError",
    "ThrottledError",
    "TransientError",
    "IntegrityError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ConfigError",
    "InvalidKeyError",
    "ExchangeError",
    "ExchangeTimeoutError",
    "SchemaMismatchError",
    "RendezvousError",
    "RankFailedError",
]


class StoreError(Exception):
    """Base of every error cylon-store raises on purpose.

    ``backend`` (e.g. ``"file"``), ``op`` (``"get"``) and ``key`` are kept as attributes and
    put in front of the message, so a log line says where it happened.
    """

    #: Whether the retry layer may try an idempotent operation again after this error.
    retryable = False

    def __init__(self, message: str = "", *, backend: str | None = None, op: str | None = None,
                 key: str | None = None):
        self.message = message
        self.backend = backend
        self.op = op
        self.key = key
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.backend:
            where.append(self.backend)
        if self.op:
            where.append(self.op)
        if self.key is not None:
            where.append(repr(self.key))
        return f"{' '.join(where)}: {self.message}" if where else self.message

    def __str__(self) -> str:  # OSError subclasses would otherwise format their own way
        return self._render()

    def __reduce__(self):
        return (_rebuild_error, (type(self), self.message, self.__dict__.copy()))


def _rebuild_error(cls, message, state):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class NotFoundError(StoreError, FileNotFoundError):
    """The key does not exist (also a ``FileNotFoundError``)."""


class AlreadyExistsError(StoreError, FileExistsError):
    """A create-if-absent put found the key already there (also a ``FileExistsError``)."""


class PreconditionError(StoreError):
    """A conditional operation's precondition (version, etag) did not hold."""


class NotSupportedError(StoreError, NotImplementedError):
    """The backend or launcher cannot do this; the message names the alternative."""


class ThrottledError(StoreError):
    """The backend asked us to slow down (S3 SlowDown, DynamoDB throttling, Redis busy)."""

    retryable = True


class TransientError(StoreError):
    """A failure that may pass: a dropped connection, a timeout, a 5xx."""

    retryable = True


class IntegrityError(StoreError):
    """What was read is not what was written: checksum mismatch, truncated or foreign object."""


class PayloadTooLargeError(StoreError):
    """The value exceeds what this backend or mode accepts."""


class PermissionDeniedError(StoreError, PermissionError):
    """The backend refused access (credentials, ACL, file mode)."""


class ConfigError(StoreError, ValueError):
    """Bad URL, unknown or invalid option, missing extra (also a ``ValueError``)."""


class InvalidKeyError(ConfigError):
    """A key that no backend may store: empty, absolute, ``..``, NUL, reserved names."""


class ExchangeError(StoreError):
    """A collective operation failed; ``seq`` is the collective's sequence number."""

    def __init__(self, message: str = "", *, seq: int | None = None, **kw):
        self.seq = seq
        super().__init__(message, **kw)


class ExchangeTimeoutError(ExchangeError, TimeoutError):
    """A wait ended at its timeout; ``missing`` lists the ranks that never delivered."""

    def __init__(self, message: str = "", *, missing: list[int] | None = None, **kw):
        self.missing = list(missing or [])
        super().__init__(message, **kw)


class SchemaMismatchError(ExchangeError):
    """Ranks sent partitions with different schemas; the message names both."""


class RendezvousError(ExchangeError):
    """Ranks could not agree on membership (job in use, leftovers, world size mismatch)."""


class RankFailedError(StoreError):
    """A rank of a launch raised or died; ``rank`` and the remote traceback are kept."""

    def __init__(self, message: str = "", *, rank: int | None = None,
                 remote_traceback: str | None = None, **kw):
        self.rank = rank
        self.remote_traceback = remote_traceback
        super().__init__(message, **kw)

    def _render(self) -> str:
        text = super()._render()
        if getattr(self, "remote_traceback", None):
            text += "\n\nRemote traceback of rank %s:\n%s" % (self.rank, self.remote_traceback)
        return text
