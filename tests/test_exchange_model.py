"""Write-combined and direct exchange: results, and store requests equal to the request model."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

import cylon_store as cs
from cylon_store.comm import choose_strategy, request_cost_usd, request_model

from test_comm import part_for, rows_plan
from datagen import tables_equal


def run_ranks(store, world, strategy, fn):
    """Ranks as threads sharing one Store, so its stats add up every rank's requests."""
    results, errors = [None] * world, []
    sync = threading.Barrier(world)

    def run(rank):
        try:
            with cs.connect(store, job=f"model-{strategy}", rank=rank, world_size=world,
                            exchange=strategy, timeout=60) as comm:
                results[rank] = fn(comm, sync)
        except BaseException as exc:
            errors.append(exc)
            sync.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def counted_exchange(store, world, strategy, plan) -> dict:
    """Run one exchange of ``plan`` (checked) and return the requests counted during it alone."""
    windows = []

    def fn(comm, sync):
        comm.barrier()
        sync.wait()
        if comm.rank == 0:
            windows.append(dict(store.stats()["requests"]))
        sync.wait()
        out = comm.exchange([part_for(comm.rank, d, plan[comm.rank][d]) for d in range(world)])
        sync.wait()
        if comm.rank == 0:
            windows.append(dict(store.stats()["requests"]))
        sync.wait()   # nobody starts close()'s barrier before the snapshot
        for s, t in enumerate(out):
            assert tables_equal(t, part_for(s, comm.rank, plan[s][comm.rank]))
        return comm.strategy

    assert run_ranks(store, world, strategy, fn) == [strategy] * world
    before, after = windows
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("put", "get", "delete")}


@pytest.mark.parametrize("strategy, world", [(s, w) for s in ("direct", "combined", "twolevel")
                                              for w in (2, 3, 8, 16) if (s, w) != ("direct", 16)])
def test_requests_equal_model(store_url, strategy, world, monkeypatch):
    # The model counts storage requests: announcements that carry small data (sparing the
    # reads, or on local doorbells the write too) are turned off.
    import cylon_store.store_comm as comm_mod
    monkeypatch.setattr(comm_mod, "INLINE_MAX", -1)
    store = cs.open_store(store_url)
    counted = counted_exchange(store, world, strategy, rows_plan(world, "uniform", scale=5))
    model = request_model(world, strategy)
    assert (counted["put"], counted["get"]) == (model["put"], model["get"])
    if strategy == "direct":
        assert counted["delete"] == model["delete"]
    assert store.list("") == []   # deferred deletes of combined objects done by close
    store.close()


def test_combined_wins_on_request_price():
    for world in (3, 8, 64):
        assert request_cost_usd(request_model(world, "combined")) < \
            request_cost_usd(request_model(world, "direct"))
    assert request_model(1, "combined") == {"put": 0, "get": 0, "delete": 0}


def test_strategy_choice():
    with cs.open_store("memory://") as store:
        assert choose_strategy("auto", store, 8) == "direct"       # requests are free in memory
        assert choose_strategy("combined", store, 8) == "combined"
        with pytest.raises(cs.ConfigError, match="exchange"):
            choose_strategy("bogus", store, 8)


@pytest.mark.parametrize("strategy", ["combined", "twolevel"])
@pytest.mark.parametrize("world", [3, 5])   # two-level grids 2x2 and 3x2, both with a short row
def test_combined_with_empty_and_skewed_parts(store_url, world, strategy):
    store = cs.open_store(store_url)
    for skew in ("one_sender", "one_receiver", "empty"):
        plan = rows_plan(world, skew, scale=7)

        def fn(comm, sync):
            out = comm.exchange([part_for(comm.rank, d, plan[comm.rank][d], typed=True)
                                 for d in range(world)])
            for s, t in enumerate(out):
                assert tables_equal(t, part_for(s, comm.rank, plan[s][comm.rank], typed=True))
            out = comm.exchange([None] * world)
            assert all(t.num_rows == 0 for t in out)
            return True

        assert run_ranks(store, world, strategy, fn) == [True] * world
    assert store.list("") == []
    store.close()


@pytest.mark.parametrize("strategy", ["combined", "twolevel"])
def test_header_read_when_sizes_do_not_fit_the_key(monkeypatch, strategy):
    """A key too long for the size tag: receivers read the header range first (2 GETs a slot)."""
    import cylon_store.store_comm as comm_mod
    monkeypatch.setattr(comm_mod, "MAX_KEY_BYTES", 40)
    monkeypatch.setattr(comm_mod, "INLINE_MAX", -1)
    store = cs.open_store("memory://")
    counted = counted_exchange(store, 5, strategy, rows_plan(5, "uniform", scale=5))
    model = request_model(5, strategy, tags=False)
    assert (counted["put"], counted["get"]) == (model["put"], model["get"])
    store.close()


def _rank_four_leaves(comm):
    comm.barrier()
    if comm.rank == 4:
        comm.abort()
        return None
    comm.exchange([pa.table({"v": [1]})] * comm.world_size)


def test_twolevel_timeout_names_the_missing_rank():
    """Rank 4 of a 3x3 grid never exchanges: the error raised names it (a stage-1 wait of its
    row, or a stage-2 wait of its column: rank 4 forwards for both); waits on a rank that itself
    failed waiting are not taken for the cause."""
    with pytest.raises(cs.RankFailedError) as info:
        cs.launch(_rank_four_leaves, 9, store="memory://", launcher="threads", comm_timeout=3,
                  exchange="twolevel")
    cause = info.value.__cause__
    assert isinstance(cause, cs.ExchangeTimeoutError) and cause.missing == [4], cause
    assert "two-level, stage" in str(cause)
