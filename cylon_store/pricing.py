"""AWS list prices used by every cost figure of the project: one table, each price with its source.

Prices are on-demand list prices in us-east-1 as published on the pages cited, read on
``PRICES_AS_OF``; free tiers are ignored (a job's cost should not depend on what else ran that
month). Adapters price their own requests with these (``adapters/s3.py``,
``adapters/dynamodb.py`` ``request_cost_usd``); the serverless report prices a run with them.

| component | price | unit | source |
|---|---|---|---|
| Lambda compute, x86_64 | $0.0000166667 | GB-second (first 6 billion GB-s per month) | aws.amazon.com/lambda/pricing |
| Lambda compute, arm64 | $0.0000133334 | GB-second (first 7.5 billion GB-s per month) | aws.amazon.com/lambda/pricing |
| Lambda requests | $0.20 | per 1 million invocations | aws.amazon.com/lambda/pricing |
| S3 Standard PUT, COPY, POST, LIST | $0.005 | per 1,000 requests | aws.amazon.com/s3/pricing |
| S3 Standard GET, SELECT, all other | $0.0004 | per 1,000 requests (DELETE free) | aws.amazon.com/s3/pricing |
| DynamoDB on-demand writes | $0.625 | per million write request units | aws.amazon.com/dynamodb/pricing/on-demand |
| DynamoDB on-demand reads | $0.125 | per million read request units | aws.amazon.com/dynamodb/pricing/on-demand |
| EFS Elastic Throughput reads | $0.03 | per GB read | aws.amazon.com/efs/pricing |
| EFS Elastic Throughput writes | $0.06 | per GB written | aws.amazon.com/efs/pricing |
| ElastiCache (Redis/Valkey) | per node-hour | provisioned: not attributable to one job's requests | aws.amazon.com/elasticache/pricing |
| ElastiCache cache.r7g.large (Redis OSS) | $0.219 | per node-hour, on demand | aws.amazon.com/elasticache/pricing |
| Fargate, Linux x86 (the shuffle service's task) | $0.04048 / $0.004445 | per vCPU-hour / per GB-hour | aws.amazon.com/fargate/pricing |

Storage-time charges (GB-month) are left out: shuffle data lives for seconds to minutes and every
rank deletes what it wrote.

``job_cost_usd`` prices one measured run the same way for every backend (``cylon-store bench``):
compute as Lambda GB-seconds of every rank at ``BENCH_MEMORY_MB`` (one vCPU) for the run's
seconds, plus the store: requests and bytes (S3, DynamoDB, EFS for file://), or the provisioned
server for the run's seconds (one ElastiCache node for redis://, one 2 vCPU / 4 GB Fargate task
for the shuffle service); memory://, mpi:// and ucx:// pay compute only.
"""

from __future__ import annotations

import math

PRICES_AS_OF = "2026-11-30"
REGION = "us-east-1"

LAMBDA_GB_SECOND = {"x86_64": 0.0000166667, "arm64": 0.0000133334}
LAMBDA_REQUEST = 0.20 / 1_000_000

S3_PUT_CLASS = 0.005 / 1000
S3_GET_CLASS = 0.0004 / 1000
#: The S3 adapter's request kinds (``s3.<KIND>`` in stats) in each price class.
S3_PUT_KINDS = ("PUT", "LIST", "MULTIPART_CREATE", "MULTIPART_PART", "MULTIPART_COMPLETE")
S3_GET_KINDS = ("GET", "HEAD")

DYNAMODB_WRITE_UNIT = 0.625 / 1_000_000
DYNAMODB_READ_UNIT = 0.125 / 1_000_000

EFS_ELASTIC_READ_GB = 0.03
EFS_ELASTIC_WRITE_GB = 0.06

#: Lambda bills duration rounded up to the next millisecond (since December 2020).
LAMBDA_BILLING_GRANULARITY_MS = 1


def billed_ms(duration_ms: float) -> int:
    """Lambda's billed duration of an invocation that ran ``duration_ms``."""
    g = LAMBDA_BILLING_GRANULARITY_MS
    return max(g, int(math.ceil(duration_ms / g)) * g)


def lambda_gb_seconds(billed: float, memory_mb: int) -> float:
    """GB-seconds of ``billed`` milliseconds at ``memory_mb`` (Lambda counts 1 GB = 1024 MB)."""
    return billed / 1000.0 * memory_mb / 1024.0


def store_cost_usd(scheme: str, stats: dict) -> float:
    """Dollar cost of the requests and bytes in a ``store.stats()`` snapshot of a ``scheme``
    store; 0 for stores not billed per request (memory, Redis/ElastiCache: per node-hour)."""
    if scheme == "s3":
        req = stats.get("requests", {})
        put = sum(req.get(f"s3.{k}", 0) for k in S3_PUT_KINDS)
        get = sum(req.get(f"s3.{k}", 0) for k in S3_GET_KINDS)
        return put * S3_PUT_CLASS + get * S3_GET_CLASS
    if scheme == "dynamodb":
        return (stats.get("dynamodb.write_units", 0) * DYNAMODB_WRITE_UNIT
                + stats.get("dynamodb.read_units", 0) * DYNAMODB_READ_UNIT)
    if scheme == "file":  # priced as Amazon EFS with Elastic Throughput (Lambda mounts EFS)
        return (stats.get("bytes_in", 0) / 1e9 * EFS_ELASTIC_READ_GB
                + stats.get("bytes_out", 0) / 1e9 * EFS_ELASTIC_WRITE_GB)
    return 0.0


ELASTICACHE_NODE_HOUR = {"cache.r7g.large": 0.219}
FARGATE_VCPU_HOUR = 0.04048
FARGATE_GB_HOUR = 0.004445
#: The shuffle service's task in the cost model: 2 vCPU, 4 GB.
SERVICE_TASK = (2, 4)
#: Memory of one rank in ``job_cost_usd``: 1,769 MB is one full vCPU on Lambda.
BENCH_MEMORY_MB = 1769


def provisioned_usd(scheme: str, seconds: float) -> float:
    """A provisioned store server's price for ``seconds`` (0 for per-request stores)."""
    if scheme in ("redis", "rediss"):
        return ELASTICACHE_NODE_HOUR["cache.r7g.large"] * seconds / 3600
    if scheme in ("flight", "flight+tls"):
        vcpu, gb = SERVICE_TASK
        return (vcpu * FARGATE_VCPU_HOUR + gb * FARGATE_GB_HOUR) * seconds / 3600
    return 0.0


def job_cost_usd(scheme: str, seconds: float, ranks: int, stats: dict,
                 memory_mb: int = BENCH_MEMORY_MB) -> dict:
    """Dollars of one run of ``seconds`` on ``ranks`` ranks whose store requests are ``stats``
    (summed over ranks, as ``store.stats()``): ``{"compute", "store", "total"}``."""
    compute = ranks * lambda_gb_seconds(seconds * 1000.0, memory_mb) * LAMBDA_GB_SECOND["x86_64"]
    store = store_cost_usd(scheme, stats) + provisioned_usd(scheme, seconds)
    return {"compute": compute, "store": store, "total": compute + store}


#: What each store scheme's dollars stand for in a report.
STORE_BILLING = {
    "s3": "S3 requests (PUT/LIST and GET classes)",
    "dynamodb": "DynamoDB on-demand read and write units",
    "file": "EFS Elastic Throughput bytes read and written",
    "redis": "ElastiCache is billed per node-hour, not per request: $0 attributed to the job",
    "rediss": "ElastiCache is billed per node-hour, not per request: $0 attributed to the job",
    "memory": "in-process memory: free",
}
