"""One module per backend the tests run against.

Each module defines ``NAME`` and ``start(tmp_path_factory) -> Backend``; the conftest discovers
them, starts each once per session (real servers on loopback) and gives every test a fresh,
isolated store URL from ``Backend.make_url()``.  A backend that cannot start fails the session:
in CI a backend test never silently skips.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Backend:
    name: str
    make_url: Callable[[], str]
    stop: Callable[[], None] = lambda: None
    #: Capabilities the tests may rely on; e.g. {"processes": True} if ranks in other OS
    #: processes can share it.
    traits: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Backends started in this process (one per name per session); the conftest stops them.
STARTED: dict = {}


def started_backend(name: str, tmp_path_factory) -> Backend:
    """The session's backend ``name`` (``servers/<name>.py``), started on first use."""
    if name not in STARTED:
        import importlib
        module = importlib.import_module(f"servers.{name}")
        STARTED[name] = module.start(tmp_path_factory)
    return STARTED[name]
