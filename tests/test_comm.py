"""The communicator suite: every collective on every backend, with threads and OS processes.

Each rank builds what it sends from a seed, so receivers can check every row against what the
sender must have sent: every row sent is received exactly once, by the right rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cylon_store as cs
from cylon_store import keys as K

from datagen import all_types_table, tables_equal

# -- rank functions (module level: they travel to rank processes) ---------------------------


def part_for(src: int, dst: int, rows: int, typed: bool = False) -> pa.Table:
    """What rank src sends to rank dst: tagged rows, optionally with every Arrow type."""
    idx = pa.array(np.arange(rows, dtype=np.int64))
    base = pa.table({"src": pa.array(np.full(rows, src, np.int32)),
                     "dst": pa.array(np.full(rows, dst, np.int32)), "idx": idx})
    if not typed:
        return base
    extra = all_types_table(rows, seed=src * 1000 + dst)
    for name in extra.column_names:
        base = base.append_column(name, extra.column(name))
    return base


def rows_plan(world: int, skew: str, scale: int = 50):
    """rows[src][dst] for a given skew pattern."""
    if skew == "uniform":
        return [[scale + 7 * s + d for d in range(world)] for s in range(world)]
    if skew == "one_sender":      # rank 0 sends everything, the others send empty parts
        return [[scale * 3 if s == 0 else 0 for d in range(world)] for s in range(world)]
    if skew == "one_receiver":    # everything goes to the last rank
        return [[scale * 2 if d == world - 1 else 0 for d in range(world)] for s in range(world)]
    if skew == "empty":
        return [[0] * world for _ in range(world)]
    raise ValueError(skew)


def rank_exchange(comm, plan, typed, rounds=1):
    me, P = comm.rank, comm.world_size
    for r in range(rounds):
        parts = [part_for(me, d, plan[me][d], typed) for d in range(P)]
        out = comm.exchange(parts)
        assert len(out) == P
        for s, t in enumerate(out):
            expected = part_for(s, me, plan[s][me], typed)
            assert t.schema.equals(expected.schema), (s, t.schema, expected.schema)
            assert tables_equal(t, expected), f"rank {me} round {r}: wrong data from rank {s}"
    return me


def rank_collectives(comm):
    me, P = comm.rank, comm.world_size
    mine = pa.table({"rank": [me], "payload": [f"from-{me}"]})
    ag = comm.allgather(mine)
    assert [t["rank"][0].as_py() for t in ag] == list(range(P))
    g = comm.gather(mine, root=P - 1)
    if me == P - 1:
        assert [t["rank"][0].as_py() for t in g] == list(range(P))
    else:
        assert g is None
    b = comm.bcast(pa.table({"x": [42, 43]}) if me == 0 else None, root=0)
    assert b["x"].to_pylist() == [42, 43]
    assert comm.allreduce(me + 1) == P * (P + 1) // 2
    assert comm.allreduce(me + 1, "prod") == int(np.prod(np.arange(1, P + 1)))
    assert comm.allreduce(float(me), "max") == float(P - 1)
    assert comm.allreduce(-me, "min") == -(P - 1)
    arr = comm.allreduce(np.arange(4, dtype=np.float64) * me, "sum")
    np.testing.assert_allclose(arr, np.arange(4) * sum(range(P)))
    comm.barrier()
    # None and empty parts, then an exchange where nobody has a schema at all.
    out = comm.exchange([None] * P)
    assert all(t.num_columns == 0 and t.num_rows == 0 for t in out)
    schema_tbl = pa.table({"a": pa.array([], pa.int64())})
    out = comm.exchange([None if (d == 0 and P > 1) else schema_tbl for d in range(P)])
    assert all(t.schema.equals(schema_tbl.schema) for t in out)
    return comm.stats["exchanges"]


def rank_schema_mismatch(comm):
    me = comm.rank
    t = pa.table({"a": pa.array([1], pa.int64() if me != 1 else pa.string())}) if me != 1 else \
        pa.table({"a": pa.array(["x"])})
    try:
        comm.exchange([t] * comm.world_size)
    except cs.SchemaMismatchError as exc:
        msg = str(exc)
        assert "rank" in msg and "int64" in msg and "string" in msg
        # the communicator is still usable after a mismatch
        comm.barrier()
        return "mismatch"
    return "no error"


def rank_list_after(comm, rounds):
    for _ in range(rounds):
        comm.exchange([pa.table({"v": [comm.rank]})] * comm.world_size)
        comm.allgather(pa.table({"v": [comm.rank]}))
        comm.bcast(pa.table({"v": [1]}) if comm.rank == 0 else None)
    return comm.rank


# -- helpers ----------------------------------------------------------------------------------

def launcher_for(backend) -> list[str]:
    return ["threads", "local"] if backend.traits.get("processes") else ["threads"]


def assert_empty(store):
    """``store`` is the test's open Store (a memory:// store lives only while one is open)."""
    assert store.list("") == [], f"keys left behind: {store.list('')[:10]}"


# -- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world, skew", [(w, "uniform") for w in (1, 2, 3, 4, 8)] +
                         [(w, s) for w in (3, 8) for s in ("one_sender", "one_receiver", "empty")])
def test_exchange_threads(store_url, world, skew, store):
    plan = rows_plan(world, skew)
    assert cs.launch(rank_exchange, world, store=store_url, launcher="threads",
                     args=(plan, False), comm_timeout=30) == list(range(world))
    assert_empty(store)


@pytest.mark.parametrize("world", [2, 8])
def test_exchange_processes(store_url, world, store):
    # memory:// too: launch turns it into a shared-memory store for the rank processes.
    plan = rows_plan(world, "uniform")
    assert cs.launch(rank_exchange, world, store=store_url, args=(plan, True, 2),
                     comm_timeout=60) == list(range(world))
    assert_empty(store)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_exchange_all_types(store_url, world, store):
    plan = rows_plan(world, "uniform", scale=20)
    cs.launch(rank_exchange, world, store=store_url, launcher="threads", args=(plan, True, 3),
              comm_timeout=30)
    assert_empty(store)


def test_twolevel_processes(tmp_path):
    """``exchange=`` travels to rank processes through the environment (the strategies
    themselves, with every skew and type, on every backend: tests/test_exchange_model.py)."""
    plan = rows_plan(4, "uniform")
    url = f"file://{tmp_path}/store?fsync=false"
    assert cs.launch(rank_exchange, 4, store=url, args=(plan, True, 2), comm_timeout=60,
                     exchange="twolevel") == list(range(4))
    with cs.open_store(url) as store:
        assert_empty(store)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_collectives(store_url, world, store):
    res = cs.launch(rank_collectives, world, store=store_url, launcher="threads", comm_timeout=30)
    assert res == [2] * world
    assert_empty(store)


def test_collectives_processes(store_url, store):
    assert cs.launch(rank_collectives, 3, store=store_url, comm_timeout=60) == [2] * 3
    assert_empty(store)


@pytest.mark.parametrize("world", [2, 4])
def test_memory_launch_processes(world):
    """The embedded default: memory:// shared by rank processes, nothing left in /dev/shm."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    plan = rows_plan(world, "one_sender")
    assert cs.launch(rank_exchange, world, store=f"memory://{name}", args=(plan, True)) == \
        list(range(world))
    assert cs.launch(rank_collectives, world, store=f"memory://{name}") == [2] * world
    assert not os.path.exists(f"/dev/shm/cylon-store/{name}")


def test_schema_mismatch_on_every_rank(store_url, store):
    assert cs.launch(rank_schema_mismatch, 3, store=store_url, launcher="threads",
                     comm_timeout=30) == ["mismatch"] * 3
    assert_empty(store)


def test_repeated_and_nothing_left(store_url, store):
    cs.launch(rank_list_after, 3, store=store_url, launcher="threads", args=(5,), comm_timeout=30)
    assert_empty(store)


def test_two_concurrent_jobs_one_store(store_url, store):
    plan_a, plan_b = rows_plan(3, "uniform"), rows_plan(2, "one_sender")
    results = {}

    def run(name, world, plan):
        results[name] = cs.launch(rank_exchange, world, store=store_url, launcher="threads",
                                  args=(plan, False, 3), job=name, comm_timeout=30)

    ts = [threading.Thread(target=run, args=("job-a", 3, plan_a)),
          threading.Thread(target=run, args=("job-b", 2, plan_b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == {"job-a": [0, 1, 2], "job-b": [0, 1]}
    assert_empty(store)


def test_job_reused_after_clean_close(store_url, store):
    for _ in range(3):
        cs.launch(rank_collectives, 2, store=store_url, launcher="threads", job="same-job",
                  comm_timeout=30)
    assert_empty(store)


def test_rank_never_arrives(store_url, store):
    """World of 3, only ranks 0 and 1 show up: both fail at the timeout naming rank 2."""
    errors = {}

    def run(rank):
        try:
            cs.connect(store_url, job="lonely", rank=rank, world_size=3, timeout=1.5)
        except cs.ExchangeTimeoutError as exc:
            errors[rank] = exc

    ts = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert time.monotonic() - t0 < 15
    assert sorted(errors) == [0, 1]
    for exc in errors.values():
        assert exc.missing == [2] and "[2]" in str(exc)
    assert_empty(store)


def rank_stops_early(comm):
    comm.barrier()            # every rank is past the rendezvous before rank 2 leaves
    if comm.rank == 2:
        comm.abort()          # leaves without taking part in the exchange
        return None
    comm.exchange([pa.table({"v": [1]})] * comm.world_size)


def test_exchange_timeout_names_missing_rank(store_url):
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_stops_early, 3, store=store_url, launcher="threads", comm_timeout=3)
    cause = info.value.__cause__
    assert isinstance(cause, cs.ExchangeTimeoutError)
    assert cause.missing == [2]
    assert "[2]" in str(cause)


def rank_raises(comm):
    if comm.rank == 1:
        raise KeyError("rank one is broken")
    comm.exchange([None] * comm.world_size)


@pytest.mark.parametrize("launcher", ["threads", "local"])
def test_rank_that_raises(launcher):
    t0 = time.monotonic()
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_raises, 3, launcher=launcher, comm_timeout=60)
    assert time.monotonic() - t0 < 20, "a failing rank must end the launch promptly"
    assert info.value.rank == 1
    assert "rank one is broken" in str(info.value)
    assert "Traceback" in (info.value.remote_traceback or "")


def rank_dies(comm):
    if comm.rank == 0:
        os.kill(os.getpid(), 9)
    comm.barrier()


def test_rank_that_dies():
    t0 = time.monotonic()
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_dies, 3, comm_timeout=60)
    assert time.monotonic() - t0 < 20
    assert info.value.rank == 0 and "SIGKILL" in str(info.value)


def test_stale_message_from_earlier_run_is_not_read(store_url, store):
    """A message left by a crashed run of the same job (other run token) is ignored."""
    stale = K.msg_key("stale-job", "0" * 16, 1, 0, 1)
    store.put(stale, pa.table({"v": [666]}))
    res = cs.launch(lambda comm: comm.exchange([pa.table({"v": [comm.rank]})] * 2)[1]["v"][0].as_py(),
                    2, store=store_url, launcher="threads", job="stale-job", comm_timeout=30)
    assert res == [1, 1]
    assert store.list("") == [stale]
    store.delete(stale)


def test_leftover_hello_gives_clear_error(store_url, store):
    store.put_bytes(K.hello_key("crashed", 0), b"x")
    with pytest.raises(cs.RendezvousError, match="cylon-store clean"):
        cs.connect(store_url, job="crashed", rank=0, world_size=2, timeout=2)
    store.delete(K.hello_key("crashed", 0))


def test_store_rendezvous_processes(backend, store_url, tmp_path, store):
    """Ranks started independently, knowing only the world size, claim ranks by create-if-absent."""
    if backend.name == "memory":   # processes share a memory store through /dev/shm
        store_url = f"{store_url}?shared=true"
        store = cs.open_store(store_url)
    world = 4
    code = ("import cylon_store as cs, pyarrow as pa, sys\n"
            f"c = cs.connect({store_url!r}, job='rdv', world_size={world}, rendezvous='store', timeout=60)\n"
            "out = c.allgather(pa.table({'r': [c.rank]}))\n"
            "print(c.rank, [t['r'][0].as_py() for t in out])\n"
            "c.close()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CYLON_STORE_RANK", "CYLON_STORE_WORLD", "OMPI_", "PMI"))}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
             for _ in range(world)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ranks = sorted(int(o.split()[0]) for o in outs)
    assert ranks == list(range(world))
    assert all(f"{list(range(world))}" in o for o in outs)
    assert_empty(store)


def test_bad_arguments(store_url, store):
    with pytest.raises(cs.ConfigError, match="job"):
        cs.connect(store_url, job="bad job!", world_size=1, rank=0)
    with pytest.raises(cs.ConfigError, match="rank"):
        cs.connect(store_url, job="j", world_size=2, rank=5)
    with cs.connect(store_url, job="args", world_size=1, rank=0) as c:
        with pytest.raises(cs.ConfigError, match="2 parts"):
            c.exchange([None, None])
        with pytest.raises(cs.ConfigError, match="root"):
            c.bcast(pa.table({"a": [1]}), root=3)
        with pytest.raises(cs.ConfigError, match="op"):
            c.allreduce(1, op="avg")
        with pytest.raises(cs.ConfigError):
            c.allreduce("text")
        # errors in arguments do not poison the communicator
        assert c.allreduce(5) == 5
    with pytest.raises(cs.ConfigError, match="launcher"):
        cs.launch(rank_collectives, 2, launcher="carrier-pigeon")
    with pytest.raises(cs.ConfigError, match="function="):  # before anything is invoked
        cs.launch(rank_collectives, 2, launcher="lambda")
    assert_empty(store)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_every_row_exactly_once(data):
    world = data.draw(st.integers(1, 5))
    plan = data.draw(st.lists(st.lists(st.integers(0, 40), min_size=world, max_size=world),
                              min_size=world, max_size=world))
    url = f"memory://prop-{uuid.uuid4().hex[:8]}"

    def fn(comm):
        me = comm.rank
        out = comm.exchange([part_for(me, d, plan[me][d]) for d in range(world)])
        got = pa.concat_tables(out)
        return got.select(["src", "dst", "idx"]).to_pylist()

    res = cs.launch(fn, world, store=url, launcher="threads", comm_timeout=30)
    received = [(r["src"], r["dst"], r["idx"]) for rows in res for r in rows]
    sent = [(s, d, i) for s in range(world) for d in range(world) for i in range(plan[s][d])]
    assert sorted(received) == sorted(sent)                   # exactly once
    for dst, rows in enumerate(res):
        assert all(r["dst"] == dst for r in rows)              # by the right rank


def rank_large(comm, mib_per_rank):
    P = comm.world_size
    rows = (mib_per_rank << 20) // 16 // P
    rng = np.random.default_rng(comm.rank)
    parts = [pa.table({"k": rng.integers(0, 1 << 60, rows), "v": np.full(rows, comm.rank, np.int64)})
             for _ in range(P)]
    out = comm.exchange(parts)
    return sum(t.num_rows for t in out), sum(t.nbytes for t in out)


@pytest.mark.slow
def test_large_exchange_file_processes(tmp_path):
    """~400 MiB in total through the file backend by 4 processes."""
    url = f"file://{tmp_path}/big?fsync=false"
    res = cs.launch(rank_large, 4, store=url, args=(100,), comm_timeout=300)
    rows = (100 << 20) // 16 // 4
    assert [r[0] for r in res] == [rows * 4] * 4
    with cs.open_store(url) as s:
        assert_empty(s)


# -- mpirun ------------------------------------------------------------------------------------

def test_mpi_launcher(store_url, store):
    """launcher='mpi': the same worker entry under mpirun, ranks from mpirun's environment."""
    res = cs.launch(rank_collectives, 3, store=store_url, launcher="mpi", timeout=300, comm_timeout=120)
    assert res == [2] * 3
    assert_empty(store)


def test_mpi_launcher_rank_raises():
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(rank_raises, 3, launcher="mpi", timeout=300, comm_timeout=120)
    assert info.value.rank == 1 and "rank one is broken" in str(info.value)


def test_plain_mpirun_script(tmp_path):
    """`mpirun -n 4 python my_script.py`: connect() reads rank and size from OMPI_ variables."""
    from cylon_store.launch import find_mpirun, mpi_env
    script = tmp_path / "my_script.py"
    script.write_text(
        "import cylon_store as cs, pyarrow as pa\n"
        f"comm = cs.connect('file://{tmp_path}/store?fsync=false', job='plain-mpirun')\n"
        "out = comm.exchange([pa.table({'src': [comm.rank]})] * comm.world_size)\n"
        "print('rank', comm.rank, 'of', comm.world_size, 'got', sorted(t['src'][0].as_py() for t in out))\n"
        "comm.close()\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CYLON_STORE_")}, **mpi_env()}
    proc = subprocess.run([find_mpirun(), "-n", "4", sys.executable, str(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank"))
    assert lines == [f"rank {r} of 4 got [0, 1, 2, 3]" for r in range(4)]
    with cs.open_store(f"file://{tmp_path}/store") as s:
        assert s.list("") == []


# -- announced keys (backends with notification) -----------------------------------------------

def rank_counts_lists(comm, plan):
    comm.barrier()
    before = comm.store.stats()["requests"].get("list", 0)
    rank_exchange(comm, plan, False, 3)
    return comm.store.stats()["requests"].get("list", 0) - before


def test_announced_keys_replace_listing(store_url, store):
    """Where the backend notifies, receivers read the keys announced to them: no LIST at all
    (with doorbells, only when a poll's sleep ended without one; elsewhere they LIST their
    inbox)."""
    plan = rows_plan(4, "uniform", scale=5)
    lists = cs.launch(rank_counts_lists, 4, store=store_url, launcher="threads", args=(plan,),
                      comm_timeout=30)
    if store.capabilities.notification:
        assert lists == [0] * 4, lists
    elif not store.capabilities.doorbell:
        assert all(n > 0 for n in lists), lists


def test_lost_announcements_are_covered_by_listing(monkeypatch):
    """Announcements that never arrive (a broken connection ate them) cost a LIST a second,
    not the exchange."""
    from cylon_store.adapters.memory import MemoryAdapter
    monkeypatch.setattr(MemoryAdapter, "notify", lambda self, channel, message=b"": None)
    monkeypatch.setattr("cylon_store.store_comm.LIST_FALLBACK", 0.2)
    plan = rows_plan(3, "uniform", scale=5)
    assert cs.launch(rank_exchange, 3, store="memory://", launcher="threads",
                     args=(plan, False, 2), comm_timeout=30) == [0, 1, 2]


def test_rank_process_exits_when_its_launcher_dies(tmp_path):
    """A rank whose parent (the launcher, or mpirun) is killed ends within a second instead of
    waiting out its timeouts as an orphan."""
    import psutil
    import signal
    import subprocess
    import sys
    import time
    import cloudpickle
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(cloudpickle.dumps((print, ())))   # never runs: rank 1 never comes
    env = dict(os.environ, CYLON_STORE_RESULT_DIR=str(tmp_path),
               CYLON_STORE_URL=f"file://{tmp_path}/store?fsync=false", CYLON_STORE_JOB="orphan",
               CYLON_STORE_WORLD_SIZE="2", CYLON_STORE_RANK="0", CYLON_STORE_TIMEOUT="60")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "p = subprocess.Popen([sys.executable, '-m', 'cylon_store.worker', sys.argv[1]])\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(120)\n", str(payload)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        time.sleep(2.0)
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        child.wait(timeout=5)   # raises psutil.TimeoutExpired if the orphan lingers
    finally:
        parent.kill()


def test_ctrl_c_propagates_and_cleans_up(store_url, store):
    """KeyboardInterrupt inside a collective is not turned into an ExchangeError: it propagates
    as itself, the failure sticks, and leaving the context manager removes what the rank wrote."""
    with pytest.raises(KeyboardInterrupt):
        with cs.connect(store_url, job="ctrl-c", rank=0, world_size=1) as comm:
            comm.allgather(pa.table({"a": [1]}))

            def interrupted(seq):
                raise KeyboardInterrupt
            comm._barrier_impl = interrupted
            comm.barrier()
    assert "interrupted" in str(comm._failed)   # the failure stuck: the exit aborted, not closed
    with pytest.raises(cs.ExchangeError, match="closed"):
        comm.allgather(pa.table({"a": [1]}))
    assert_empty(store)


def _rank_fails_while_a_send_is_slow(comm):
    if comm.rank == 1:
        raise ValueError("rank 1 fails before the exchange")
    comm.exchange([pa.table({"a": [comm.rank]})] * comm.world_size)


def test_abort_waits_for_its_sends_before_cleaning_up(monkeypatch):
    """A send still in flight when the exchange fails lands before the rank's cleanup lists its
    keys, so nothing is left behind (before: the cleanup ran first and the send landed after)."""
    from cylon_store.adapters.memory import MemoryAdapter

    slow_put = MemoryAdapter.put

    def put(self, key, chunks, mode=cs.PutMode.OVERWRITE):
        if "/r000001/" in key:
            time.sleep(1.0)
        return slow_put(self, key, chunks, mode)

    monkeypatch.setattr(MemoryAdapter, "put", put)
    with cs.open_store("memory://t-abort-drain") as store:
        with pytest.raises(cs.RankFailedError, match="rank 1"):
            cs.launch(_rank_fails_while_a_send_is_slow, 2, store=store.url, launcher="threads",
                      comm_timeout=30)
        time.sleep(1.5)
        assert_empty(store)


def test_doorbell_that_arrives_while_a_rank_binds_is_kept(tmp_path, monkeypatch):
    """A rank binds its doorbell when its communicator is created, with a wait(0) that may
    already return a message (rung between bind and return): it is kept, not dropped (its
    sender wrote no object, so a dropped one left the receiver waiting until its timeout)."""
    from cylon_store.adapters.file import FileAdapter
    real = FileAdapter.wait
    rung = b"_cylon/bell/abc/000000001/all/000001\0" + b"data"

    def wait(self, channel, timeout):
        got = real(self, channel, timeout)
        return got + [rung] if timeout == 0 else got

    monkeypatch.setattr(FileAdapter, "wait", wait)
    with cs.connect(f"file://{tmp_path}/s?fsync=false", job="bell", rank=0, world_size=1) as comm:
        assert comm._mailbox == {"_cylon/bell/abc/000000001/all/000001": b"data"}
