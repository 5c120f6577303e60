"""Lambda handlers for tests/test_lambda_local.py, run by ``awslambdaric`` in the local service's
environments (importable there because an environment's PYTHONPATH is the test process's
``sys.path``). Nothing heavy is imported at module level: an environment's baseline RSS must stay
well under the 128 MB the memory test configures.
"""

from __future__ import annotations

import os
import time

ENV_KEYS = ("AWS_LAMBDA_RUNTIME_API", "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_LOG_GROUP_NAME",
            "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_LAMBDA_INITIALIZATION_TYPE", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR",
            "_HANDLER", "TZ", "TMPDIR", "_X_AMZN_TRACE_ID", "CYLON_LAMBDA_TEST_MARK")


def env_info(event, context):
    """The environment variables Lambda sets and what ``context`` offers."""
    tmp = os.environ.get("TMPDIR", "")
    return {"event": event, "env": {k: os.environ.get(k) for k in ENV_KEYS},
            "remaining_ms": context.get_remaining_time_in_millis(),
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "aws_request_id": context.aws_request_id,
            "function_name": context.function_name,
            "function_version": context.function_version,
            "invoked_function_arn": context.invoked_function_arn,
            "log_group_name": context.log_group_name,
            "client_context_custom": (context.client_context.custom
                                      if context.client_context else None),
            "pid": os.getpid(), "cwd": os.getcwd(), "tmp_is_dir": os.path.isdir(tmp)}


def echo(event, context):
    print(f"echo {event!r}")
    return event


def fail(event, context):
    raise ValueError(event.get("msg", "boom"))


def sleep(event, context):
    """Write the pid to ``event['pidfile']`` (if given), then sleep ``event['seconds']``."""
    if event.get("pidfile"):
        with open(event["pidfile"], "w") as f:
            f.write(str(os.getpid()))
    time.sleep(float(event.get("seconds", 1.0)))
    return {"slept": event.get("seconds", 1.0), "pid": os.getpid()}


def allocate(event, context):
    """Touch ``event['mb']`` MB in 16 MB steps (bytes objects are written, so resident), then
    hold it ``event['hold']`` seconds (long enough for the service's memory sampling)."""
    chunks = []
    for _ in range(int(event.get("mb", 400)) // 16):
        chunks.append(b"\x01" * (16 << 20))
        time.sleep(0.005)
    time.sleep(float(event.get("hold", 0)))
    return {"allocated_mb": 16 * len(chunks)}


def big(event, context):
    return "x" * int(event["bytes"])


def crash(event, context):
    os._exit(int(event.get("code", 3)))


def route(event, context):
    """One handler for many tests: ``event['op']`` names the function above to run."""
    return globals()[event.get("op", "echo")](event, context)
