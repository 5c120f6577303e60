"""What a serverless run cost: per rank billed time, memory and cold/warm start; for the run
Lambda GB-seconds, invocations, the store's requests and bytes, and dollars by component at the
list prices of ``cylon_store.pricing`` (one table, with sources and date).

Billed milliseconds are measured by the handler: the rank's work, plus on a cold start the init
phase from the execution environment's process start (Lambda bills each invocation's duration
rounded up to 1 ms, and since August 2025 the init phase of on-demand functions too). The driver's own store requests (payload, polling) are counted
apart and included in the store's dollars.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .. import pricing


@dataclass(frozen=True)
class RankReport:
    rank: int
    request_id: str
    billed_ms: int
    duration_ms: float
    init_ms: float             # the init phase of a cold start (billed since August 2025), else 0
    memory_mb: int
    cold: bool
    max_rss_mb: float
    ok: bool
    requests: dict = field(default_factory=dict)
    bytes_out: int = 0
    bytes_in: int = 0


@dataclass(frozen=True)
class LambdaReport:
    function: str
    architecture: str
    memory_mb: int
    world_size: int
    store: str                 # the store's scheme
    wall_seconds: float
    invocations: int           # Invoke calls Lambda accepted (throttled ones are not billed)
    throttled_invokes: int
    ranks: tuple               # RankReport per rank that reported, rank order
    store_requests: dict       # requests by kind: ranks and driver together
    store_bytes_out: int
    store_bytes_in: int
    store_units: dict          # e.g. dynamodb.write_units / read_units
    driver_requests: dict
    gb_seconds: float
    dollars: dict              # component -> $; "total"
    notes: tuple = ()

    def to_dict(self) -> dict:
        """JSON-ready (plain dicts, lists, numbers and strings)."""
        d = dataclasses.asdict(self)
        d["ranks"] = [dataclasses.asdict(r) for r in self.ranks]
        d["notes"] = list(self.notes)
        d["store_requests_total"] = self.store_requests_total
        d["cold_starts"] = self.cold_starts
        d["prices"] = {"as_of": pricing.PRICES_AS_OF, "region": pricing.REGION,
                       "lambda_gb_second": pricing.LAMBDA_GB_SECOND[self.architecture],
                       "lambda_request": pricing.LAMBDA_REQUEST,
                       "store": pricing.STORE_BILLING.get(self.store, "")}
        return d

    @property
    def store_requests_total(self) -> int:
        """Backend requests where the adapter counts them (``s3.GET`` ...), else logical ones."""
        backend = [n for k, n in self.store_requests.items() if "." in k and k.split(".", 1)[1][:1].isupper()]
        logical = [n for k, n in self.store_requests.items() if "." not in k and k != "retries"]
        return sum(backend) if backend else sum(logical)

    @property
    def cold_starts(self) -> int:
        return sum(1 for r in self.ranks if r.cold)

    def __str__(self) -> str:
        billed = [r.billed_ms for r in self.ranks]
        lines = [
            f"Lambda run: {self.world_size} ranks of {self.function} ({self.architecture}, "
            f"{self.memory_mb} MB) through {self.store}://, {self.wall_seconds:.2f} s",
            f"  invocations {self.invocations} (throttled and retried {self.throttled_invokes}), "
            f"cold starts {self.cold_starts}, billed ms per rank min/max "
            f"{min(billed, default=0)}/{max(billed, default=0)}, {self.gb_seconds:.3f} GB-s",
            f"  store requests {self.store_requests_total:,}, "
            f"{self.store_bytes_out / 1e6:,.1f} MB written, {self.store_bytes_in / 1e6:,.1f} MB read",
            "  dollars: " + ", ".join(f"{k} ${v:.6f}" for k, v in self.dollars.items()),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _add_stats(total: dict, stats: dict) -> None:
    for k, v in stats.get("requests", {}).items():
        total["requests"][k] = total["requests"].get(k, 0) + v
    for k, v in stats.items():
        if k not in ("requests", "requests_total") and isinstance(v, (int, float)):
            total[k] = total.get(k, 0) + v


def build_report(*, function: str, architecture: str, memory_mb: int, world_size: int,
                 scheme: str, wall_seconds: float, invocations: int, throttled: int,
                 metas: list, driver_stats: dict, notes: tuple = ()) -> LambdaReport:
    """``metas``: the ``meta`` dicts the ranks reported (results and errors alike)."""
    ranks = []
    total: dict = {"requests": {}}
    for m in sorted(metas, key=lambda m: m["rank"]):
        st = m.get("stats", {})
        _add_stats(total, st)
        ranks.append(RankReport(rank=m["rank"], request_id=str(m.get("request_id", "")),
                                billed_ms=int(m["billed_ms"]), duration_ms=float(m["duration_ms"]),
                                init_ms=float(m.get("init_ms", 0.0)),
                                memory_mb=int(m.get("memory_mb") or memory_mb), cold=bool(m["cold"]),
                                max_rss_mb=float(m.get("max_rss_mb", 0.0)), ok=bool(m.get("ok", True)),
                                requests=dict(st.get("requests", {})),
                                bytes_out=int(st.get("bytes_out", 0)), bytes_in=int(st.get("bytes_in", 0))))
    _add_stats(total, driver_stats)
    gb_s = sum(pricing.lambda_gb_seconds(r.billed_ms, r.memory_mb) for r in ranks)
    dollars = {
        "lambda_compute": gb_s * pricing.LAMBDA_GB_SECOND[architecture],
        "lambda_requests": invocations * pricing.LAMBDA_REQUEST,
        scheme: pricing.store_cost_usd(scheme, total),
    }
    dollars["total"] = sum(dollars.values())
    units = {k: v for k, v in total.items() if k not in ("requests", "bytes_out", "bytes_in", "retries")}
    return LambdaReport(function=function, architecture=architecture, memory_mb=memory_mb,
                        world_size=world_size, store=scheme, wall_seconds=wall_seconds,
                        invocations=invocations, throttled_invokes=throttled, ranks=tuple(ranks),
                        store_requests=dict(total["requests"]),
                        store_bytes_out=int(total.get("bytes_out", 0)),
                        store_bytes_in=int(total.get("bytes_in", 0)), store_units=units,
                        driver_requests=dict(driver_stats.get("requests", {})), gb_seconds=gb_s,
                        dollars=dollars, notes=tuple(notes))


def summarize(reports: list, label: Optional[str] = None) -> str:
    """One markdown table row per report (benchmarks)."""
    rows = []
    for r in reports:
        d = r.dollars
        rows.append(f"| {label or r.store} | {r.world_size} | {r.wall_seconds:.2f} | {r.gb_seconds:.3f} | "
                    f"{r.store_requests_total:,} | ${d['lambda_compute']:.6f} | "
                    f"${d['lambda_requests']:.6f} | ${d[r.store]:.6f} | ${d['total']:.6f} |")
    return "\n".join(rows)
