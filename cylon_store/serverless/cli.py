"""``cylon-store lambda build | deploy | local``: the serverless commands of the CLI.

Each subcommand's arguments and entry live next to what it drives (``deploy.py``, ``local.py``);
this module only wires them under ``cylon-store lambda``. No optional extra is imported until a
subcommand runs, so every ``--help`` works with the base install.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Add ``lambda`` and its subcommands to the ``cylon-store`` subparsers ``sub``."""
    from . import deploy, local

    p = sub.add_parser("lambda", help="AWS Lambda: build the deployment artifact, deploy it, or "
                                      "run a local Lambda service",
                       description="Run cylon-store ranks on AWS Lambda (cs.launch(..., "
                                   "launcher='lambda', function=NAME)), or locally exactly as "
                                   "Lambda runs them.")
    lam = p.add_subparsers(dest="lambda_command", metavar="{build,deploy,local}")
    p.set_defaults(fn=lambda args: (p.print_help(), 2)[1])
    deploy.add_build_arguments(lam.add_parser(
        "build", help="build the deployment zip (and layer) for x86_64/arm64, and a Dockerfile",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    deploy.add_deploy_arguments(lam.add_parser(
        "deploy", help="create or update the function through boto3 and wait until it is active",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    local.add_arguments(lam.add_parser(
        "local", help="a local Lambda service on loopback: Invoke API, awslambdaric runtime loop",
        formatter_class=argparse.RawDescriptionHelpFormatter))
