"""Serverless execution: the same ``fn(comm)`` on AWS Lambda, and locally exactly as Lambda runs it.

``handler`` is the one Lambda entry (``cylon_store.serverless.handler``); ``cs.launch(...,
launcher="lambda", function=NAME)`` is the driver (``driver.py``); ``local.py`` is a local Lambda
service (Invoke API on loopback, each invocation in the real ``awslambdaric`` runtime loop);
``deploy.py`` builds the deployment artifacts and deploys them; ``report.py`` prices a run.
Importing this package loads neither boto3 nor awslambdaric.
"""

from __future__ import annotations


def handler(event, context):
    """The Lambda function's handler: run one rank of a ``cs.launch(..., launcher="lambda")``."""
    from .rank import handle
    return handle(event, context)


__all__ = ["handler"]
