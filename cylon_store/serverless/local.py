"""A local Lambda service (being written: see add_arguments/main)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.set_defaults(fn=main)


def main(args) -> int:
    raise NotImplementedError
