"""launcher='ray' on a real local Ray instance (4 CPUs, started once for this module)."""

from __future__ import annotations

import logging
import os

import psutil
import pytest

from cluster_cases import ClusterCases
from cylon_store import cluster as C
from cylon_store.errors import ConfigError


@pytest.fixture(scope="module")
def cluster():
    import ray
    # address="local": a new instance of this module's own, never one another process started
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, object_store_memory=128 << 20)
    try:
        yield ray
    finally:
        ray.shutdown()


class TestRay(ClusterCases):
    launcher, extra, modules, slots = "ray", "ray", ("ray",), 4

    def assert_stopped(self, marker_dir, ranks):
        # The ranks' Ray worker processes were killed (force-cancelled), not left waiting.
        pids = {int(p.name.split("-")[2]) for p in marker_dir.glob("pid-*")
                if int(p.name.split("-")[1]) in ranks}
        assert len(pids) == len(ranks)
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert not alive

    def test_rank_environment(self, cluster):
        out = self.launch(lambda comm: (os.environ["CYLON_STORE_RANK"],
                                        os.environ["CYLON_STORE_WORLD_SIZE"],
                                        os.environ["CYLON_STORE_JOB"] == comm.job,
                                        os.environ.get("MY_SETTING")),
                          2, "memory://", env={"MY_SETTING": "x"})
        assert out == [("0", "2", True, "x"), ("1", "2", True, "x")]


def test_memory_refused_across_hosts():
    with pytest.raises(ConfigError, match="memory:// lives on this host.*10.9.8.7"):
        C._check_memory("memory://x", {"10.9.8.7", "127.0.0.1"}, "ray", "nodes")
    C._check_memory("memory://x", {"127.0.0.1"}, "ray", "nodes")
    C._check_memory("memory://x", {"10.9.8.7"}, "ray", "nodes", local={"10.9.8.7"})
    C._check_memory("redis://h:6379/0", {"10.9.8.7", "10.9.8.6"}, "ray", "nodes")
