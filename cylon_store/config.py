"""Options from keyword arguments, the URL query and ``CYLON_STORE_*`` environment variables.

All validation happens here, once: an unknown option is a ``ConfigError`` that names it and lists
the valid ones; a value of the wrong type names the option and the expected type.  Precedence:
keyword argument > URL query > environment > default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
import warnings
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError

ENV_PREFIX = "CYLON_STORE_"

#: Environment variables with this prefix that are not store options (launcher/rank plumbing).
RESERVED_ENV = frozenset({
    "RANK", "WORLD_SIZE", "JOB", "URL", "TIMEOUT", "RESULT_DIR", "PAYLOAD", "LAUNCH_ID",
    "RENDEZVOUS", "EXCHANGE", "TEST_FAST", "BENCH_QUICK",
    "TOKEN",  # the shuffle service's token: read by flight:// and `cylon-store serve` themselves
})
#: Whole namespaces of such variables: the test suite and the benchmarks set their own knobs
#: (``CYLON_STORE_TEST_BACKENDS``) in the environment every store of the process reads.
RESERVED_ENV_PREFIXES = ("TEST_", "BENCH_")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4,
               "tb": 1000**4, "tib": 1 << 40}


class Size(int):
    """An ``int`` option that also accepts ``"64MiB"``, ``"1.5GB"`` in URLs and the environment."""


def parse_size(value) -> int:
    if isinstance(value, bool):
        raise ValueError("a size, not a bool")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (examples: 1048576, 64MiB, 1GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def _coerce(name: str, value, annotation):
    """Turn a string (URL, env) or Python value into the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        if len(non_none) == 1:
            return _coerce(name, value, non_none[0])
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"option {name!r} must be one of {list(args)}, got {value!r}")
        return value
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if annotation is Size:
            return parse_size(value)
        if annotation is int:
            if isinstance(value, bool):
                raise ValueError("an integer, not a bool")
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            if not isinstance(value, str):
                raise ValueError(f"a string, not {type(value).__name__}")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"option {name!r}: {exc}") from exc
    return value


def _fields(cls) -> dict[str, tuple[dataclasses.Field, typing.Any]]:
    """Public fields of an options dataclass with their resolved annotations."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[dataclasses.Field, typing.Any]] = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        out[f.name] = (f, hints[f.name])
    return out


def option_names(*classes) -> list[str]:
    names: list[str] = []
    for cls in classes:
        names.extend(_fields(cls))
    return sorted(set(names))


def redact_url(url: str) -> str:
    """``url`` safe to print: a password in the user part and secret-looking query values
    (``password``, ``token``, ``secret``, ``key`` ... in the option name) become ``***``."""
    if not isinstance(url, str) or "://" not in url:
        return url if isinstance(url, str) else repr(url)
    scheme, rest = url.split("://", 1)
    base, sep, query = rest.partition("?")
    netloc, slash, path = base.partition("/")
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = (user.split(":", 1)[0] + ":***" if ":" in user else "***") + "@" + host
    query = "&".join(
        item.split("=", 1)[0] + "=***"
        if any(w in item.split("=", 1)[0].lower() for w in _SECRET_WORDS) else item
        for item in query.split("&")) if query else query
    return f"{scheme}://{netloc}{slash}{path}{sep}{query}"


_SECRET_WORDS = ("password", "passwd", "token", "secret", "key", "credential", "auth")


def split_url(url: str) -> tuple[str, str, dict[str, str]]:
    """``scheme://location?query`` -> (scheme, location without query, query dict)."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"not a store URL: {redact_url(url)!r} (expected scheme://..., e.g. memory:// or "
                          f"file:///mnt/efs/shuffle)")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme:
        raise ConfigError(f"store URL {redact_url(url)!r} has no scheme")
    query: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if k in query:
            raise ConfigError(f"option {k!r} given twice in URL {redact_url(url)!r}")
        query[k] = v
    location = url.split("?", 1)[0]
    return scheme, location, query


def build_options(classes: typing.Sequence[type], *, kwargs: dict, query: dict,
                  env: typing.Mapping[str, str] | None = None,
                  known_env: typing.Callable[[], typing.Iterable[str]] = tuple,
                  what: str = "store", scheme: str | None = None,
                  common: typing.Sequence[type] = ()) -> list:
    """Build one frozen instance per dataclass in ``classes`` from the three sources.

    Precedence: keyword arguments, then the URL query, then the environment. In the
    environment, options of every backend (``common``: ``StoreOptions``) are
    ``CYLON_STORE_<OPTION>``; a backend's own options are ``CYLON_STORE_<SCHEME>_<OPTION>``
    (``CYLON_STORE_REDIS_CHUNK_SIZE``), so one environment can configure several backends
    without collisions. The flat ``CYLON_STORE_<OPTION>`` of a backend option still works, with
    a DeprecationWarning naming the new variable. ``known_env()`` lists the flat option names of
    other backends (called only when needed, since it may import adapters): such variables are
    left alone, while variables that match no option of any backend, nor a reserved name, are an
    error; so are unknown options in this backend's own namespace.
    """
    env = os.environ if env is None else env
    fields: dict[str, tuple[type, dataclasses.Field, typing.Any]] = {}
    for cls in classes:
        for name, (f, ann) in _fields(cls).items():
            fields[name] = (cls, f, ann)
    valid = sorted(fields)
    common_names = set(option_names(*common))
    own_prefix = f"{ENV_PREFIX}{scheme.upper()}_" if scheme else None

    for source, given in (("keyword argument", kwargs), ("URL query option", query)):
        for name in given:
            if name not in fields:
                raise ConfigError(f"unknown {what} {source} {name!r}; valid options: "
                                  f"{', '.join(valid) or '(none)'}")
    known_elsewhere: set | None = None
    other_namespaces: tuple | None = None
    env_values: dict[str, str] = {}
    scoped: dict[str, str] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name.upper() in RESERVED_ENV or name.upper().startswith(RESERVED_ENV_PREFIXES):
            continue
        if name in fields:
            if scheme and name not in common_names:
                warnings.warn(f"{var} is deprecated: {scheme}:// options in the environment are "
                              f"{own_prefix}<OPTION> ({own_prefix}{name.upper()})",
                              DeprecationWarning, stacklevel=3)
            env_values[name] = value
            continue
        if own_prefix and var.startswith(own_prefix):
            option = var[len(own_prefix):].lower()
            if option not in fields or option in common_names:
                mine = sorted(set(fields) - common_names)
                raise ConfigError(f"unknown {scheme}:// option in environment variable {var}; "
                                  f"{scheme}:// options: {', '.join(mine) or '(none)'} (options "
                                  f"of every backend are {ENV_PREFIX}<OPTION>)")
            scoped[option] = value
            continue
        if other_namespaces is None:
            from .registry import schemes
            other_namespaces = tuple(f"{s.upper()}_" for s in schemes() if s != scheme)
        if name.upper().startswith(other_namespaces):
            continue  # another backend's own option
        if known_elsewhere is None:
            known_elsewhere = set(known_env())
        if name in known_elsewhere:
            continue
        raise ConfigError(f"unknown {what} option in environment variable {var}; valid "
                          f"options: {', '.join(valid) or '(none)'}")
    env_values.update(scoped)  # the namespaced variable wins over a deprecated flat one

    values: dict[type, dict] = {cls: {} for cls in classes}
    for name, (cls, f, ann) in fields.items():
        if name in kwargs:
            raw = kwargs[name]
        elif name in query:
            raw = query[name]
        elif name in env_values:
            raw = env_values[name]
        else:
            continue
        values[cls][name] = _coerce(name, raw, ann)
    out = []
    for cls in classes:
        try:
            out.append(cls(**values[cls]))
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid {what} options: {exc}") from exc
    return out


def as_query(obj) -> dict:
    """The non-default fields of a config dataclass, for a readable URL or repr."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if v != default:
            out[f.name] = v
    return out


@dataclass(frozen=True)
class StoreOptions:
    """Options every store takes, whatever the backend."""

    #: Arrow IPC buffer compression: None, "lz4" or "zstd".
    compression: typing.Optional[typing.Literal["lz4", "zstd"]] = None
    #: Bytes covered by one checksum; also the read unit of ``get_batches``.
    segment_size: Size = Size(8 << 20)
    #: Attempts for idempotent operations that fail with a throttled or transient error.
    retries: int = 5
    #: Backoff of the retry layer: first delay and cap, in seconds (full jitter).
    retry_base: float = 0.05
    retry_cap: float = 2.0
    #: Threads a store may use for concurrent requests (exchange sends, ranged reads).
    concurrency: int = 4

    def __post_init__(self):
        if self.segment_size < 4096:
            raise ConfigError(f"option 'segment_size' must be >= 4096 bytes, got {self.segment_size}")
        if self.retries < 1:
            raise ConfigError(f"option 'retries' must be >= 1, got {self.retries}")
        if self.retry_base <= 0 or self.retry_cap < self.retry_base:
            raise ConfigError("options 'retry_base' and 'retry_cap' must satisfy 0 < retry_base <= retry_cap")
        if self.concurrency < 1:
            raise ConfigError(f"option 'concurrency' must be >= 1, got {self.concurrency}")
