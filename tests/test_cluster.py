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


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and one more node, 1 CPU each: two trials at once, one per node. One cluster for the module (its
    start is about 8 s): the test that kills its second node runs last."""
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


def test_a_node_that_disappears_fails_its_trial_which_runs_again_on_another_node(tiny_study, two_nodes):
    import os
    import signal
    import time

    from ray_cluster import session_processes

    tiny_study.write_text(tiny_study.read_text().replace('kind = "local"', 'kind = "local"\ncpus_per_trial = 1')
                          .replace("train_tokens = 2048", "train_tokens = 100000")
                          .replace("max_failures = 3", "max_failures = 3\nretries = 1"))
    cmd = [sys.executable, "-m", "dsnas.cli", "search", str(tiny_study), "--executor", "ray",
           "--address", two_nodes.address, "--n-trials", "3"]
    search = subprocess.Popen(cmd, env=two_nodes.driver_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while running_trials(tiny_study) < 2:  # one trial on each node
            assert search.poll() is None and time.monotonic() < deadline, search.communicate()
            time.sleep(0.2)
        time.sleep(2)
        for pid in session_processes(two_nodes.sessions[1:]):  # the second node: raylet, workers, agents
            os.kill(pid, signal.SIGKILL)
        out, err = search.communicate(timeout=300)
    finally:
        if search.poll() is None:
            search.kill()
    assert search.returncode == 0, err[-3000:]
    study, all_trials = trials(tiny_study)
    failed = [t for t in all_trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "its worker died" in failed[0].user_attrs["fail_reason"], \
        [t.user_attrs.get("fail_reason") for t in failed]
    retry = next(t for t in all_trials if t.user_attrs.get("requeued_from") == failed[0].number)
    assert retry.state == TrialState.COMPLETE and retry.params == failed[0].params
    assert retry.user_attrs["profile"]["worker"]["ray_node_id"] == two_nodes.node_ids["head"]
    assert sum(t.state == TrialState.COMPLETE for t in all_trials) == 3


def running_trials(study_file) -> int:
    import contextlib
    import os
    import sqlite3

    from dsnas.spec import load_study

    path = load_study(study_file).storage.removeprefix("sqlite:///")
    if not os.path.exists(path):
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
