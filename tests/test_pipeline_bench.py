"""The star-schema pipeline benchmark (bench.pipeline_bench) at a tiny size: ours on two
backends equals DuckDB's top 20, every stage is accounted for, and the ``pipeline`` workload of
``cylon-store bench`` writes its cell, check and report section.  No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from cylon_store.bench import pipeline_bench as pb

ROWS = 2000


@pytest.mark.slow
def test_pipeline_on_two_backends_equals_duckdb(tmp_path):
    out = tmp_path / "pipe.json"
    rc = pb.main(["--rows", str(ROWS), "--ranks", "2", "--backends", "memory,file",
                  "--peers", "duckdb,polars", "--repeat", "1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["ours"]) == {"memory", "file"} and not res["errors"]
    assert len(res["expected"]) == pb.K_TOP
    for name, r in res["ours"].items():
        assert r["check"] == "ok", (name, r["check"])
        assert r["answer"] == res["expected"] or pb.compare(r["answer"], res["expected"]) is None
        assert [s["stage"] for s in r["stages"]] == list(pb.STAGES)
        rounds = {s["stage"]: s["rounds"] for s in r["stages"]}
        assert rounds["filter"] == 0 and rounds["topk"] == 1   # local; one allgather
        assert all(rounds[s] >= 1 for s in pb.STAGES[1:]) and r["rounds"] == sum(rounds.values())
        assert r["stages"][1]["requests"] and r["best_s"] > 0
    for peer in ("duckdb", "polars"):
        assert res["peers"][peer]["check"] == "ok"


@pytest.mark.slow
def test_suite_pipeline_workload(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "cylon_store.cli", "bench", "--workloads", "pipeline",
                        "--backends", "memory", "--ranks", "2", "--rows", str(ROWS), "--repeat", "1",
                        "--no-charts", "--out", str(out)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CYLON_STORE_TOKEN": ""})
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    [cell] = res["cells"]
    assert (cell["workload"], cell["name"], cell["check"]) == ("pipeline", "star-top20", "ok")
    assert [s["stage"] for s in cell["stages"]] == list(pb.STAGES) and 5 <= cell["rounds"] <= 8
    report = (out / "report.md").read_text()
    assert "## Pipeline" in report and "| topk | 1 |" in report


def test_compare_names_the_difference():
    want = [{"country": "a", "category": "b", "region": "c", "revenue": 100.0, "orders": 3,
             "avg_discount": 0.1}]
    assert pb.compare([dict(want[0], revenue=100.0 + 1e-9)], want) is None
    assert "revenue" in pb.compare([dict(want[0], revenue=101.0)], want)
    assert "orders" in pb.compare([dict(want[0], orders=4)], want)
    assert "avg_discount" in pb.compare([dict(want[0], avg_discount=None)], want)
    assert "0 rows" in pb.compare([], want)


def test_data_does_not_depend_on_who_generates_it():
    one = pb.full_tables(ROWS, 1)
    two = pb.full_tables(ROWS, 2)
    for name in ("customer", "product", "store"):   # dimensions: the same rows for any world
        assert one[name].equals(two[name])
    assert one["sales"].num_rows == two["sales"].num_rows == ROWS
    assert two["sales"]["order_id"].to_pylist() == list(range(ROWS))
    assert two["sales"].schema.field("date").type == pa.date32()
    assert 0 < two["sales"]["price"].null_count < ROWS // 10
    rank1 = pb.make_tables(ROWS, 1, 2)
    assert rank1["sales"].equals(two["sales"].slice(ROWS // 2))
