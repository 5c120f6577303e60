"""Benchmarks: facade vs raw I/O, exchange throughput, operators vs peers.

Each module's ``--help`` works with the base install; its ``main`` checks, right after parsing
its arguments and before any work, that the packages it compares against are installed
(``pip install 'cylon-store[bench]'``), so a missing one is named up front, not minutes in.
"""

from __future__ import annotations

import importlib.util


def require(*modules: str, extra: str = "bench", why: str = "") -> None:
    """Exit with one clear message naming every missing module and the extra that brings it."""
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        for_what = f" ({why})" if why else ""
        raise SystemExit(f"this benchmark needs {', '.join(missing)}{for_what}, which is not "
                         f"installed: pip install 'cylon-store[{extra}]'")
