"""The RELIABILITY.md table from a run of the fault suite.

    CYLON_STORE_TEST_FAULTS_REPORT=/tmp/faults.jsonl python -m pytest -q -n 2 tests/faults
    python tests/faults/report.py /tmp/faults.jsonl        # markdown on stdout

One row per fault and backend (sorted by fault); repeated runs of one cell (several
JSON-lines files, or a file appended to by several runs) are merged: outcomes listed, seconds
as min–max, lost/duplicated rows and leftovers summed (all must be 0 for a cell to be clean).
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict


BACKENDS = ("memory", "file", "redis", "s3", "dynamodb", "flight", "mpi", "ucx")


def load(paths: list) -> list:
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def table(rows: list) -> str:
    cells: "OrderedDict[tuple, list]" = OrderedDict()
    for r in rows:
        cells.setdefault((r.get("fault", "?"), r.get("backend", "?")), []).append(r)
    out = ["| fault | backend | runs | outcome | rows lost / duplicated | seconds to the end | "
           "`_cylon/` keys after the job (removed by) → anything left at the end | test passed |",
           "|---|---|---:|---|---|---|---|---|"]
    order = {b: i for i, b in enumerate(BACKENDS)}
    for (fault, backend), rs in sorted(cells.items(),
                                       key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        outcomes = sorted({r.get("outcome", "?") for r in rs})
        secs = [r["seconds"] for r in rs if isinstance(r.get("seconds"), (int, float))]
        span = (f"{min(secs):.1f}" if secs and min(secs) == max(secs) else
                f"{min(secs):.1f}–{max(secs):.1f}" if secs else "–")
        lost = sum(r.get("rows_lost") or 0 for r in rs)
        dup = sum(r.get("rows_duplicated") or 0 for r in rs)
        left = sum(r.get("leftovers") or 0 for r in rs)
        raw = sum(r.get("raw_leftovers") or 0 for r in rs)
        cleaned = sorted({r.get("cleaned_by") or "close" for r in rs})
        passed = sum(1 for r in rs if r.get("passed"))
        out.append(f"| {fault} | {backend} | {len(rs)} | {', '.join(outcomes)} | {lost} / {dup} "
                   f"| {span} | {left} ({', '.join(cleaned)}) → {raw} | {passed}/{len(rs)} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/faults/report.py REPORT.jsonl [...]")
    print(table(load(sys.argv[1:])))
