"""`dsnas search --address` on a real two-node Ray cluster on this machine: trials run on both nodes.

The cluster (tests/ray_cluster.py) is started with the `ray` CLI and stopped by process id, so this test may
run beside other tests that use Ray."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from optuna.trial import TrialState
from ray_cluster import ray_cluster
from test_search import check_completed, trials

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="the cluster fixture reads /proc")]


@pytest.fixture
def two_nodes(tmp_path_factory):
    """A head and one more node, 1 CPU each: two trials at once, one per node."""
    with ray_cluster(tmp_path_factory.mktemp("ray"), extra_nodes=1) as cluster:
        yield cluster


def test_search_on_a_two_node_cluster_runs_trials_on_both_nodes(tiny_study, two_nodes):
    tiny_study.write_text(tiny_study.read_text().replace('kind = "local"', 'kind = "local"\ncpus_per_trial = 1'))
    # A driver in its own process, as a user runs it: Ray's settings (token authentication) are per process.
    cmd = [sys.executable, "-m", "dsnas.cli", "search", str(tiny_study), "--executor", "ray",
           "--address", two_nodes.address, "--n-trials", "4"]
    result = subprocess.run(cmd, env=two_nodes.driver_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]

    study, all_trials = trials(tiny_study)
    done = [t for t in all_trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and len(all_trials) == 4
    check_completed(study, done)
    ran_on = Counter(t.user_attrs["profile"]["worker"]["ray_node_id"] for t in done)
    assert set(ran_on) == set(two_nodes.node_ids.values()), (ran_on, two_nodes.node_ids)
