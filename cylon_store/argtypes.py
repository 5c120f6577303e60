"""Argument types of the command line (``cylon-store`` and its subcommands): each rejects bad
input with one line that says what was expected, which argparse prefixes with the flag."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def int_range(lo: int, hi: Optional[int] = None, unit: str = "") -> Callable[[str], int]:
    """A whole number in ``[lo, hi]`` (no upper bound when ``hi`` is None); ``_`` and ``,``
    group digits."""
    of = f" of {unit}" if unit else ""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number{of}: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo:,} to {hi:,}" if hi is not None else f"at least {lo:,}"
            raise argparse.ArgumentTypeError(f"must be {bound}{suffix}, got {value:,}")
        return value
    return parse


def seconds(hi: Optional[float] = None, at_least: Optional[float] = None) -> Callable[[str], float]:
    """A finite, positive number of seconds (at least ``at_least``, at most ``hi`` if given)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        low_ok = value >= at_least if at_least is not None else value > 0
        if not (math.isfinite(value) and low_ok and (hi is None or value <= hi)):
            if at_least is not None:
                bound = f"{at_least:g} to {hi:g}" if hi is not None else f"at least {at_least:g}"
            else:
                bound = f"positive, at most {hi:g}" if hi is not None else "a positive, finite number of"
            raise argparse.ArgumentTypeError(f"must be {bound} seconds, got {text}")
        return value
    return parse


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """A positive duration: seconds, or a number with ``s``, ``m``, ``h`` or ``d`` (``90s``,
    ``30m``, ``1.5h``)."""
    t = text.strip().lower()
    unit = t[-1:] if t[-1:] in "smhd" and t[-1:] else ""
    try:
        value = float(t[:-1] if unit else t) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90, 90s, 30m, "
                                         f"1h)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text}")
    return value


def size(text: str) -> int:
    """A number of bytes: ``1048576``, ``512MiB``, ``2GiB``, ``1.5GB``."""
    from .config import parse_size
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512MiB, "
                                         f"2GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text}")
    return value
