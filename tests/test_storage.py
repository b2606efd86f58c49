"""Recovery of trials that a stopped driver left RUNNING: a dead local pid, silent heartbeats, no driver at all."""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState

from dsnas import storage as dsnas_storage


def test_stale_trials_are_failed_with_a_reason_and_queued_again(tmp_path, monkeypatch):
    monkeypatch.setattr(dsnas_storage, "GRACE_S", 1)
    monkeypatch.setattr(dsnas_storage, "HEARTBEAT_S", 1)
    storage = dsnas_storage.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, directions=["maximize", "maximize"])
    me = dsnas_storage.driver_identity()

    elsewhere = study.ask({"x": optuna.distributions.CategoricalDistribution([1, 2])})
    elsewhere.set_user_attr("driver", {**me, "host": "another-machine"})
    study._storage.record_heartbeat(elsewhere._trial_id)
    undispatched = study.ask()
    alive = study.ask()
    alive.set_user_attr("driver", me)
    time.sleep(2.2)  # past the grace period
    study._storage.record_heartbeat(alive._trial_id)
    dead = study.ask()
    dead.set_user_attr("driver", {**me, "pid": 2**22 + 12345})  # above the kernel's pid limit: never alive

    recovered = dsnas_storage.recover_stale_trials(study)

    assert recovered == sorted([elsewhere.number, undispatched.number, dead.number])
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[alive.number].state == TrialState.RUNNING
    reasons = {n: by_number[n].user_attrs["fail_reason"] for n in recovered}
    assert "no heartbeat for 1 s" in reasons[elsewhere.number]
    assert "before it could dispatch" in reasons[undispatched.number]
    assert f"pid {2**22 + 12345}" in reasons[dead.number]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.user_attrs["requeued_from"] for t in waiting) == recovered
    assert [t.params for t in waiting if t.user_attrs["requeued_from"] == elsewhere.number] == [{"x": elsewhere.params["x"]}]
    assert dsnas_storage.recover_stale_trials(study) == []  # nothing twice
