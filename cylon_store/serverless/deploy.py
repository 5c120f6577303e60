"""Lambda deployment artifacts and deploy (being written)."""

from __future__ import annotations


def add_build_arguments(p) -> None:
    p.set_defaults(fn=main_build)


def add_deploy_arguments(p) -> None:
    p.set_defaults(fn=main_deploy)


def main_build(args) -> int:
    raise NotImplementedError


def main_deploy(args) -> int:
    raise NotImplementedError
