"""The driver of a search run: asks Optuna for trials, screens them with the predictor, dispatches them, answers
their rungs, and records what comes back. It alone writes the study; workers only return results."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsnas.engine_offer import settle
from dsnas.errors import DsnasError
from dsnas.executors import BaseExecutor, make_executor
from dsnas.fidelity import RungJudge, over_limits
from dsnas.interrupts import InterruptGuard
from dsnas.models import describe, validate
from dsnas.profiler import MeasureGate, device_key, has_cuda, resolve_device
from dsnas.profiler.cache import entry_key
from dsnas.profiler.gate import holders, waits_notice
from dsnas.progress import Progress
from dsnas.sampler import DsnasSampler, Problem
from dsnas.screening import Screen, arch_counter
from dsnas.space import arch_sampler, load_space_file
from dsnas.spec import TRAINED, StudySpec
from dsnas.storage import (
    GRACE_S,
    HEARTBEAT_S,
    BudgetCount,
    OutageRetry,
    StorageLost,
    artifact_dir,
    artifact_store,
    connection_lost,
    driver_identity,
    has_heartbeats,
    process_tag,
    recover_stale_trials,
    requeue,
    set_user_attrs,
    storage_engine,
    study_lock,
    tag_gone,
)
from dsnas.tasks import data_differs, make_task, runs_own_trials
from dsnas.trial import TrialFn, TrialRequest, TrialResult, own_work
from dsnas.worker import WAIT_SAY_S

# A predictor that skips this many candidates in a row has found the limits leave (almost) nothing to search.
MAX_SKIPS_IN_A_ROW = 100
# A sampler that proposes this many evaluated candidates in a row has (almost) exhausted the space.
MAX_REUSES_IN_A_ROW = 100
# A driver whose budget's rest runs in other drivers looks this often for a trial whose driver stopped.
WATCH_S = 2.0
# How long the driver waits for this node's CPU gate before it samples or screens a candidate without it: a
# measurement takes seconds, and a trial that hangs holding the gate must not keep the driver from stopping it.
GATE_PATIENCE_S = 30.0


class Driver:
    """One run of a study: dispatches trials to the executor, answers their rungs, records their results."""

    def __init__(self, spec: StudySpec, study: Any, trial_fn: TrialFn, progress: Progress,
                 callbacks: Sequence[Callable[[Any, Any], None]] = ()) -> None:
        self.spec, self.study, self.progress = spec, study, progress
        self.callbacks = list(callbacks)
        self._sample: Any = None  # settled before the first trial (see _sampler)
        self._cpu_gate: Any = None  # this node's CPU measurement gate, or False when trials measure on a GPU
        self.task = make_task(spec.task)
        self.data = self.task.fingerprint()
        self.run_id = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"  # see TrialRequest.run
        self._check_same_data()
        self.task_arch = self.task.arch_defaults()
        self.trial_fn = trial_fn
        self.rungs = RungJudge(spec) if spec.fidelity.enabled else None
        self.screen = Screen(spec, study, arch_counter(self.task, spec.hardware.batch_sizes, spec.engine.int8_backend))
        self.predictions: dict[int, dict[str, float]] = {}  # trial number -> what the screen predicted for it
        self.brackets: dict[int, int] = {}  # trial number -> its Hyperband bracket
        self.stopped: dict[int, str] = {}  # trial number -> why the driver stopped it at a rung
        self.skips_in_a_row = 0
        self.reuses_in_a_row = 0
        self.watching = False  # the rest of the budget runs in other drivers (see _watch_other_drivers)
        self._evaluated: dict[str, int] | None = None  # evaluation key -> the trial that trained it (see _original)
        # A trial waiting for the running trial of the same candidate: number -> (twin, arch, short, key).
        self.twins: dict[int, tuple[int, dict[str, Any], str, str]] = {}
        self.foreign: dict[int, int] = {}  # a twin another driver trains: its number -> its storage id
        self._foreign_running: tuple[float, set[int]] = (0.0, set())  # when read (monotonic), which still ran
        self.keys: dict[int, str] = {}  # running trial number -> its evaluation key
        self.budget = BudgetCount()
        self._executor: BaseExecutor | None = None  # started on the first dispatch (a spent budget starts no Ray)
        self.artifacts: Any = None  # created on the first trial that returns weights
        self.running: dict[int, Any] = {}  # trial number -> optuna Trial
        self.clocks: dict[int, TrialClock] = {}  # trial number -> its own running time so far (trial_timeout_s)
        self.identity = driver_identity()
        self.guard = InterruptGuard()
        # A Ctrl-C held back by the guard (see interrupts.py) must not wait for the database to come back.
        self.outage = OutageRetry(spec.storage, spec.budget.storage_outage_s,
                                  lambda text: progress.say(text, logging.WARNING),
                                  interrupted=lambda: self.guard.pending)
        self.recording: int | None = None  # the trial whose finished result is being stored
        self.started = time.monotonic()
        self._beat_stop = threading.Event()
        threading.Thread(target=self._heartbeats, name="dsnas-heartbeat", daemon=True).start()

    def loop(self) -> str:
        self.study._stop_flag = False  # as optimize() starts: a stop() of an earlier run does not stop this one
        while True:
            # A free slot first: it costs nothing. Then the stop reasons. Once a trial was dispatched, the budget is
            # not among them: whether it has room is read under the study's lock as each trial is taken (see
            # _take_place), a full one ends this loop, and the reason is read once nothing runs. Before the first,
            # a spent budget must stop the run before the space's engine choices are settled (a probe).
            # A trial waiting for its running twin holds its place (else each free place took another waiting one).
            while len(self.running) < self.executor.slots and \
                    self._stop_reason(read_budget=self._sample is None) is None:
                with self.guard.writing():
                    if not self._dispatch():
                        break  # the budget is full: this driver's, or another driver took the last place
            if not self.running:
                stop = self._stop_reason()
                if stop is not None:
                    return stop
                self._watch_other_drivers()
                continue
            if len(self.twins) == len(self.running):
                time.sleep(0.5)  # each waits for another driver's twin: nothing runs here (the local executor's
                # wait returns at once, a busy loop)
            for number, outcome in self.executor.wait(timeout=1.0) if self._executor is not None else []:
                if number not in self.running:
                    continue  # taken back by another driver at a rung (see _unless_taken_back)
                with self.guard.writing(), self._unless_taken_back(number):
                    self._record(self.running[number], outcome)
            self._stop_overdue()
            self._say_long_waits()
            if self.twins:
                with self.guard.writing():
                    self._answer_twins()

    @contextmanager
    def _unless_taken_back(self, number: int) -> Iterator[None]:
        """Another driver took trial ``number`` back as its driver's (this one's) heartbeats stopped for GRACE_S (a
        pause, a long outage), and finished it: its result is dropped in one line, and the search goes on (it
        stopped with Optuna's UpdateFinishedTrialError, twice)."""
        import optuna

        try:
            yield
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as e:
            # (study.tell reads the trial first: "Cannot tell a FAIL trial." where it was taken back just before.)
            if isinstance(e, ValueError) and not self._finished_elsewhere(number):
                raise
            for kept in (self.running, self.clocks, self.stopped, self.twins):
                kept.pop(number, None)
            self.recording = None
            self.progress.say(f"  trial {number} was taken back by another driver while this one sent no heartbeat "
                              f"for {GRACE_S} s (paused, or a database outage): its result is not stored")

    def _finished_elsewhere(self, number: int) -> bool:
        trial = self.running.get(number)
        if trial is None:
            return False
        try:
            return self.study._storage.get_trial(trial._trial_id).state.is_finished()
        except Exception:  # the storage cannot say: the error stands as it was
            return False

    def _call_waiting(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``executor.call``, where Ctrl-C and SIGTERM act at once: the engine probe waits for the device's gate
        (another study's trial may hold it for minutes), then times for seconds, and nothing is written meanwhile
        (an interrupted probe stores no cache entry)."""
        with self.guard.waiting():
            if self.spec.executor.kind != "local" and not self.spec.executor.address:
                self._say_gate_held("the engine probe")
            return self.executor.call(fn, *args)

    def _say_gate_held(self, what: str) -> None:
        """Who holds this node's gate of the study's device as ``what`` goes to a Ray worker to measure: its own
        notice is lost there (the workers' logs do not reach the driver), and the search said nothing for minutes.
        (A local executor measures in this process, which says so itself.)"""
        gate = MeasureGate(device_key(resolve_device(self.spec.hardware.device)))
        held = holders(gate.paths)
        if held:
            self.progress.say(f"  {waits_notice(what, gate.paths, ', '.join(held))}")

    def _watch_other_drivers(self) -> None:
        """The rest of the budget runs in other drivers: wait, and take back any trial whose driver stops. (This
        driver ended here, and a driver killed while it ran a trial left it RUNNING for good: the study ended a
        trial short of n_trials, with nobody left to see it.)"""
        if not self.watching:
            self.watching = True
            self.progress.say("the rest of the budget is running in other drivers: waiting for them, to take back "
                              "any trial whose driver stops")
        time.sleep(WATCH_S)
        if self._recover_stale():
            self.watching = False

    def _recover_stale(self) -> list[int]:
        """Take back the trials of drivers that stopped (see storage.stale_trials); their numbers."""

        def recover() -> list[int]:
            # Not through an outage, nor within GRACE_S after one: the other drivers could not beat through it
            # either (a live one's trial was taken back, trained again, and its driver stopped at its result). Asked
            # at each try: the outage is usually met by this very call, and its retry ran at once when it passed.
            back_at = self.outage.back_at
            if self.outage.lost_since is not None or (back_at is not None and
                                                      time.monotonic() - back_at < GRACE_S + HEARTBEAT_S):
                return []
            return recover_stale_trials(self.study)

        requeued = self.db("recover stale trials", recover)
        if requeued:
            self.progress.say(f"taken back from a stopped driver: trial(s) {', '.join(map(str, requeued))}")
        return requeued

    def _sampler(self) -> Any:
        """The function from an Optuna trial to an architecture; a space whose engine choices the device decides is
        settled first (dsnas.engine_offer), once, where the trials run."""
        spec = self.spec
        if spec.space.file is None:
            return arch_sampler(None, spec.space.callable, spec.base_dir)
        space = load_space_file(spec.space.file)
        if space.by_device:
            # Decided once per study: a driver started beside the one probing waits, then takes its offer (each
            # sampling from an offer of its own failed the other's trials, whose options then differed).
            with study_lock(self.study, spec.storage):
                space = self.db("settle the engine choices", settle, space, spec, self.study,
                                int(self.task_arch.get("context", 1)), self._call_waiting, self.progress.say)
        changed = space.changed_options(self.db("read the stored parameters", self._stored_options))
        if changed is not None:  # before any trial: Optuna would fail each one that asks with the new options
            key, name, was, now = changed
            raise DsnasError(f"{spec.space.file}: [{key}] the stored study {spec.name!r} sampled {name} from "
                             f"{list(was)}, the file now offers {list(now)}; Optuna keeps a parameter's options for "
                             f"the life of a study. Fix: restore {key.rsplit('.', 1)[-1]} = {list(was)}, or give the "
                             f"study a new [study] name in {spec.path}")
        if isinstance(self.study.sampler, DsnasSampler):
            self.study.sampler.bind(self._problem(space))
        return space.sample

    def _stored_options(self) -> dict[str, tuple[Any, ...]]:
        """Each parameter the study's trials sampled, with the options it was sampled from (the first seen)."""
        stored: dict[str, tuple[Any, ...]] = {}
        for trial in self.study.get_trials(deepcopy=False):
            for name, distribution in trial.distributions.items():
                if name not in stored and hasattr(distribution, "choices"):
                    stored[name] = tuple(distribution.choices)
        return stored

    def _problem(self, space: Any) -> Problem:
        """What dsnas's sampler needs: the space's parameters, and the figures the task knows before training."""
        hardware = getattr(self.task, "hardware", None)
        objectives = [(o.metric, o.direction) for o in self.spec.objectives]
        limits = dict(self.spec.hardware.constraints.items())
        figures = dict.fromkeys([*(metric for metric, _ in objectives), *limits])
        return Problem(parameters=space.parameters(), used=space.used,
                       arch_of=lambda params: {**space.arch_of(params), **self.task_arch},
                       objectives=objectives, limits=limits, known=hardware if callable(hardware) else None,
                       untrained=tuple(metric for metric in figures if metric not in TRAINED),
                       budget=self.spec.budget.n_trials)

    def _say_long_waits(self) -> None:
        """A trial of a Ray worker kept waiting for its device's measurement gate (others measure there) is said
        once the wait lasts WAIT_SAY_S, at most once a minute: behind other studies' measurements one waited ten
        minutes, the search silent. (A local trial runs in this process, and its worker says so itself.)"""
        now = time.monotonic()
        for number, clock in self.clocks.items():
            if clock.waiting_since is not None and now - clock.waiting_since >= WAIT_SAY_S and \
                    (clock.said_at is None or now - clock.said_at >= 60.0):
                clock.said_at = now
                self.progress.say(f"  trial {number} has waited {now - clock.waiting_since:.0f} s for its device's "
                                  "measurement gate: other trials or dsnas processes measure there (waits do not "
                                  "count toward trial_timeout_s)")

    def _stop_overdue(self) -> None:
        """Fail the trials that ran past trial_timeout_s; the executor kills their workers."""
        now, limit = time.monotonic(), self.spec.budget.trial_timeout_s
        if limit is None:
            return
        for number in [n for n, clock in self.clocks.items() if n in self.running and clock.ran_s(now) > limit]:
            with self.guard.writing(), self._unless_taken_back(number):  # (this driver was paused past GRACE_S)
                self.executor.cancel(number)
                self._fail(self.running[number], f"ran longer than trial_timeout_s = {limit:g} s (not counting "
                                                 "time queued or waiting for another trial); its worker was stopped")

    def _on_clock(self, event: Any) -> None:
        """A worker's clock event: its trial started, or waits for another trial, or runs again."""
        clock = self.clocks.get(event.trial)
        if clock is not None:
            clock.tell(event, time.monotonic())

    @property
    def executor(self) -> BaseExecutor:
        if self._executor is None:
            self._executor = make_executor(self.spec, self.trial_fn, self._on_rung if self.rungs else None,
                                           self._on_clock)
            self.guard.reroute()  # starting Ray replaced the guard's SIGTERM handler with its own
        return self._executor

    def _computing(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run holding this node's CPU measurement gate, as a training trial holds it: the sampler's model
        takes about a second of a core a proposal (its proposals took 7.5 s of a 90 s quickstart, 18 s before
        space.used remembered its names), and a trial timed beside it on this node's CPUs runs slow, by more than
        others' CPU share shows on 2 cores. Each call holds it, not a wait for the database between calls.
        A study measured on a GPU takes none: its gate is the GPU's, which the driver leaves to the workers."""
        if self._cpu_gate is None:
            device = self.spec.hardware.device
            on_cpu = device == "cpu" or (device == "auto" and not has_cuda())
            # Its waits said as a trial's are (the search printed nothing for up to a minute a candidate, waiting
            # for another process's measurement to sample and screen it).
            self._cpu_gate = MeasureGate(device_key(resolve_device("cpu")), announce="the driver (to sample or screen "
                                         "a candidate)", say_after_s=WAIT_SAY_S) if on_cpu else False

        def run(*args: Any, **kwargs: Any) -> Any:
            if not self._cpu_gate:
                return fn(*args, **kwargs)
            # Another study's trial may hold the gate for minutes: Ctrl-C or SIGTERM must not wait for it. The
            # trial being dispatched is already running (close() fails it), and nothing is written meanwhile. Nor
            # may a trial that hangs holding it (or one queued to measure behind that one) keep the driver from
            # stopping it at trial_timeout_s: past GATE_PATIENCE_S the driver computes without the gate (a
            # measurement it disturbs says so, and is taken again).
            with self.guard.waiting(), self._cpu_gate.shared(GATE_PATIENCE_S), self.guard.writing():
                return fn(*args, **kwargs)
        return run

    def _check_same_data(self) -> None:
        """Refuse to resume a study whose task's data changed since its trials trained (a class folder added, a
        corpus edited): the [task] keys are the same, so nothing else stops it, and the new trials would share a
        front, a rung's cutoff and reused results with trials of other data."""
        from optuna.trial import TrialState

        trained = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        recorded = next((t.user_attrs["profile"]["task"] for t in reversed(trained)
                         if isinstance(t.user_attrs.get("profile"), dict)
                         and isinstance(t.user_attrs["profile"].get("task"), dict)), None)
        if recorded is None:
            return
        now = self.data
        differs = data_differs(recorded, now)
        otherwise = getattr(self.task, "read_otherwise", 0)
        if differs and "folder_reader" in now and "folder_reader" not in recorded and otherwise:
            raise DsnasError(f"{self.spec.path}: [task] the stored trials were searched by an older dsnas, which read "
                             "no images in the class folders' sub-folders and read hidden ones; this one reads "
                             f"{otherwise} of the folder's images otherwise ({', '.join(differs)} differ), so its "
                             "trials would not train on the same images. Fix: give the study a new [study] name")
        if differs == ["val_windows"] and "val_windows" not in recorded:
            # The same text: restoring the data cannot help, as the error below would say.
            raise DsnasError(f"{self.spec.path}: [task] the stored trials were scored by an older dsnas on "
                             "overlapping windows of the validation split (shorter than val_tokens); this one "
                             f"scores each byte once ({now['val_windows']} windows), so its accuracies would not "
                             "compare with theirs. Fix: give the study a new [study] name")
        if differs:
            key = differs[0]
            raise DsnasError(f"{self.spec.path}: [task] the data differs from what the stored trials trained on "
                             f"({', '.join(differs)}; {key} was {_short(recorded.get(key))}, now "
                             f"{_short(now.get(key))}). Fix: restore the data, or give the study a new [study] name")

    def db(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a storage operation, run through a database outage (see storage.OutageRetry)."""
        survived = len(self.outage.outages_s)
        result = self.outage.call(what, fn, *args, **kwargs)
        if len(self.outage.outages_s) > survived:
            # Time spent waiting for the database is not the trials' time: their results may have waited too.
            for clock in self.clocks.values():
                clock.waited_s += self.outage.outages_s[-1]
        return result

    def count(self, *states: Any) -> int:
        """Trials of the study in these states, whichever driver runs them: the budget is the study's."""
        return len(self.study.get_trials(deepcopy=False, states=states))

    def budget_used(self) -> tuple[int, int]:
        """(trials that count toward n_trials, how many of them were pruned): COMPLETE trials, and PRUNED ones
        stopped at a rung; a candidate the predictor skipped, or a repeat answered from an earlier trial, was not
        evaluated again and does not count."""
        from optuna.trial import TrialState

        counted = self.budget.read(self.study)
        if counted is not None:
            return counted["trained"] + counted["pruned"], counted["pruned"]
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        pruned = sum(t.state == TrialState.PRUNED and t.user_attrs.get("pruned_by") != "predictor" for t in trials)
        trained = sum(t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs for t in trials)
        return trained + pruned, pruned

    def _stop_reason(self, read_budget: bool = True) -> str | None:
        """Why the search stops now, if it does; ``read_budget=False`` leaves out the one reason that reads the
        study."""
        budget, n_trials = self.spec.budget, self.spec.budget.n_trials
        counted = read_budget and n_trials is not None
        done, pruned = self.db("read the study", self.budget_used) if counted else (0, 0)
        if counted and done >= n_trials:
            # The study's count: drivers side by side may pass the budget by the trials they ran at once.
            return f"{done} trials completed" + (f" or pruned ({pruned} pruned)" if pruned else "")
        if getattr(self.study, "_stop_flag", False):
            return "a callback (or the sampler, out of candidates) called study.stop()"
        if self.reuses_in_a_row >= MAX_REUSES_IN_A_ROW:
            return (f"the sampler proposed {self.reuses_in_a_row} candidates in a row that were already evaluated: "
                    "the space is (nearly) exhausted; widen it in a new study ([study] name), or set [budget] "
                    "repeats = \"retrain\"")
        if self.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
            return (f"the predictor skipped {self.skips_in_a_row} candidates in a row as over the hardware limits: "
                    "loosen [hardware.constraints], or check the predictor with `dsnas predictor`")
        if budget.timeout_s is not None and time.monotonic() - self.started >= budget.timeout_s:
            return f"the timeout of {budget.timeout_s:g} s passed"
        max_failures = budget.max_failures
        if self.progress.failed > max_failures:
            return f"{self.progress.failed} trials failed (max_failures = {max_failures})"
        return None

    def _room(self) -> bool:
        """Whether the budget has room for one more trial, counting the trials every driver is running."""
        from optuna.trial import TrialState

        n_trials = self.spec.budget.n_trials
        if n_trials is None:
            return True
        counted = self.budget.read(self.study)
        if counted is not None:  # one query for all three
            return counted["trained"] + counted["pruned"] + counted["running"] < n_trials
        return self.budget_used()[0] + self.count(TrialState.RUNNING) < n_trials

    def _dispatch(self) -> bool:
        """Start one trial; False when the budget had no room left once the study was locked."""
        if self._sample is None:
            self._sample = self._sampler()
        trial = self.db("start a trial", self._take_place)
        if trial is None:
            return False
        self.running[trial.number] = trial  # from here on, an interrupt fails it (see close)
        try:
            # Sampling again after a lost connection is harmless: a parameter stored once is returned as stored.
            arch = {**self.db(f"sample trial {trial.number}", self._computing(self._sample), trial), **self.task_arch}
            if arch.get("family") or not runs_own_trials(self.task):  # an evaluate_arch task needs no family
                validate(arch, self.spec.base_dir)
            short = describe(arch, tuple(self.task_arch), self.spec.base_dir)  # a user's describe() may raise too
        except StorageLost:
            raise
        except Exception as e:  # a space that cannot produce a valid candidate fails this trial only
            self._fail(trial, f"the search space gave no valid architecture: {type(e).__name__}: {e}")
            return True
        key = entry_key(arch=arch, task=[self.spec.task.name, self.spec.task.params], engine=asdict(self.spec.engine),
                        hardware={k: v for k, v in asdict(self.spec.hardware).items() if k != "constraints"})
        original = self._original(key) if self.spec.budget.repeats == "reuse" else None
        if original is not None:
            self._reuse(trial, arch, short, key, original)
            return True
        twin = self._twin_or_claim(trial, key) if self.spec.budget.repeats == "reuse" else None
        if twin is not None:  # the same candidate trains now: this one waits for its result (see _answer_twins)
            self.twins[trial.number] = (twin, arch, short, key)
            where = "another driver is running" if twin in self.foreign else "is running"
            self.progress.say(f"  trial {trial.number} is trial {twin} again, which {where}: it waits for its result")
            return True
        self._start(trial, arch, short, key)
        return True

    def _twin(self, key: str) -> int | None:
        """A trial training the candidate of this evaluation key now (Optuna's samplers propose a running candidate
        again: with two workers, one was trained twice at once, and listed twice on the front): this driver's, or
        where other drivers may run trials (a database), one of theirs (two drivers trained it at once too)."""
        from optuna.trial import TrialState

        mine = next((n for n, k in self.keys.items() if k == key and n in self.running and n not in self.twins), None)
        if mine is not None or not has_heartbeats(self.study._storage):
            return mine
        # A started trial has its key stored (see _start); one that waits for a twin has none, so never two wait
        # for each other.
        running = self.db("read the study", self.study.get_trials, deepcopy=False, states=(TrialState.RUNNING,))
        theirs = next((t for t in running if t.number not in self.running
                       and t.user_attrs.get("evaluation_key") == key), None)
        if theirs is None:
            return None
        self.foreign[theirs.number] = theirs._trial_id
        self._foreign_running[1].add(theirs.number)
        return theirs.number

    def _twin_or_claim(self, trial: Any, key: str) -> int | None:
        """The trial that trains this candidate now (see _twin), or None once ``trial`` has claimed it: its key
        stored under the study's lock, where other drivers may look (else the key was stored only after screening,
        which waits for the CPU gate up to 30 s, and two drivers both trained the candidate)."""
        if not has_heartbeats(self.study._storage):
            return self._twin(key)  # one driver: its own running trials say it all

        def claim() -> int | None:
            with study_lock(self.study, self.spec.storage):
                twin = self._twin(key)
                if twin is None:
                    set_user_attrs(trial, {"evaluation_key": key})
                return twin

        return self.db(f"claim trial {trial.number}'s candidate", claim)

    def _still_running_elsewhere(self) -> set[int]:
        """Which of the twins other drivers train still run, as the study says (read every WATCH_S): a stopped
        driver's is taken back first (as _watch_other_drivers does), so that the trial here trains it."""
        from optuna.trial import TrialState

        read_at, running = self._foreign_running
        if time.monotonic() - read_at < WATCH_S:
            return running
        self._recover_stale()
        ids = set(self.foreign.values())
        stored = self.db("read the study", self.study.get_trials, deepcopy=False, states=(TrialState.RUNNING,))
        running = {t.number for t in stored if t._trial_id in ids}
        self._foreign_running = (time.monotonic(), running)
        return running

    def _answer_twins(self) -> None:
        """The trials that waited for a running twin, once it ended: a repeat of its result where it completed,
        else (failed, stopped at a rung, interrupted) trained themselves, unless the search stops (the timeout
        passed): then they are failed and queued again, as an interrupted trial is."""
        elsewhere = self._still_running_elsewhere() if self.foreign else set()
        for number, (twin, arch, short, key) in list(self.twins.items()):
            if twin in self.running:
                continue
            # Another driver may have taken this trial back while it waited (this driver paused past GRACE_S).
            with self._unless_taken_back(number):
                if twin in elsewhere:  # nothing runs here for it: once the search stops, waiting on would outlast it
                    stop = self._stop_reason(read_budget=False)
                    if stop is not None:
                        del self.twins[number]
                        self._stop_waiting(number, twin, stop)
                    continue
                del self.twins[number]
                original = self._original(key)
                again = self._twin_or_claim(self.running[number], key) if original is None else None
                stop = None if original is not None or again is not None else self._stop_reason(read_budget=False)
                if original is not None:
                    self._reuse(self.running[number], arch, short, key, original)
                elif again is not None:  # another trial that waited for the same one trains it now: wait for it
                    self.twins[number] = (again, arch, short, key)
                elif stop is not None:  # no new training once the search stops ("no new trial starts")
                    self._stop_waiting(number, twin, stop)
                else:
                    self._start(self.running[number], arch, short, key)
        waited_for = {twin for twin, *_ in self.twins.values()}
        self.foreign = {n: i for n, i in self.foreign.items() if n in waited_for}

    def _stop_waiting(self, number: int, twin: int, stop: str) -> None:
        """A trial that waited for its twin, as the search stops: failed and queued again, as an interrupted trial
        is, and not counted as a failure (it never ran)."""
        trial = self.running[number]
        self._fail(trial, f"the search stopped ({stop}) while the trial waited for trial {twin}; queued again",
                   counts=False)
        with self.guard.writing():
            self._requeue(trial)

    def _start(self, trial: Any, arch: dict[str, Any], short: str, key: str) -> None:
        """Screen a sampled candidate, then submit it to the executor."""
        from dsnas import tables  # SQLAlchemy loads on first use

        self.reuses_in_a_row = 0
        verdict = self.db("screen the candidate", self._computing(self.screen.judge), arch)
        if verdict is not None and verdict.skip:
            self._skip(trial, arch, short, verdict)
            return
        self.skips_in_a_row = 0
        # Recorded, and kept by a trial queued again: a killed and resumed study trains a candidate with the seed the
        # uninterrupted one would have (the new trial number gave another: 0.4319 where it scored 0.4197).
        seed = int(trial.user_attrs.get("train_seed", self.spec.seed + trial.number))
        attrs = {"arch": arch, "arch_short": short, "evaluation_key": key, "train_seed": seed}
        self.keys[trial.number] = key
        if verdict is not None and verdict.predicted:
            self.predictions[trial.number] = verdict.predicted
            attrs.update({f"predicted.{m}": v for m, v in verdict.predicted.items()})
        rungs = None
        if self.rungs is not None:
            # Kept by a trial queued again (see storage.requeue), as its seed is; one of another plan's brackets not.
            kept = trial.user_attrs.get("bracket")
            bracket = kept if isinstance(kept, int) and 0 <= kept < self.rungs.plan.brackets else \
                self.rungs.plan.bracket_of(trial.number)
            self.brackets[trial.number] = attrs["bracket"] = bracket
            rungs = self.rungs.plan.fractions(attrs["bracket"])
        self.db(f"store trial {trial.number}", self._set_attrs, trial, attrs)
        # The same model measured before:
        cached = self.db("read the measurement cache", tables.cached_figures, storage_engine(self.study), arch)
        self.executor.submit(TrialRequest(trial.number, arch, self.spec.task, self.spec.hardware,
                                         seed=seed, cached=cached, engine=self.spec.engine,
                                         rungs=rungs, task_fingerprint=self.data, run=self.run_id))
        self.clocks[trial.number] = TrialClock()  # runs from its worker's "started"
        self.progress.started(trial.number, short, self.running)

    def _original(self, key: str) -> int | None:
        """The completed trial that trained this evaluation key (the architecture under this study's task, training
        budget, engine and measurement settings), if any; indexed from the study, then kept up to date with this
        driver's trials, and read again on a miss where other drivers may be storing trials (a database): two
        drivers trained 24 trials of 19 candidates, each missing what the other had completed."""
        from optuna.trial import TrialState

        if self._evaluated is None or (key not in self._evaluated and has_heartbeats(self.study._storage)):
            done = self.db("read the study", self.study.get_trials, deepcopy=False, states=(TrialState.COMPLETE,))
            self._evaluated = {t.user_attrs["evaluation_key"]: t.number for t in done
                               if "evaluation_key" in t.user_attrs and "reused_from" not in t.user_attrs}
        return self._evaluated.get(key)

    def _reuse(self, trial: Any, arch: dict[str, Any], short: str, key: str, original: int) -> None:
        """A repeat: COMPLETE with the original's values and figures (so the sampler learns them again), marked
        ``reused_from``; nothing trained or measured, no weights of its own (export takes the original's)."""
        frozen = self.db("read the study", self.study.get_trials, deepcopy=False)[original]
        # Its figures, not its work: the seconds it trained and measured, and the predictor's check of it, were the
        # original's (counted again, the repeats doubled a search's compute and weighted the predictor's record).
        figures = {k: v for k, v in frozen.user_attrs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not own_work(k) and k not in OWN_RUN}

        def store() -> None:
            self._set_attrs(trial, {**figures, "arch": arch, "arch_short": short, "evaluation_key": key,
                                    "reused_from": original})
            for metric, limit in self.spec.hardware.constraints.items():
                if metric in figures:
                    trial.set_constraint(f"max_{metric}", figures[metric] - limit)

        self.db(f"store trial {trial.number}", store)
        self._tell(trial, list(frozen.values))
        del self.running[trial.number]
        self.reuses_in_a_row += 1
        self.progress.reused_trial(trial.number, original, short, self.running)

    def _skip(self, trial: Any, arch: dict[str, Any], short: str, verdict: Any) -> None:
        """A candidate predicted over a hardware limit: PRUNED without training, with the prediction as its
        constraint values (so that the sampler learns where the limits are)."""
        from optuna.trial import TrialState

        attrs = {"arch": arch, "arch_short": short, "pruned_by": "predictor", "pruned_reason": verdict.reason,
                 **{f"predicted.{m}": v for m, v in verdict.predicted.items()}}

        def store() -> None:
            self._set_attrs(trial, attrs)
            for metric, limit in self.spec.hardware.constraints.items():
                if metric in verdict.predicted:
                    trial.set_constraint(f"max_{metric}", verdict.predicted[metric] - limit)

        self.db(f"store trial {trial.number}", store)
        self._tell(trial, state=TrialState.PRUNED)
        del self.running[trial.number]
        self.skips_in_a_row += 1
        self.progress.skipped_trial(trial.number, short, verdict.reason, self.running)

    def _on_rung(self, report: Any) -> bool:
        """A trial at a rung (called by the executor, on this thread): store its figures, decide, answer."""
        trial = self.running.get(report.trial)
        if trial is None:
            return False  # stopped meanwhile (past its time limit, interrupted)
        with self.guard.writing(), self._unless_taken_back(report.trial):
            return self._decide_rung(trial, report)
        return False  # taken back by another driver: this one's worker stops

    def _decide_rung(self, trial: Any, report: Any) -> bool:
        bracket = self.brackets.get(report.trial, 0)
        peers = None
        if report.rung > 0:
            peers = self.db("read the rungs", self.rungs.peers, self.study, bracket, report.rung, report.trial)
        decision = self.rungs.decide(report, peers)
        attrs = self.rungs.attrs(report, decision)
        if report.rung == 0:
            attrs.update(self._observe(report.trial, report.metrics))
        self.db(f"store trial {report.trial}'s rung {report.rung}", self._set_attrs, trial, attrs)
        if not decision.go:
            self.stopped[report.trial] = decision.reason
        return decision.go

    def _observe(self, number: int, metrics: dict[str, float]) -> dict[str, float]:
        """A trial's first real measurement, checked against what the screen predicted for it."""
        attrs, said = self.screen.observe(number, self.predictions.pop(number, {}), metrics)
        if said:
            self.progress.say(f"  trial {number}: {said}")
        return attrs

    def _take_place(self) -> Any:
        """Check the budget and take a trial, under the study's lock (two drivers never both take the last
        place); None when there is no room. Run again after a lost connection, it first looks for the trial the
        failed try may have created (its answer lost on the way back) rather than leave it RUNNING forever."""
        with study_lock(self.study, self.spec.storage):
            trial = self._orphan() if self.outage.retrying else None
            if trial is None:
                if not self._room():
                    return None
                trial = self.study.ask()
            set_user_attrs(trial, {"driver": self.identity})  # under the lock: a RUNNING trial without it is an orphan
        if has_heartbeats(self.study._storage):
            # A first beat at once: a trial without one is never stale to Optuna, and this driver paused (Ctrl-Z)
            # before its heartbeat thread's next beat left the others waiting on it for as long as it was paused.
            self.study._storage.record_heartbeat(trial._trial_id)
        return trial

    def _orphan(self) -> Any:
        """A RUNNING trial that nobody runs: no driver recorded, or this driver but not running here."""
        import optuna
        from optuna.trial import TrialState

        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            driver = frozen.user_attrs.get("driver")
            if frozen.number not in self.running and (not driver or driver == self.identity):
                return optuna.trial.Trial(self.study, frozen._trial_id)  # what study.ask() returns
        return None

    @staticmethod
    def _set_attrs(trial: Any, attrs: dict[str, Any]) -> None:
        set_user_attrs(trial, attrs)  # one transaction, not one commit per figure

    def _tell(self, trial: Any, values: list[float] | None = None, state: Any = None) -> None:
        """Finish a trial; told again after a lost connection, a trial the first try finished is left as it is.
        Then the callbacks, with the trial as stored."""
        with self._optimize_loop():  # a sampler's after_trial may call study.stop() (GridSampler, exhausted)
            stored = self.db(f"store trial {trial.number}", lambda: self.study.tell(
                trial, values, state=state, skip_if_finished=self.outage.retrying))
        self.keys.pop(trial.number, None)
        if self.callbacks:
            self._call_back(stored)  # tell returns the trial as stored (read back after the write)

    def _call_back(self, frozen: Any) -> None:
        """Each callback, as Optuna's optimize() calls it; one that raises is reported and the search goes on (a
        logging service being down must not cost the study). A callback may call ``study.stop()``, as in optimize():
        the search then stops once the running trials finish."""
        with self._optimize_loop():
            for callback in self.callbacks:
                try:
                    callback(self.study, frozen)
                except Exception as e:
                    name = getattr(callback, "__qualname__", type(callback).__name__)
                    self.progress.say(f"  callback {name} raised {type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200]} (trial {frozen.number}); the search goes on",
                                      logging.WARNING)

    @contextmanager
    def _optimize_loop(self) -> Iterator[None]:
        """Inside, Optuna's study.stop() may be called (what it checks): the driver's loop is the optimize loop."""
        local = self.study._thread_local
        local.in_optimize_loop = True
        try:
            yield
        finally:
            local.in_optimize_loop = False

    def _record(self, trial: Any, outcome: TrialResult | BaseException) -> None:
        from dsnas import tables  # SQLAlchemy loads on first use

        if isinstance(outcome, BaseException):
            reason = f"{type(outcome).__name__}: {outcome}"
            deaths = int(trial.user_attrs.get("worker_deaths", 0))  # not interrupts: they used up no retry
            if self.executor.lost_worker(outcome) and deaths < self.spec.budget.retries:
                self._fail(trial, f"its worker died ({reason}); queued again (retries = {self.spec.budget.retries})")
                self._requeue(trial, worker_death=True)
            else:
                self._fail(trial, reason)
            return
        if outcome.pruned is not None:
            self._record_pruned(trial, outcome)
            return
        metrics = outcome.metrics
        missing = [o.metric for o in self.spec.objectives if o.metric not in metrics]
        missing += [m for m, _ in self.spec.hardware.constraints.items() if m not in metrics]
        if missing:
            why = outcome.profile.get("memory_unavailable", "the worker did not report them")
            needs = [f"objective {o.name} needs {o.metric!r}" for o in self.spec.objectives if o.metric in missing]
            needs += [f"limit max_{m} needs {m!r}" for m, _ in self.spec.hardware.constraints.items() if m in missing]
            self._fail(trial, f"no measurement of {missing} ({why}): {'; '.join(needs)} among the trial's metrics")
            return
        unfit = _unfit(metrics, self.spec.objectives)
        if unfit:
            self._fail(trial, unfit)
            return
        self.recording = trial.number
        feasible = all(metrics[m] <= limit for m, limit in self.spec.hardware.constraints.items())
        # With rungs, the measurement was checked against the screen's prediction at rung 0.
        observed = self._observe(trial.number, metrics) if self.rungs is None else {}
        self.db(f"store trial {trial.number}", self._store_figures, trial, outcome, feasible, observed)
        self._store_artifacts(trial, outcome)
        values = [metrics[o.metric] for o in self.spec.objectives]
        key = self.keys.get(trial.number)  # kept at dispatch: trial.user_attrs would read the storage again
        self._tell(trial, values)
        if self._evaluated is not None and key is not None:
            self._evaluated.setdefault(key, trial.number)
        # Told, the trial is finished: nothing after this may fail it, and a measurement row lost from here on is
        # written again from its stored profile by the next run's backfill.
        del self.running[trial.number]
        self.clocks.pop(trial.number, None)
        self.recording = None
        self.db(f"store trial {trial.number}'s measurements", tables.record_measurements, storage_engine(self.study),
                self.spec.name, trial.number, outcome.profile, metrics, arch=trial.user_attrs["arch"])
        self.progress.finished(trial.number, values, feasible, self.running,
                               over_limits(metrics, self.spec.hardware.constraints))

    def _record_pruned(self, trial: Any, outcome: TrialResult) -> None:
        """A trial the driver stopped at a rung: its measurement is kept (for the cache and the predictor), its
        state is PRUNED, and no accuracy is recorded as if it were a finished trial's."""
        from optuna.trial import TrialState

        from dsnas import tables  # SQLAlchemy loads on first use

        self.recording = trial.number
        self.db(f"store trial {trial.number}", self._store_figures, trial, outcome, None)
        self._store_artifacts(trial, outcome)
        self._tell(trial, state=TrialState.PRUNED)
        del self.running[trial.number]  # finished: see _record
        self.clocks.pop(trial.number, None)
        self.recording = None
        if outcome.profile.get("batches"):
            self.db(f"store trial {trial.number}'s measurements", tables.record_measurements,
                    storage_engine(self.study), self.spec.name, trial.number, outcome.profile, outcome.metrics,
                    arch=trial.user_attrs["arch"])
        reason = self.stopped.pop(trial.number, "stopped at a rung")
        self.progress.pruned_trial(trial.number, outcome.pruned.rung, outcome.pruned.fraction, reason, self.running)

    def _store_figures(self, trial: Any, outcome: TrialResult, feasible: bool | None,
                       observed: dict[str, Any] | None = None) -> None:
        """Metrics, profile, constraints and the screen's check (``observed``) as the trial's attributes, in one
        transaction (written again after a lost connection)."""
        attrs = {**outcome.metrics, "profile": outcome.profile, **(observed or {})}
        if feasible is not None:
            attrs["feasible"] = float(feasible)
        # Feasible when <= 0; a pruned trial's are there when it was measured.
        constraints = {f"max_{metric}": outcome.metrics[metric] - limit
                       for metric, limit in self.spec.hardware.constraints.items() if metric in outcome.metrics}
        set_user_attrs(trial, attrs, constraints)

    def _store_artifacts(self, trial: Any, outcome: TrialResult) -> None:
        """Weights and probe (safetensors), and the architecture and profile (JSON) that the dashboard shows."""
        from optuna.artifacts import upload_artifact

        files: dict[str, bytes | None] = {"weights": outcome.weights, "probe": outcome.probe}
        if self.spec.json_artifacts:  # copies of two trial attributes, as files the dashboard's artifact view shows
            files.update(arch=json.dumps(trial.user_attrs["arch"], indent=2).encode(),
                         profile=json.dumps(outcome.profile, indent=2).encode())
        if all(data is None for data in files.values()):
            return  # a task that returns no weights (a table's lookups): no artifact folder either
        self.artifacts = self.artifacts or artifact_store(self.spec)

        def upload(path: Path, name: str) -> None:
            trial.set_user_attr(f"{name}_artifact", upload_artifact(
                artifact_store=self.artifacts, file_path=str(path), study_or_trial=trial))

        # Staged beside the artifacts (the store copies the file in), not in the temp folder: a small or full /tmp
        # stopped the search with a traceback after the trial had trained, though the study's folder had room.
        # Named after this process: one a driver killed (kill -9) left holds a copy of the weights for good, and the
        # next upload removes it once that process is gone.
        folder = artifact_dir(self.spec)
        for abandoned in folder.glob(".staging-*"):
            if abandoned.is_dir() and tag_gone(abandoned.name.removeprefix(".staging-")):
                shutil.rmtree(abandoned, ignore_errors=True)
        tmp = folder / f".staging-{process_tag()}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                if data is not None:
                    suffix = "json" if name in ("arch", "profile") else "safetensors"
                    path = tmp / f"trial{trial.number}-{name}.{suffix}"
                    path.write_bytes(data)
                    # Uploaded again after a lost connection, the first try's file may stay behind, unreferenced.
                    self.db(f"store trial {trial.number}'s {name}", upload, path, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fail(self, trial: Any, reason: str, counts: bool = True) -> None:
        """``counts``: toward max_failures and the stop line's failures (a trial that never ran does not)."""
        from optuna.trial import TrialState

        with self.guard.writing():
            self.db(f"store trial {trial.number}", trial.set_user_attr, "fail_reason", reason[:2000])
            self._tell(trial, state=TrialState.FAIL)
        del self.running[trial.number]
        self.clocks.pop(trial.number, None)
        self.stopped.pop(trial.number, None)
        self.progress.failed_trial(trial.number, reason, self.running, counts)

    def _requeue(self, trial: Any, worker_death: bool = False) -> None:
        """Queue a failed trial again from its stored form (the live trial's cache may lack its seed), with the
        seed it was to train with where it failed before storing one; ``worker_death`` counts toward retries."""
        stored = self.db(f"read trial {trial.number}", self.study._storage.get_trial, trial._trial_id)
        bracket = self.rungs.plan.bracket_of(trial.number) if self.rungs is not None else None
        self.db(f"queue trial {trial.number} again", requeue, self.study, stored, self.spec.seed + trial.number,
                worker_death, bracket)

    def _heartbeats(self) -> None:
        storage = self.study._storage
        if not has_heartbeats(storage):
            return
        while not self._beat_stop.wait(HEARTBEAT_S / 2):
            for trial in list(self.running.values()):
                try:
                    storage.record_heartbeat(trial._trial_id)
                except Exception as e:
                    if not connection_lost(e):
                        raise
                    break  # the main thread reports the outage when it next writes; beat again when it is over

    def lost_message(self, lost: StorageLost) -> str:
        """One line: the database is gone, what that cost (the results not stored), and what to do."""
        cut = [n for n in self.running if n != self.recording]
        cost = [f"the result of trial {self.recording}, which had finished"] if self.recording in self.running else []
        if cut:
            cost.append(f"trial{'s' * (len(cut) > 1)} {', '.join(map(str, cut))}, which "
                        f"{'were' if len(cut) > 1 else 'was'} running (stopped)")
        them = "them" if len(self.running) > 1 else "it"
        lost_part = (f"not stored: {' and '.join(cost)}; {'they stay' if them == 'them' else 'it stays'} RUNNING in "
                     f"the study, and the next `dsnas search` marks {them} FAIL and runs {them} again") if cost \
            else "no trial was running"
        return (f"{lost.summary}; the search stopped, {lost_part}; trials stored before are intact. Fix: start the "
                "database server or repair the network, then run the same command to resume; to wait longer, "
                "raise [budget] storage_outage_s")

    def close(self) -> None:
        """Stop the heartbeats and the executor's work; fail what was running (interrupted) and queue it again
        with its parameters and seed, as a killed driver's trial is, so that the resumed study trains the candidates
        the uninterrupted one would have; unless the database is gone (then it stays RUNNING, and the next run
        re-queues it)."""
        self._beat_stop.set()
        try:
            if self._executor is not None:
                self._executor.cancel_all()
        finally:
            for trial in list(self.running.values()) if self.outage.given_up is None else []:
                # Queued again first, both in one guarded write (a Ctrl-C waits for the two): a requeue refused after
                # the trial was marked FAIL (a full disk; a second Ctrl-C, raised as the FAIL was written) left it FAIL
                # "queued again" with no copy queued, and the next run did not train the candidate again. Refused
                # first, the trial stays RUNNING, and the next run takes it back; a copy queued twice is found
                # (storage.requeue).
                with self._unless_taken_back(trial.number), self.guard.writing():
                    self._requeue(trial)
                    self._fail(trial, "the search was interrupted while the trial ran; queued again")
            if self._executor is not None:
                self._executor.close()


# How a trial ran, not what it measured: a repeat that copied them was listed as queued again from the original's
# predecessor, on its attempt, with its seed and bracket (a fresh trial "requeued_from 4, attempt 5"), and a repeat
# queued again after an interrupt lost its own.
OWN_RUN = ("attempt", "requeued_from", "worker_deaths", "train_seed", "bracket", "pruned_at")


@dataclass
class TrialClock:
    """A trial's own running time, from what its worker says (dsnas.rungs.ClockEvent): the worker counts it (from
    when it started there, less its waits for another trial's measurement) and tells it at each change; between
    two, the driver adds the time since it read the last while the trial runs. Time the driver's database was out
    is taken off too (``waited_s``): the trial's result may have waited for it."""

    told_s: float | None = None  # its running time at the last event; None: not started on a worker yet
    told_at: float = 0.0  # the driver's monotonic time when it read that event
    running: bool = True
    seq: int = -1
    waited_s: float = 0.0
    waiting_since: float | None = None  # the driver's time when the wait going on was read
    said_at: float | None = None  # when a long wait was last said

    def tell(self, event: Any, now: float) -> None:
        if event.seq <= self.seq:
            return  # read after a later one (a Ray actor's calls need not run in order)
        self.seq, self.told_s, self.told_at = event.seq, event.ran_s, now
        self.running = event.event != "waiting"
        if self.running:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now

    def ran_s(self, now: float) -> float:
        """Seconds it has run itself (0 while it is queued: it has not started)."""
        if self.told_s is None:
            return 0.0
        return self.told_s + (now - self.told_at if self.running else 0.0) - self.waited_s


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:56] + "...\"" if text.endswith('"') else text[:57] + "..."


def _unfit(metrics: dict[str, float], objectives: Sequence[Any]) -> str:
    """Why a finished trial's figures cannot be stored as a result ('' when they can): Optuna would store a nan
    objective as a failed trial with no reason (and the next repeat of it stopped the driver), and an infinite one
    would take the whole front. A percentage is a scale, not an error: NAS-Bench-201's tables give accuracy so."""
    for o in objectives:
        if not math.isfinite(metrics[o.metric]):
            return (f"objective {o.name} is {metrics[o.metric]}: the task's figures must be finite numbers (a "
                    "task whose training diverged, or whose evaluate() reports nan)")
    return ""
