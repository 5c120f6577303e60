"""launcher='dask' on a real distributed.LocalCluster: 2 worker processes of 2 threads each,
started once for this module."""

from __future__ import annotations

import logging

import pytest

import cylon_store as cs
from cluster_cases import ClusterCases
from cylon_store.errors import ConfigError


@pytest.fixture(scope="module")
def dask_client():
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                           dashboard_address=":0", silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture
def cluster(dask_client):
    # A test whose rank killed its worker leaves the nanny restarting it: wait for the full
    # cluster before the next test.
    dask_client.wait_for_workers(2, timeout=60)
    return dask_client


class TestDask(ClusterCases):
    launcher, extra, modules, slots = "dask", "dask", ("distributed",), 4

    def assert_stopped(self, marker_dir, ranks):
        # Their waits were cancelled: each rank's function ended (its finally ran).
        ended = {int(p.name.split("-")[1]) for p in marker_dir.glob("ended-*")}
        assert set(ranks) <= ended

    def test_explicit_client(self, cluster):
        assert cs.launch(lambda comm: comm.rank, 2, launcher="dask", client=cluster) == [0, 1]

    def test_no_client(self, monkeypatch):
        import distributed

        def none():
            raise ValueError("No clients found")
        monkeypatch.setattr(distributed.Client, "current", staticmethod(none))
        with pytest.raises(ConfigError, match="default distributed.Client"):
            cs.launch(lambda comm: None, 1, launcher="dask")
        with pytest.raises(ConfigError, match="env= sets"):
            cs.launch(lambda comm: None, 1, launcher="dask", env={"A": "1"})
