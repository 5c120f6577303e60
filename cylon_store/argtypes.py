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
