"""Key layouts of the communicator: one builder per layout and its inverse parser.

Every key lives under ``_cylon/{job}/``.  Message keys also carry the run token (fixed at
rendezvous, so an earlier run of the same job id is never read), the collective's sequence
number, the destination (a rank, or ``all`` for an object every rank reads) and the source.
The destination comes before the source so that one LIST of ``inbox_prefix`` finds exactly what
a rank is waiting for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

ROOT = "_cylon"
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MSG_RE = re.compile(
    r"^_cylon/(?P<job>[^/]+)/(?P<token>[0-9a-f]{16})/(?P<seq>\d{9})/"
    r"(?P<dst>r\d{6}|all|[hv]\d{6})/(?P<src>\d{6})(?:-(?P<tag>[0-9a-z]+(?:[./][0-9a-z]+)*))?$")


def validate_job(job) -> str:
    if not isinstance(job, str) or not _JOB_RE.match(job):
        raise ConfigError(f"invalid job id {job!r}: 1-100 characters of letters, digits, '.', '_' "
                          f"and '-', starting with a letter or digit")
    return job


def job_prefix(job: str) -> str:
    return f"{ROOT}/{job}/"


def hello_prefix(job: str) -> str:
    return f"{ROOT}/{job}/hello/"


def hello_key(job: str, rank: int) -> str:
    return f"{hello_prefix(job)}{rank:06d}"


def parse_hello_key(key: str) -> int:
    return int(key.rsplit("/", 1)[1])


def counter_key(job: str) -> str:
    return f"{ROOT}/{job}/counter"


def run_prefix(job: str, token: str) -> str:
    return f"{ROOT}/{job}/{token}/"


@dataclass(frozen=True)
class MsgKey:
    job: str
    token: str
    seq: int
    dst: Optional[int]   # None: an object for every rank ("all") or for a group
    src: int
    group: Optional[str] = None   # "h000003" (row 3) / "v000002" (column 2) of the two-level exchange
    tag: Optional[str] = None     # slot sizes of a combined object (see layout.encode_tag)


def msg_key(job: str, token: str, seq: int, dst: Optional[int], src: int, *,
            group: Optional[str] = None, tag: Optional[str] = None) -> str:
    d = group if group is not None else ("all" if dst is None else f"r{dst:06d}")
    return f"{ROOT}/{job}/{token}/{seq:09d}/{d}/{src:06d}" + (f"-{tag}" if tag else "")


def row_group(row: int) -> str:
    return f"h{row:06d}"


def column_group(col: int) -> str:
    return f"v{col:06d}"


def group_prefix(job: str, token: str, seq: int, group: str) -> str:
    return f"{ROOT}/{job}/{token}/{seq:09d}/{group}/"


def inbox_prefix(job: str, token: str, seq: int, dst: Optional[int]) -> str:
    d = "all" if dst is None else f"r{dst:06d}"
    return f"{ROOT}/{job}/{token}/{seq:09d}/{d}/"


def parse_msg_key(key: str) -> MsgKey:
    m = _MSG_RE.match(key)
    if not m:
        raise ValueError(f"not a message key: {key!r}")
    d = m["dst"]
    dst = int(d[1:]) if d[0] == "r" else None
    group = d if d[0] in "hv" else None
    return MsgKey(m["job"], m["token"], int(m["seq"]), dst, int(m["src"]), group, m["tag"])


def channel(job: str, token: str, dst: int) -> str:
    """Notification channel of one rank's inbox."""
    return f"{ROOT}/{job}/{token}/inbox/{dst:06d}"


# -- serverless runs (cylon_store.serverless): the driver and its Lambda ranks meet here --------

_LAMBDA_KINDS = ("claim", "result", "error")


def lambda_prefix(job: str) -> str:
    return f"{ROOT}/{job}/lambda/"


def lambda_payload_key(job: str) -> str:
    """``(fn, args)``, cloudpickled by the driver; deleted first when the run ends, so a late
    duplicate delivery finds no payload and does nothing."""
    return f"{lambda_prefix(job)}payload"


def lambda_abort_key(job: str) -> str:
    """Written by the driver when the run must stop (a rank failed, the driver was interrupted)."""
    return f"{lambda_prefix(job)}abort"


def lambda_rank_key(job: str, kind: str, rank: int) -> str:
    """``claim`` (create-if-absent: the fence against duplicate deliveries), ``result`` or ``error``."""
    if kind not in _LAMBDA_KINDS:
        raise ValueError(f"unknown serverless key kind {kind!r}")
    return f"{lambda_prefix(job)}{kind}/{rank:06d}"


def parse_lambda_rank_key(key: str) -> tuple[str, int]:
    """Inverse of ``lambda_rank_key``: ``(kind, rank)``; ValueError for any other key."""
    parts = key.rsplit("/", 2)
    kind, rank = (parts[-2], parts[-1]) if len(parts) == 3 else ("", "")
    if kind not in _LAMBDA_KINDS or not (len(rank) == 6 and rank.isdigit()):
        raise ValueError(f"not a serverless rank key: {key!r}")
    return kind, int(rank)


def lambda_channel(job: str) -> str:
    """Notification channel on which ranks tell the driver that they claimed or reported."""
    return f"{lambda_prefix(job)}driver"
