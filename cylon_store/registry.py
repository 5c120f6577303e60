"""The one registry: URL scheme -> its backend, imported lazily so ``import cylon_store`` stays light.

A scheme is a blob store (``target``: its adapter class) or a direct transport (``connect``:
the function that joins a job over it; its ``target`` answers ``open_store`` with an error that
explains why a transport has no put/get, and carries its options class). Third parties register
more with ``register("myscheme", "mypkg.mod:MyAdapter", extra=...)`` (or ``connect=
"mypkg.mod:connect"`` for a transport). A scheme whose optional dependencies are missing fails
with the pip command that installs them.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

from .errors import ConfigError


@dataclass(frozen=True)
class _Entry:
    target: Union[str, type]     # "module:Class" or the class itself
    extra: str | None            # pip extra that brings its dependencies
    requires: tuple              # top-level modules the adapter needs
    connect: Union[str, Callable, None] = None   # a direct transport's "module:function"


_REGISTRY: dict[str, _Entry] = {}
_LOADED: dict[str, type] = {}
_LOCK = threading.Lock()


def register(scheme: str, target: Union[str, type], *, extra: str | None = None,
             requires: tuple = (), replace: bool = False,
             connect: Union[str, Callable, None] = None) -> None:
    scheme = scheme.lower()
    with _LOCK:
        if scheme in _REGISTRY and not replace:
            raise ConfigError(f"scheme {scheme!r} is already registered (pass replace=True)")
        _REGISTRY[scheme] = _Entry(target, extra, tuple(requires), connect)
        _LOADED.pop(scheme, None)


def transport_connect(scheme: str) -> Optional[Callable]:
    """The connect function of a direct transport scheme, or None for a store scheme."""
    entry = _REGISTRY.get(scheme.lower())
    if entry is None or entry.connect is None:
        return None
    if callable(entry.connect):
        return entry.connect
    module_name, _, attr = entry.connect.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _missing(scheme, entry, exc.name or module_name) from exc
    return getattr(module, attr)


def schemes() -> list[str]:
    return sorted(_REGISTRY)


def adapter_class(scheme: str) -> type:
    scheme = scheme.lower()
    with _LOCK:
        if scheme in _LOADED:
            return _LOADED[scheme]
        entry = _REGISTRY.get(scheme)
    if entry is None:
        raise ConfigError(f"unknown store scheme {scheme!r}; known schemes: {', '.join(schemes())}")
    for module in entry.requires:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise _missing(scheme, entry, module) from exc
    if isinstance(entry.target, str):
        module_name, _, attr = entry.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # the adapter's own package, or a dependency it imports
            raise _missing(scheme, entry, exc.name or module_name) from exc
        cls = getattr(module, attr)
    else:
        cls = entry.target
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:  # the contract is enforced, not assumed: name what a third party left out
        raise ConfigError(f"the adapter {cls.__module__}.{cls.__qualname__} registered for "
                          f"{scheme}:// does not implement {', '.join(missing)} (see "
                          f"cylon_store.adapters.base.BlobAdapter)")
    with _LOCK:
        _LOADED[scheme] = cls
    return cls


def _missing(scheme: str, entry: _Entry, module: str) -> ConfigError:
    hint = f"pip install 'cylon-store[{entry.extra}]'" if entry.extra else f"pip install {module}"
    return ConfigError(f"the {scheme}:// backend needs the Python package {module!r}, which is "
                       f"not installed: {hint}")


def option_classes_of_other_schemes(scheme: str) -> list[type]:
    """Config classes of every *loadable* registered scheme but ``scheme`` (for env checks)."""
    out = []
    for other in schemes():
        if other == scheme:
            continue
        try:
            out.append(getattr(adapter_class(other), "Config"))
        except ConfigError:  # missing extra: its options cannot be set anyway
            continue
        except Exception as exc:  # a broken third-party adapter: say so, do not break others
            warnings.warn(f"the adapter registered for {other}:// cannot be loaded "
                          f"({type(exc).__name__}: {exc}); its options are not recognised in "
                          f"the environment", RuntimeWarning, stacklevel=2)
            continue
    return out


register("memory", "cylon_store.adapters.memory:MemoryAdapter")
register("file", "cylon_store.adapters.file:FileAdapter")
register("s3", "cylon_store.adapters.s3:S3Adapter", extra="s3", requires=("boto3",))
register("dynamodb", "cylon_store.adapters.dynamodb:DynamoDBAdapter", extra="dynamodb", requires=("boto3",))
register("redis", "cylon_store.adapters.redis:RedisAdapter", extra="redis", requires=("redis",))
register("rediss", "cylon_store.adapters.redis:RedisAdapter", extra="redis", requires=("redis",))
# Direct transports answer open_store() with NotSupportedError naming cs.connect (and own options).
register("mpi", "cylon_store.transports.mpi:MpiStoreAdapter", extra="mpi",
         connect="cylon_store.transports.mpi:connect")
register("ucx", "cylon_store.transports.ucx:UcxStoreAdapter", extra="ucx",
         connect="cylon_store.transports.ucx:connect")
# The project's shuffle service (cylon-store serve): pyarrow.flight comes with pyarrow.
register("flight", "cylon_store.adapters.flight:FlightAdapter")
register("flight+tls", "cylon_store.adapters.flight:FlightAdapter")
