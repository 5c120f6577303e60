"""The cases every cluster launcher (``ray``, ``dask``) passes: the kernel's smallest row over
memory:// (made shared), file:// and redis://, results in rank order, a rank that raises, a rank
whose process dies, a cluster too small, a missing extra.  tests/test_launch_ray.py and
tests/test_launch_dask.py subclass ``ClusterCases`` with a module-scoped cluster."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

import cylon_store as cs
import servers
from cylon_store import keys as K
from cylon_store import kernel as Kn
from cylon_store.errors import ConfigError, RankFailedError
from cylon_store.kernel.join import local_join
from kernel_helpers import assert_same_rows, concat, random_table, split_rows
from test_kernel_ops import _pyarrow_groupby, _stable_sort

WORLD = 3
TIMEOUT = 60.0
AGGS = [("v", "sum"), ("x", "mean"), ("v", "count")]


def kernel_row(comm, lefts, rights, tables):
    """The kernel suite's smallest row on one rank: a join, a groupby and a sort."""
    r = comm.rank
    return (r, os.getpid(),
            Kn.join(comm, lefts[r], rights[r], on="k0", how="inner", broadcast=False),
            Kn.groupby(comm, tables[r], "k0", AGGS),
            Kn.sort(comm, tables[r], "k0"))


def raise_on_one(comm, marker_dir):
    open(os.path.join(marker_dir, f"pid-{comm.rank}-{os.getpid()}"), "w").close()
    try:
        comm.barrier()  # every rank is in here
        if comm.rank == 1:
            raise ValueError("rank one fails on purpose")
        comm.barrier()  # waits for rank 1, which never comes
    finally:  # a cancelled wait ends the function (a killed process never gets here)
        open(os.path.join(marker_dir, f"ended-{comm.rank}"), "w").close()


def die_on_two(comm):
    comm.allreduce(comm.rank)   # every rank has written keys by now
    if comm.rank == 2:
        os._exit(7)
    comm.barrier()


def left_in_store(url: str) -> list:
    with cs.open_store(url) as store:
        return store.list(K.ROOT + "/")


class ClusterCases:
    launcher = ""
    extra = ""
    modules: tuple = ()
    #: slots of the cluster the subclass starts
    slots = 4

    def launch(self, fn, n, url, args=(), **kw):
        kw.setdefault("timeout", TIMEOUT)
        kw.setdefault("comm_timeout", TIMEOUT)
        return cs.launch(fn, n, store=url, launcher=self.launcher, args=args, **kw)

    def assert_stopped(self, marker_dir, ranks):
        raise NotImplementedError

    @pytest.fixture(params=["memory", "file", "redis"])
    def store_url(self, request, tmp_path_factory):
        return servers.started_backend(request.param, tmp_path_factory).make_url()

    def test_kernel_row(self, cluster, store_url):
        left = random_table(120, seed=1, key_kinds=("int64",), cardinality=15)
        right = random_table(80, seed=2, key_kinds=("int64",), cardinality=15)
        table = random_table(150, seed=3, key_kinds=("int64",), cardinality=10)
        out = self.launch(kernel_row, WORLD, store_url,
                          (split_rows(left, WORLD, seed=4), split_rows(right, WORLD, seed=5),
                           split_rows(table, WORLD, seed=6)))
        assert [o[0] for o in out] == list(range(WORLD))
        assert_same_rows(concat([o[2] for o in out]),
                         local_join(left, right, ["k0"], ["k0"], "inner"))
        assert_same_rows(concat([o[3] for o in out]), _pyarrow_groupby(table, ["k0"], AGGS),
                         by=["k0"])
        assert concat([o[4] for o in out]).equals(_stable_sort(table, [("k0", "ascending")]))
        assert os.getpid() not in {o[1] for o in out}   # ranks ran in the cluster's processes
        if store_url.startswith("memory://"):            # shared for the run, then removed
            name = store_url.split("://", 1)[1]
            assert not os.path.exists(f"/dev/shm/cylon-store/{name}")
        else:
            assert left_in_store(store_url) == []

    def test_results_in_rank_order(self, cluster):
        job = f"order-{uuid.uuid4().hex[:8]}"
        out = self.launch(lambda comm: (comm.rank, comm.world_size, comm.job,
                                        comm.allreduce(comm.rank, "max")), self.slots,
                          "memory://", job=job)
        assert out == [(r, self.slots, job, self.slots - 1) for r in range(self.slots)]

    def test_rank_raises(self, cluster, tmp_path):
        url = f"file://{tmp_path}/store?fsync=false"
        markers = tmp_path / "markers"
        markers.mkdir()
        with pytest.raises(RankFailedError) as info:
            self.launch(raise_on_one, WORLD, url, (str(markers),))
        assert info.value.rank == 1
        assert "rank 1 of job" in str(info.value) and "ValueError" in str(info.value)
        assert "rank one fails on purpose" in info.value.remote_traceback
        self.assert_stopped(markers, [0, 2])
        assert left_in_store(url) == []

    def test_rank_dies(self, cluster, tmp_path_factory):
        # redis://: the keys a killed rank wrote stay on the server unless the launcher cleans
        url = servers.started_backend("redis", tmp_path_factory).make_url()
        with pytest.raises(RankFailedError) as info:
            self.launch(die_on_two, WORLD, url)
        assert "died" in str(info.value) and "2" in str(info.value)
        assert left_in_store(url) == []

    def test_cluster_too_small(self, cluster):
        with pytest.raises(ConfigError) as info:
            self.launch(lambda comm: None, self.slots + 1, "memory://")
        assert f"{self.slots + 1} ranks" in str(info.value)
        assert f"has {self.slots}" in str(info.value)

    def test_missing_extra(self, monkeypatch):
        for module in self.modules:
            monkeypatch.setitem(sys.modules, module, None)   # import raises ImportError
        with pytest.raises(ConfigError, match=rf"pip install 'cylon-store\[{self.extra}\]'"):
            cs.launch(lambda comm: None, 1, launcher=self.launcher)
