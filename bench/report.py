"""``cylon-store bench``'s outputs from one ``results.json``: report.md, the charts, the
recommendation and the comparison with an earlier run.  Everything here reads the results
dictionary only, so a results.json from another machine renders the same way."""

from __future__ import annotations

import os
from typing import Optional

BYTE_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))
#: Backends an AWS Lambda function can use (no inbound connections: storage or a service).
SERVERLESS = ("s3", "dynamodb", "redis", "flight", "file")


def human_size(n: float) -> str:
    for div, unit in BYTE_UNITS:
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{int(n)} B"


def _rows(n: int) -> str:
    return f"{n:,}"


def _secs(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 0.01:
        return f"{s * 1000:.2f} ms"
    return f"{s:.3f} s"


def _usd(x: Optional[float]) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "$0"
    if x < 0.01:
        return f"${x:.2e}"
    return f"${x:.4f}"


def _table(header: list, rows: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _requests(req: dict, repeat: int) -> str:
    if not req:
        return "—"
    # The backend's own request kinds (s3.GET, redis.COMMANDS...) when it counts them, else
    # the facade's operations (put, get, list...).
    own = {k: v for k, v in req.items() if "." in k}
    items = sorted((own or req).items(), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{k.split('.', 1)[-1]} {v / repeat:,.0f}" for k, v in items)


def _cells(results: dict, workload: str) -> list:
    return [c for c in results.get("cells", []) if c["workload"] == workload]


def _peer(results: dict, workload: str, name: str, ranks: int, size, peer: str) -> Optional[dict]:
    for p in results.get("peers", []):
        if (p["workload"], p["name"], p["ranks"], p["size"], p["peer"]) == (workload, name, ranks, size, peer):
            return p
    return None


def _peer_names(results: dict, workload: str) -> list:
    return sorted({p["peer"] for p in results.get("peers", []) if p["workload"] == workload})


# -- the recommendation ------------------------------------------------------------------------

def recommendation(results: dict) -> str:
    """For each (workload size, ranks) measured: the fastest and the cheapest backend, and where
    they differ what the speed costs."""
    groups: dict = {}
    for c in results.get("cells", []):
        if c["workload"] == "exchange" or (c["workload"] == "bdb" and c["name"] == "join"):
            groups.setdefault((c["workload"], c["size"], c["ranks"]), []).append(c)
    if not groups:
        return "recommendation: nothing measured that moves data (run the exchange or bdb workload)"
    lines = ["recommendation (fastest and cheapest backend per data size and rank count; "
             "dollars at AWS list prices, compute as Lambda GB-seconds; 'serverless': the "
             "stores an AWS Lambda function can reach, s3/dynamodb/redis/flight/file as EFS):"]
    for key, cells in list(groups.items()):
        reachable = [c for c in cells if c["backend"] in SERVERLESS]
        if reachable and len(reachable) < len(cells):
            groups[key + ("serverless",)] = reachable
    for (workload, size, ranks, *only), cells in sorted(groups.items()):
        what = (f"exchange of {human_size(size)}" if workload == "exchange"
                else f"BDB join query, {_rows(size)} visits")
        fast = min(cells, key=lambda c: c["best_s"])
        cheap = min(cells, key=lambda c: (c["usd"]["total"], c["best_s"]))
        head = f"- {what} on {ranks} ranks{', serverless' if only else ''}: "
        if fast is cheap:
            lines.append(head + f"{fast['backend']} is both fastest ({_secs(fast['best_s'])}) and "
                                f"cheapest ({_usd(fast['usd']['total'])} per run)")
            continue
        speedup = cheap["best_s"] / fast["best_s"] if fast["best_s"] else float("inf")
        extra = fast["usd"]["total"] - cheap["usd"]["total"]
        saved = cheap["best_s"] - fast["best_s"]
        lines.append(head + f"fastest {fast['backend']} ({_secs(fast['best_s'])}, "
                            f"{_usd(fast['usd']['total'])}), cheapest {cheap['backend']} "
                            f"({_secs(cheap['best_s'])}, {_usd(cheap['usd']['total'])}): "
                            f"{speedup:.1f}x the speed for {_usd(extra)} more per run "
                            f"({_usd(extra / saved if saved > 0 else None)} per second saved)")
    return "\n".join(lines)


# -- report.md ---------------------------------------------------------------------------------

def markdown(results: dict, charts: list) -> str:
    m = results["machine"]
    out = ["# cylon-store bench", ""]
    out.append(f"`{results['command'].strip()}` — {results['mode']} mode, "
               f"{results['seconds']:.0f} s, started {results['started']}"
               + (" — **interrupted: partial results**" if results.get("interrupted") else ""))
    out.append("")
    out.append(f"Machine: {m.get('host')} ({m.get('cpus')} CPUs, {m.get('memory_gib', '?')} GiB), "
               f"Python {m.get('python')}, pyarrow {m.get('pyarrow')}, cylon-store "
               f"{m.get('cylon_store')} (git {m.get('git', '?')}); load average "
               f"{', '.join(f'{x:.2f}' for x in m.get('load_before', []))} before, "
               f"{', '.join(f'{x:.2f}' for x in m.get('load_after', []))} after.")
    out.append("")
    out.append("Backends: " + "; ".join(f"**{b}** {w}" for b, w in results["backends"].items()))
    if results.get("skipped"):
        out.append("")
        out.append("Skipped: " + ", ".join(results["skipped"]) + " (see the run's output for what to install).")
    for e in results.get("errors", []):
        out.append(f"\n**Error** {e['backend']} on {e['ranks']} ranks: {e['error']}")
    p = results["prices"]
    out += ["", f"Dollars: AWS list prices ({p['region']}, as of {p['as_of']}; {p['source']}). "
                f"Compute: every rank as Lambda at {p['rank_memory_mb']} MB "
                f"(${p['lambda_gb_second']}/GB-s) for the cell's best time; store: S3 requests, "
                f"DynamoDB on-demand units, EFS bytes for file://, one ElastiCache "
                f"cache.r7g.large for redis:// and one 2 vCPU/4 GB Fargate task for flight:// "
                f"for the same seconds; memory://, mpi:// and ucx:// pay compute only. "
                f"Times: the slowest rank of each run; best and median of the runs."]

    lat = _cells(results, "latency")
    if lat:
        out += ["", "## Latency (slowest rank per round; best / median)", ""]
        rows = sorted({(c["backend"], c["ranks"]) for c in lat}, key=lambda t: (t[1], t[0]))
        names = ["barrier", "tiny_exchange", "allgather"]
        table = []
        for b, r in rows:
            row: list = [b, r]
            for n in names:
                c = next((c for c in lat if (c["backend"], c["ranks"], c["name"]) == (b, r, n)), None)
                cell = f"{_secs(c['best_s'])} / {_secs(c['median_s'])}" if c else "—"
                if c and c.get("raw_best_s"):   # mpi: raw mpi4py in the same run
                    cell += f" (raw mpi4py {_secs(c['raw_best_s'])}: {c['best_s'] / c['raw_best_s']:.2f}x)"
                row.append(cell)
            table.append(row)
        out.append(_table(["backend", "ranks", "barrier", "tiny exchange", "allgather"], table))

    ex = _cells(results, "exchange")
    if ex:
        out += ["", "## Exchange (all-to-all; GB/s of data crossing ranks)", ""]
        dask = "dask-p2p" in _peer_names(results, "exchange")
        header = ["backend", "ranks", "size", "best", "median", "GB/s", "raw client", "peak RSS/rank",
                  "requests per run (top kinds)", "$ per run", "$ per GB", "rows"]
        if dask:
            header.insert(7, "vs Dask P2P")
        table = []
        for c in sorted(ex, key=lambda c: (c["size"], c["ranks"], c["best_s"])):
            raw = (f"{c['raw_ratio']:.2f}x ({_secs(c['raw_best_s'])})" if c.get("raw_ratio") else "—")
            row = [c["backend"], c["ranks"], human_size(c["size"]), _secs(c["best_s"]),
                   _secs(c["median_s"]), f"{c['gbps']:.2f}" if c.get("gbps") else "—", raw,
                   f"{c['rss_peak_mib']:.0f} MiB (+{c['rss_growth_mib']:.0f})",
                   _requests(c["requests"], c["repeat"]), _usd(c["usd"]["total"]),
                   _usd(c.get("usd_per_gb")), "exact" if c.get("rows_ok") else "**WRONG**"]
            if dask:
                pd = _peer(results, "exchange", c["name"], c["ranks"], c["size"], "dask-p2p")
                row.insert(7, f"{pd['best_s'] / c['best_s']:.2f}x" if pd else "—")
            table.append(row)
        out.append(_table(header, table))
        out.append("")
        out.append("raw client: the raw client's time / ours (same parts as Arrow IPC bytes through "
                   "plain files, redis-py, boto3, mpi4py Alltoallv, or one memcpy for memory://; "
                   "> 1 means ours is faster). vs Dask P2P: Dask's time / ours.")

    for workload, title in (("operators", "Operators (kernel: join, groupby, sort)"),
                            ("bdb", "Big Data Benchmark queries")):
        cells = _cells(results, workload)
        if not cells:
            continue
        peers = _peer_names(results, workload)
        out += ["", f"## {title}", ""]
        header = ["query" if workload == "bdb" else "operator", "backend", "ranks", "rows", "best",
                  "median", "collectives per run", "requests per run", "$ per run",
                  *[f"{p} (ratio)" for p in peers]]
        if workload == "bdb":
            header.append("answer")
        table = []
        for c in sorted(cells, key=lambda c: (c["name"], c["ranks"], c["best_s"])):
            rounds = c.get("rounds")
            row = [c["name"], c["backend"], c["ranks"], _rows(c["size"]), _secs(c["best_s"]),
                   _secs(c["median_s"]), "—" if rounds is None else f"{rounds:g}",
                   _requests(c["requests"], c["repeat"]), _usd(c["usd"]["total"])]
            for peer in peers:
                pd = _peer(results, workload, c["name"], c["ranks"], c["size"], peer)
                row.append(f"{_secs(pd['best_s'])} ({pd['best_s'] / c['best_s']:.2f}x)" if pd else "—")
            if workload == "bdb":
                row.append(c.get("check", "unchecked"))
            table.append(row)
        out.append(_table(header, table))
        if peers:
            out += ["", "ratio: the peer's time / ours (> 1: ours is faster). DuckDB and Polars run "
                        "in one process on all the data; Dask on a LocalCluster of as many "
                        "single-threaded workers as ranks, every shuffle P2P."]

    out += pipeline_section(results)
    out += ["", "## Recommendation", "", recommendation(results)]
    if charts:
        out += ["", "## Charts", ""]
        out += [f"![{os.path.splitext(c)[0]}]({c})" for c in charts]
    return "\n".join(out) + "\n"


def _request_total(req: Optional[dict]) -> str:
    """Requests of one run: the backend's own kinds where it counts them, else the facade's."""
    if req is None:
        return "—"
    own = {k: v for k, v in req.items() if "." in k}
    return f"{sum((own or req).values()):,.0f}"


def pipeline_section(results: dict) -> list:
    """The star-schema pipeline: one row per backend with the peers as ratios, then the stages
    (seconds, collectives and store requests of each)."""
    cells = _cells(results, "pipeline")
    if not cells:
        return []
    out = ["", "## Pipeline (filter → 3 joins → groupby → top 20, star schema)", ""]
    peers = _peer_names(results, "pipeline")
    header = ["backend", "ranks", "sales rows", "best", "median", "rounds per run",
              "requests per run", "$ per run"]
    header += [f"ours / {p}" if p == "duckdb" else f"{p} / ours" for p in peers] + ["answer"]
    table = []
    for c in sorted(cells, key=lambda c: (c["ranks"], c["size"], c["best_s"])):
        row = [c["backend"], c["ranks"], _rows(c["size"]), _secs(c["best_s"]), _secs(c["median_s"]),
               c.get("rounds", "—"), _requests(c["requests"], c["repeat"]), _usd(c["usd"]["total"])]
        for p in peers:
            pd = _peer(results, "pipeline", c["name"], c["ranks"], c["size"], p)
            if pd is None or not c["best_s"]:
                row.append("—")
            elif p == "duckdb":
                row.append(f"{c['best_s'] / pd['best_s']:.2f}x ({_secs(pd['best_s'])})")
            else:
                row.append(f"{pd['best_s'] / c['best_s']:.2f}x ({_secs(pd['best_s'])})")
        row.append(c.get("check", "unchecked"))
        table.append(row)
    out.append(_table(header, table))
    out += ["", "ours / duckdb: our time / DuckDB's (single process, all the data; > 1: DuckDB is "
                "faster); dask-p2p / ours and polars / ours: the peer's time / ours (> 1: ours is "
                "faster). Dask on a LocalCluster of as many single-threaded workers as ranks, "
                "merges with shuffle_method p2p. answer: the top 20 rows equal DuckDB's."]
    staged = [c for c in cells if c.get("stages")]
    if staged:
        names = [s["stage"] for s in staged[0]["stages"]]
        out += ["", "Stages of the best run (seconds: the slowest rank's stage end minus its "
                    "previous stage end; rounds: collectives; requests: store requests of all "
                    "ranks):", ""]
        header = ["stage", "rounds"] + [f"{c['backend']} ({c['ranks']} ranks)" for c in staged]
        table = []
        for i, n in enumerate(names):
            row = [n, staged[0]["stages"][i]["rounds"]]
            for c in staged:
                st = c["stages"][i]
                req = st["requests"]
                row.append(_secs(st["seconds"]) + (f", {_request_total(req)} req" if req is not None else ""))
            table.append(row)
        out.append(_table(header, table))
    return out


# -- charts ------------------------------------------------------------------------------------

def charts(results: dict, out_dir: str) -> list:
    """PNG charts next to report.md; returns their file names (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made.append(name)

    ex = _cells(results, "exchange")
    if ex:
        for metric, name, ylabel in (("gbps", "exchange_throughput.png", "GB/s crossing ranks (higher is better)"),
                                     ("usd_per_gb", "dollars_per_gb.png", "$ per GB exchanged (lower is better)")):
            fig, ax = plt.subplots(figsize=(8, 4.5))
            groups = sorted({(c["size"], c["ranks"]) for c in ex})
            backends = sorted({c["backend"] for c in ex})
            width = 0.8 / max(1, len(backends))
            for i, b in enumerate(backends):
                vals = []
                for g in groups:
                    c = next((c for c in ex if (c["size"], c["ranks"], c["backend"]) == (*g, b)), None)
                    vals.append((c.get(metric) or 0) if c else 0)
                ax.bar([j + i * width for j in range(len(groups))], vals, width, label=b)
            ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(groups))])
            ax.set_xticklabels([f"{human_size(s)}\n{r} ranks" for s, r in groups])
            ax.set_ylabel(ylabel)
            if metric == "usd_per_gb":
                ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_title("All-to-all exchange by backend and size")
            ax.legend(fontsize=8, ncol=4)
            save(fig, name)
    lat = _cells(results, "latency")
    if lat:
        names = ["barrier", "tiny_exchange", "allgather"]
        fig, axes = plt.subplots(1, 3, figsize=(11, 4), sharey=True)
        for ax, n in zip(axes, names):
            for b in sorted({c["backend"] for c in lat}):
                pts = sorted((c["ranks"], c["best_s"] * 1000) for c in lat if c["backend"] == b and c["name"] == n)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
            ax.set_title(n.replace("_", " "))
            ax.set_xlabel("ranks")
            ax.set_yscale("log")
        axes[0].set_ylabel("ms (best; lower is better)")
        axes[0].legend(fontsize=8)
        save(fig, "latency_by_ranks.png")
    titles = {"operators": "Operators", "bdb": "BDB queries", "pipeline": "Pipeline"}
    for workload, name in (("operators", "operators_vs_peers.png"), ("bdb", "bdb_vs_peers.png"),
                           ("pipeline", "pipeline_vs_peers.png")):
        cells = _cells(results, workload)
        if not cells:
            continue
        ranks = max(c["ranks"] for c in cells)
        cells = [c for c in cells if c["ranks"] == ranks]
        ops = sorted({c["name"] for c in cells})
        labels = sorted({c["backend"] for c in cells}) + _peer_names(results, workload)
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / max(1, len(labels))
        for i, lab in enumerate(labels):
            vals = []
            for op in ops:
                c = next((c for c in cells if c["name"] == op and c["backend"] == lab), None)
                if c is None:
                    c = _peer(results, workload, op, ranks, cells[0]["size"], lab)
                vals.append(c["best_s"] if c else 0)
            ax.bar([j + i * width for j in range(len(ops))], vals, width, label=lab,
                   hatch="//" if lab in _peer_names(results, workload) else None)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(ops))])
        ax.set_xticklabels(ops)
        ax.set_ylabel("seconds (best; lower is better)")
        ax.set_title(f"{titles[workload]} on {ranks} ranks "
                     f"vs peers (hatched), {_rows(cells[0]['size'])} rows")
        ax.legend(fontsize=8, ncol=4)
        save(fig, name)
    return made


# -- --compare ---------------------------------------------------------------------------------

def _key(c: dict) -> tuple:
    return (c["workload"], c["name"], c["backend"], c["ranks"], c["size"])


def compare(old: dict, new: dict, threshold: float = 0.10) -> str:
    """Cells of ``new`` whose best time grew by more than ``threshold`` against ``old``."""
    before = {_key(c): c for c in old.get("cells", [])}
    worse, better, same = [], [], 0
    for c in new.get("cells", []):
        o = before.get(_key(c))
        if o is None or not o.get("best_s") or not c.get("best_s"):
            continue
        change = c["best_s"] / o["best_s"] - 1
        if change > threshold:
            worse.append((change, c, o))
        elif change < -threshold:
            better.append((change, c, o))
        else:
            same += 1
    ol, nl = old.get("machine", {}).get("load_before", ["?"])[0], new["machine"].get("load_before", ["?"])[0]
    lines = [f"compared with {old.get('started', '?')} (git {old.get('machine', {}).get('git', '?')}, "
             f"load {ol}) — now load {nl}: {len(worse)} slower, {len(better)} faster, {same} within "
             f"{threshold:.0%}"]
    for change, c, o in sorted(worse, key=lambda t: -t[0]):
        lines.append(f"  REGRESSION {c['workload']}/{c['name']} {c['backend']} {c['ranks']} ranks "
                     f"{human_size(c['size']) if c['workload'] == 'exchange' else c['size']}: "
                     f"{_secs(o['best_s'])} -> {_secs(c['best_s'])} (+{change:.0%})")
    for change, c, o in sorted(better, key=lambda t: t[0]):
        lines.append(f"  faster     {c['workload']}/{c['name']} {c['backend']} {c['ranks']} ranks: "
                     f"{_secs(o['best_s'])} -> {_secs(c['best_s'])} ({change:.0%})")
    return "\n".join(lines)
