"""``cylon-store bench`` at its smallest size on every backend (real servers it starts itself),
with every peer, so that the one benchmark entry cannot rot: all cells measured, every exchange
exact, every BDB answer equal to DuckDB's, the report, charts and recommendation written, no
token printed, nothing left running; Ctrl-C still writes the partial results; --compare works.
No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cylon_store.bench import suite

SMALL = ["--ranks", "2", "--sizes", "1MB", "--rows", "2000", "--repeat", "1"]


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cylon_store.cli", "bench", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CYLON_STORE_TOKEN": ""})


@pytest.mark.slow
def test_every_backend_every_workload_with_peers(tmp_path):
    out = tmp_path / "run"
    p = bench(*SMALL, "--peers", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr[-5000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["backends"]) == set(suite.BACKENDS), (res["skipped"], p.stderr[-3000:])
    assert not res["errors"] and not res["interrupted"]
    cells = res["cells"]
    for backend in suite.BACKENDS:
        mine = {(c["workload"], c["name"]) for c in cells if c["backend"] == backend}
        assert mine == {("latency", "barrier"), ("latency", "tiny_exchange"), ("latency", "allgather"),
                        ("exchange", "all-to-all"), ("operators", "join"), ("operators", "groupby"),
                        ("operators", "sort"), ("bdb", "selection"), ("bdb", "aggregation"),
                        ("bdb", "join")}, backend
    for c in cells:
        assert c["best_s"] > 0 and c["best_s"] <= c["median_s"] and c["usd"]["total"] > 0
        if c["workload"] == "exchange":
            assert c["rows_ok"] is True and c["bytes_moved"] > 0
        if c["workload"] == "bdb":
            assert c["check"] == "ok", c
    ex = {c["backend"]: c for c in cells if c["workload"] == "exchange"}
    for backend in ("memory", "file", "redis", "s3", "mpi"):
        assert ex[backend]["raw_best_s"] > 0, backend
    assert ex["s3"]["requests"].get("s3.PUT", 0) > 0 and ex["dynamodb"]["usd"]["store"] > 0
    assert ex["redis"]["usd"]["store"] > 0 and ex["mpi"]["usd"]["store"] == 0  # node-hours / none
    peers = {(q["peer"], q["workload"]) for q in res["peers"]}
    assert {("duckdb", "operators"), ("polars", "operators"), ("dask-p2p", "operators"),
            ("duckdb", "bdb"), ("polars", "bdb"), ("dask-p2p", "exchange")} <= peers
    report = (out / "report.md").read_text()
    for section in ("## Latency", "## Exchange", "## Operators", "## Big Data Benchmark", "## Recommendation"):
        assert section in report
    for chart in ("exchange_throughput.png", "dollars_per_gb.png", "latency_by_ranks.png",
                  "operators_vs_peers.png", "bdb_vs_peers.png"):
        assert (out / chart).stat().st_size > 1000 and f"({chart})" in report
    assert "recommendation" in p.stdout and "exchange of 1 MB on 2 ranks" in p.stdout
    assert "Traceback" not in p.stderr
    # The flight token (random, set for the ranks only) appears nowhere.
    for text in (p.stdout, p.stderr, report, (out / "results.json").read_text()):
        assert "token=" not in text
    # --compare against itself: nothing to report as a regression (same figures).
    cmp = bench("--ranks", "2", "--workloads", "latency", "--backends", "memory", "--repeat", "3",
                "--out", str(tmp_path / "again"), "--compare", str(out / "results.json"), "--no-charts")
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    assert "compared with" in cmp.stdout and "within 10%" in cmp.stdout


def _cmdline(p) -> str:
    """A child's command line, or "" once it has exited (a zombie has none)."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def test_ctrl_c_writes_partial_results_and_stops_servers(tmp_path):
    # 1 rank: 20,000 rounds take about a second; 2 ranks: minutes, interrupted after a second.
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cylon_store.cli", "bench", "--ranks", "1,2",
                             "--workloads", "latency", "--backends", "redis", "--repeat", "20000",
                             "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    servers: list = []
    while time.monotonic() < deadline:  # wait for the 2-rank launch: the 1-rank one is done
        kids = me.children(recursive=True)
        servers = [k for k in kids if "redis-server" in _cmdline(k)]
        if len([k for k in kids if "cylon_store.worker" in _cmdline(k)]) == 2:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the benchmark never reached its 2-rank launch")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] is True
    assert {c["ranks"] for c in res["cells"]} == {1}, "what was measured is kept"
    assert "interrupted: partial results" in (out / "report.md").read_text()
    assert servers
    for s in servers:
        assert not s.is_running() or s.status() == psutil.STATUS_ZOMBIE


def test_bad_arguments_are_named():
    for args, what in ((["--backends", "memory,nosuch"], "nosuch"), (["--ranks", "0"], "1 to 64"),
                       (["--sizes", "lots"], "lots"), (["--url", "redis"], "BACKEND=URL")):
        p = bench(*args)
        assert p.returncode == 2 and what in p.stderr, (args, p.stderr)


def test_missing_backend_is_one_line(monkeypatch):
    from cylon_store.bench import servers
    monkeypatch.setattr(servers, "redis_binary", lambda: None)
    assert servers.missing("redis") == ("redis: needs redis-server on PATH (apt-get install "
                                        "redis-server), or --url redis=URL")
    assert servers.missing("redis", given_url=True) is None
    monkeypatch.setattr(servers, "_has_module", lambda name: name != "ucxx")
    assert servers.missing("ucx") == "ucx: needs ucxx: pip install 'cylon-store[ucx]'"
