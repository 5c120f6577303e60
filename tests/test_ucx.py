"""ucx:// between OS processes bootstrapped through a real rendezvous (a shared directory, and a
real redis-server with INCR rank claims): the communicator suite with 2 and 4 processes, the
local launcher, failures (a rank that dies, stalls or never connects), ports and interfaces,
clean shutdown (no UCX warnings, nothing left in the rendezvous store).  UCX runs over TCP on
loopback (ucxx-cu12 uses host memory; no GPU involved).
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

import cylon_store as cs

from servers import started_backend as _backend
from servers import free_port
from test_comm import rank_collectives, rank_exchange, rank_raises, rows_plan

SCRIPTS = Path(__file__).parent / "mpi_scripts"
#: Loopback TCP; tests pass the same settings as options so the URL form is exercised too.
UCX_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}


def ucx_url(rendezvous: str, **opts) -> str:
    query = "&".join([f"rendezvous={quote(rendezvous, safe='')}"] + [f"{k}={v}" for k, v in opts.items()])
    return f"ucx://?{query}"


def run_ranks(n: int, *argv: str, timeout: float = 240, env: dict | None = None,
              numbered: bool = False):
    """Start n processes of ``python argv...`` (each claims its own rank through the
    rendezvous, or is told it in $FAULT_RANK if ``numbered``); returns [(exit code, output)]
    and the seconds until all ended."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("CYLON_STORE_", "OMPI_", "PMIX_", "PMI_"))}
    base.update(UCX_ENV)
    base.update(env or {})
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**base, "FAULT_RANK": str(i)} if numbered else base)
             for i in range(n)]
    outs = []
    try:
        for p in procs:
            left = max(1.0, timeout - (time.monotonic() - t0))
            outs.append((p.communicate(timeout=left)[0], p.returncode))
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    return [(code, out) for out, code in outs], time.monotonic() - t0


def results(runs) -> list[str]:
    return [line for _, out in runs for line in out.splitlines() if line.startswith("RESULT")]


def no_ucx_noise(runs):
    """Clean shutdown: no UCX warnings or errors (live endpoints, unused variables...)."""
    for _, out in runs:
        bad = [line for line in out.splitlines() if " UCX " in line and ("WARN" in line or "ERROR" in line)]
        assert not bad, bad


@pytest.fixture
def file_rdv(tmp_path):
    root = tmp_path / "rdv"
    root.mkdir()
    return f"file://{root}?fsync=false", root


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    return _backend("redis", tmp_path_factory)


def left_in(root: Path) -> list:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


# -- the suite ------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 4])
def test_suite_file_rendezvous(world, file_rdv):
    rdv, root = file_rdv
    runs, _ = run_ranks(world, str(SCRIPTS / "comm_suite.py"), ucx_url(rdv, tls="tcp,self"),
                        "--world", str(world), "--job", "suite",
                        "--variants", "max_message=4096,progress=polling")
    assert all(code == 0 for code, _ in runs), runs
    assert sum(out.count("SUITE OK") for _, out in runs) == world
    no_ucx_noise(runs)
    assert left_in(root) == []


@pytest.mark.parametrize("world", [2, 4])
def test_suite_redis_rendezvous(world, redis_server):
    """Ranks claimed with Redis INCR, addresses all-gathered through Redis (Cylon's bootstrap)."""
    rdv = redis_server.make_url()
    runs, _ = run_ranks(world, str(SCRIPTS / "comm_suite.py"), ucx_url(rdv, claim="counter"),
                        "--world", str(world), "--job", f"redis-{uuid.uuid4().hex[:6]}")
    assert all(code == 0 for code, _ in runs), runs
    assert sum(out.count("SUITE OK") for _, out in runs) == world
    with cs.open_store(rdv) as store:
        assert store.list("") == []  # hello records and the rank counter are gone


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_suite_large_payloads(world, file_rdv):
    rdv, _ = file_rdv
    runs, _ = run_ranks(world, str(SCRIPTS / "comm_suite.py"), ucx_url(rdv), "--world",
                        str(world), "--slow", timeout=600)
    assert all(code == 0 for code, _ in runs), runs


def test_launch_local(file_rdv, monkeypatch):
    """cs.launch with processes: ranks from the launcher, addresses through the rendezvous."""
    for k, v in UCX_ENV.items():
        monkeypatch.setenv(k, v)
    rdv, root = file_rdv
    assert cs.launch(rank_collectives, 3, store=ucx_url(rdv), timeout=240,
                     comm_timeout=60) == [2] * 3
    plan = rows_plan(3, "one_sender")
    assert cs.launch(rank_exchange, 3, store=ucx_url(rdv), args=(plan, True, 2), timeout=240,
                     comm_timeout=60) == [0, 1, 2]
    t0 = time.monotonic()
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_raises, 3, store=ucx_url(rdv), timeout=240, comm_timeout=60)
    assert time.monotonic() - t0 < 45 and info.value.rank == 1
    assert left_in(root) == []


def test_launch_local_needs_no_rendezvous_url(monkeypatch):
    """On one machine the local launcher gives ucx:// ranks a shared-memory rendezvous of its
    own, and removes it afterwards."""
    for k, v in UCX_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CYLON_STORE_RENDEZVOUS", raising=False)
    before = set(os.listdir("/dev/shm/cylon-store")) if os.path.isdir("/dev/shm/cylon-store") else set()
    assert cs.launch(rank_collectives, 3, store="ucx://", timeout=240, comm_timeout=60) == [2] * 3
    after = set(os.listdir("/dev/shm/cylon-store")) if os.path.isdir("/dev/shm/cylon-store") else set()
    assert not {n for n in after - before if n.startswith("rendezvous-")}
    with pytest.raises(cs.ConfigError, match="rendezvous"):  # mpirun's ranks may be on other hosts
        cs.launch(rank_collectives, 2, store="ucx://", launcher="mpi", timeout=120, comm_timeout=30)


# -- failures -------------------------------------------------------------------------------

def test_rank_dies_mid_exchange(file_rdv):
    """The last rank is SIGKILLed during a large exchange: the others fail at once (long before
    the 60 s timeout) with an error naming it."""
    rdv, _ = file_rdv
    runs, took = run_ranks(3, str(SCRIPTS / "faults.py"), ucx_url(rdv), "die", "--world", "3",
                           "--timeout", "60")
    errors = [r for r in results(runs) if " error " in r]
    assert len(errors) == 2, runs
    for line in errors:
        assert "rank 2" in line and "exchange" in line, line
    assert took < 45, runs


@pytest.mark.parametrize("mode, where", [("stall", "exchange"), ("stall-coll", "allgather"),
                                         ("noconnect", "rendezvous")])
def test_late_rank_is_named(mode, where, file_rdv, tmp_path):
    rdv, root = file_rdv
    # (noconnect: ranks are given, so that the one that never comes is rank 2; --release: the
    # late rank returns once the others have given up, instead of sleeping 2.5 timeouts)
    release = tmp_path / "released"
    release.mkdir()
    runs, _ = run_ranks(3, str(SCRIPTS / "faults.py"), ucx_url(rdv), mode, "--world", "3",
                        "--timeout", "5", "--release", str(release), timeout=120,
                        numbered=mode == "noconnect")
    timeouts = [r for r in results(runs) if "timeout" in r]
    assert len(timeouts) == 2, runs
    for line in timeouts:
        assert "missing=[2]" in line and where in line and "rank(s) [2]" in line, line
        after = float(line.split("after=")[1].split("s")[0])
        assert after < 30, line
    assert left_in(root) == []


# -- configuration --------------------------------------------------------------------------

def test_port_range_and_interface(file_rdv):
    """UCX's listening sockets stay in the configured port range, on the configured interface."""
    rdv, _ = file_rdv
    lo = free_port()
    lo = min(lo, 60000)
    rng = f"{lo}-{lo + 40}"
    runs, _ = run_ranks(2, str(SCRIPTS / "faults.py"),
                        ucx_url(rdv, port_range=rng, net_devices="lo", tls="tcp,self"), "ports",
                        "--world", "2", "--timeout", "60",
                        env={"UCX_NET_DEVICES": "all", "UCX_TLS": "all"})  # options win over env
    lines = results(runs)
    assert len(lines) == 2, runs
    for line in lines:
        ports = ast.literal_eval(line.split("listening=")[1].split(" addrs=")[0])
        assert ports and all(lo <= p <= lo + 40 for p in ports), line
        addrs = ast.literal_eval(line.split("addrs=")[1])
        assert all(a.startswith("127.") for a in addrs), line


def test_options_are_checked(monkeypatch):
    monkeypatch.delenv("CYLON_STORE_RENDEZVOUS", raising=False)
    with pytest.raises(cs.ConfigError, match="bogus"):
        cs.connect("ucx://?bogus=1", job="opts", world_size=2)
    with pytest.raises(cs.ConfigError, match="rendezvous"):
        cs.connect("ucx://", job="opts", world_size=2, rank=0)
    with pytest.raises(cs.ConfigError, match="progress"):
        cs.connect("ucx://?progress=sometimes", job="opts", world_size=2)
    with pytest.raises(cs.ConfigError, match="claim"):
        cs.connect("ucx://", job="opts", world_size=2, claim="lottery", rendezvous="file:///tmp")
    # the environment: ucx:// options in their own namespace, another backend's left alone
    monkeypatch.setenv("CYLON_STORE_MPI_SOMETHING", "1")
    monkeypatch.setenv("CYLON_STORE_UCX_PROGRES", "blocking")
    with pytest.raises(cs.ConfigError, match="CYLON_STORE_UCX_PROGRES.*progress"):
        cs.connect("ucx://", job="opts", world_size=2, rendezvous="file:///tmp")


def test_world_of_one_needs_no_rendezvous():
    code = ("import cylon_store as cs, pyarrow as pa\n"
            "with cs.connect('ucx://', job='solo', world_size=1) as c:\n"
            "    assert c.exchange([pa.table({'a': [1]})])[0]['a'][0].as_py() == 1\n"
            "    assert c.allreduce(3) == 3 and c.bcast(pa.table({'b': [2]})).num_rows == 1\n"
            "print('solo ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **UCX_ENV})
    assert p.returncode == 0 and "solo ok" in p.stdout, p.stdout + p.stderr


def test_not_a_store():
    from cylon_store.transports.ucx import UcxStoreAdapter
    with pytest.raises(cs.NotSupportedError, match="file://"):
        UcxStoreAdapter("ucx://")
    from cylon_store.registry import schemes
    if "ucx" in schemes():
        with pytest.raises(cs.NotSupportedError, match="put/get"):
            cs.open_store("ucx://")
