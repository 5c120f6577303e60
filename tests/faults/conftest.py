"""Fixtures of the network fault suite: the servers behind the fault proxies, the ``target``
fixture (a ``fault_targets.Target`` per backend), and the outcome recorder.

Set ``CYLON_STORE_TEST_FAULTS_REPORT=/path/to/file.jsonl`` to have every fault test append one JSON
line: test id, whether it passed, fault, backend, outcome (completed | clean error), rows lost
and duplicated, seconds to completion or to the error, leftovers (keys under ``_cylon/`` seen by
a direct listing after the launch), what removed them (``close`` or ``cli clean``), raw backend
leftovers, the error and the proxy's counters.  Without the variable the recorder does nothing.
"""

from __future__ import annotations

import json
import os

import pytest

from fault_targets import (REDIS_PASSWORD, S3_BUCKET, dynamodb_target, flight_target,
                           redis_target, s3_target)

#: In the CYLON_STORE_TEST_* namespace, which stores leave alone (they refuse unknown
#: CYLON_STORE_* variables); pytest-xdist workers inherit it.
REPORT_ENV = "CYLON_STORE_TEST_FAULTS_REPORT"
REPORT_PATH = os.environ.get(REPORT_ENV)
if REPORT_PATH:
    REPORT_PATH = os.path.abspath(REPORT_PATH)


# -- the outcome recorder ------------------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item._faults_call_passed = rep.passed


@pytest.fixture
def fault_report(request):
    """A dict the test fills (``Outcome.record()``); appended as one JSON line to
    ``$CYLON_STORE_TEST_FAULTS_REPORT`` at teardown, if that is set."""
    record: dict = {}
    yield record
    path = REPORT_PATH
    if not path or not record:
        return
    line = json.dumps({"test": request.node.nodeid,
                       "passed": getattr(request.node, "_faults_call_passed", None),
                       "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                       **record}, default=str)
    import fcntl
    with open(path, "a") as f:   # xdist workers append to the same file
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line + "\n")
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- servers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from servers.redis import launch
    server = launch(tmp_path_factory.mktemp("faults-redis"), password=REDIS_PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_endpoint():
    import moto_server
    endpoint = moto_server.acquire()
    try:
        moto_server.client("s3").create_bucket(Bucket=S3_BUCKET)
    except Exception as exc:  # already there (a second acquire in this process)
        if "BucketAlreadyOwnedByYou" not in str(exc):
            moto_server.release()
            raise
    yield endpoint
    moto_server.release()


@pytest.fixture(scope="module")
def flight_service(tmp_path_factory):
    from servers.flight import launch
    service = launch("--memory-limit", "512MiB",
                     "--spill-dir", str(tmp_path_factory.mktemp("faults-flight-spill")))
    yield service
    service.stop()


@pytest.fixture
def target(request):
    """The backend named by the test's ``backend`` parameter, as a ``Target``."""
    name = request.param
    if name == "redis":
        return redis_target(request.getfixturevalue("redis_server"))
    if name == "s3":
        return s3_target(request.getfixturevalue("moto_endpoint"))
    if name == "dynamodb":
        return dynamodb_target(request.getfixturevalue("moto_endpoint"))
    if name == "flight":
        return flight_target(request.getfixturevalue("flight_service"))
    raise ValueError(name)
