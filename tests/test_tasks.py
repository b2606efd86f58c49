"""The charlm task: a deterministic split that never overlaps, a fixed budget, and real learning."""

from __future__ import annotations

import torch

from dsnas.models import build
from dsnas.tasks.charlm import CharLMConfig, CharLMTask, read_corpus, stdlib_files

CPU = torch.device("cpu")


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    config = CharLMConfig(corpus_bytes=300_000)
    train, val, source = read_corpus(config, ".")
    assert (train, val) == read_corpus(config, ".")[:2]
    assert "stdlib" in source and len(train) + len(val) >= 300_000
    files = stdlib_files()
    assert all("site-packages" not in str(f) for f in files)
    assert files[9].read_bytes() in val and files[9].read_bytes() not in train


def test_user_text_file_keeps_its_last_tenth_for_validation(tmp_path):
    text = "".join(f"line {i} of my corpus\n" for i in range(2000)).encode()
    (tmp_path / "corpus.txt").write_bytes(text)
    train, val, _ = read_corpus(CharLMConfig(corpus="corpus.txt"), str(tmp_path))
    assert train + val == text and len(val) == len(text) - len(text) * 9 // 10


def test_a_short_validation_split_is_scored_once_per_byte_and_route_halves_share_none(tmp_path):
    """A 100 KB text keeps 10,000 bytes for validation: the default val_tokens was scored as 512 windows of 64
    overlapping ones, each byte about 3 times, and route's report half shared 99.9% of its bytes with calibration."""
    from dsnas.route import halves

    (tmp_path / "corpus.txt").write_bytes(bytes(range(256)) * 400)
    task = CharLMTask(CharLMConfig(corpus="corpus.txt", context=64), str(tmp_path))
    _, targets = task.eval_inputs()
    starts = task._val_starts(len(targets))
    scored = (starts[:, None] + torch.arange(1, 65)).flatten()
    assert len(targets) == (len(task.val_data) - 1) // 64 and len(set(scored.tolist())) == scored.numel()
    calibration, report = halves(len(targets))
    assert not set(scored.view(len(targets), 64)[calibration].flatten().tolist()) & \
        set(scored.view(len(targets), 64)[report].flatten().tolist())
    assert task.fingerprint()["val_windows"] == len(targets)  # another evaluation than an older dsnas's

    class Counting(torch.nn.Module):
        seen = 0

        def forward(self, x):
            self.seen += len(x)
            return torch.zeros(*x.shape, 256)

    model = Counting()
    task.evaluate(model, CPU)
    assert model.seen == len(targets)
    # where the split holds val_tokens, nothing changes
    assert "val_windows" not in CharLMTask(CharLMConfig(corpus="corpus.txt", context=64, val_tokens=4096),
                                           str(tmp_path)).fingerprint()


def test_training_on_the_budget_learns(tmp_path):
    config = CharLMConfig(corpus_bytes=200_000, context=32, batch_size=16, train_tokens=16 * 32 * 60, val_tokens=2048)
    task = CharLMTask(config, ".")
    torch.manual_seed(0)
    model = build({"family": "transformer_lm", "d_model": 32, "layers": [{"n_heads": 2, "ffn_ratio": 2}],
                   **task.arch_defaults()})
    before = task.evaluate(model, CPU)
    steps = []
    out = task.train(model, CPU, seed=0, checkpoint=lambda: steps.append(1))
    after = task.evaluate(model, CPU)
    assert out["train_steps"] == 60 == len(steps) and out["train_tokens"] == 16 * 32 * 60
    assert after["val_loss"] < before["val_loss"] - 1.0  # from ~ln(256) = 5.5 towards real byte statistics
    assert after["accuracy"] > before["accuracy"] + 0.1
    assert task.example_batch(4, CPU).shape == (4, 32)
    assert torch.equal(task.example_batch(4, CPU), task.example_batch(4, CPU))
    assert task.fingerprint()["corpus_sha256"] == CharLMTask(config, ".").fingerprint()["corpus_sha256"]


def test_training_reports_at_each_rung_and_a_rung_that_raises_stops_it():
    config = CharLMConfig(corpus_bytes=200_000, context=16, batch_size=8, train_tokens=8 * 16 * 30, val_tokens=512)
    task = CharLMTask(config, ".")
    model = build({"family": "transformer_lm", "d_model": 16, "layers": [{"n_heads": 1, "ffn_ratio": 1}],
                   **task.arch_defaults()})
    steps, seen = [], []

    def at_rung(k):
        seen.append((k, len(steps)))

    task.train(model, CPU, seed=0, checkpoint=lambda: steps.append(1), rungs=(1 / 9, 1 / 3, 1 / 3), at_rung=at_rung)
    assert seen == [(0, 4), (1, 10), (2, 10)]  # after ceil(30 / 9) and 30 / 3 steps; a repeated share twice

    class Stop(Exception):
        pass

    def stop_at_second(k):
        if k == 1:
            raise Stop
    steps.clear()
    try:
        task.train(model, CPU, seed=0, checkpoint=lambda: steps.append(1), rungs=(0.2, 0.5), at_rung=stop_at_second)
    except Stop:
        pass
    assert len(steps) == 15  # stopped after half the steps, as the rung asked


def test_a_worker_builds_the_task_again_from_the_drivers_data_or_refuses(tmp_path):
    """A task kept from an earlier search (a Ray worker of a cluster that outlived it) trained on the data as it
    was then, beside trials on the data as it is: the request carries the driver's fingerprint."""
    import pytest

    from dsnas.errors import TrialError
    from dsnas.spec import TaskSpec
    from dsnas.tasks import forget_built, make_task
    from dsnas.trial import TrialRequest
    from dsnas.worker import _task_of

    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    spec = TaskSpec("charlm", {"corpus": "text.txt", "context": 8}, str(tmp_path))
    from dsnas import tasks

    forget_built()
    kept = make_task(spec)  # built by an earlier search in this process
    corpus.write_text("the quick brown cat jumps over the lazy dog\n" * 400)
    forget_built()
    now = make_task(spec).fingerprint()  # the driver's, from the data as it is now
    tasks._built[next(iter(tasks._built))] = kept  # the worker still holds the one of the earlier search
    request = TrialRequest(0, {}, spec, None, seed=0, task_fingerprint=now)
    assert _task_of(request).fingerprint() == now and tasks._built[next(iter(tasks._built))] is not kept
    corpus.write_text("another corpus altogether, not the driver's one\n" * 400)  # this node's copy differs
    forget_built()
    with pytest.raises(TrialError, match=r"the task's data on this worker \(.*\) differs from the driver's "
                                         r"\(corpus_sha256, .*copy the study folder's data"):
        _task_of(request)
    forget_built()


def test_a_task_that_failed_its_checks_is_built_again_once_fixed(tmp_path, monkeypatch):
    """The refused task was kept: after the user fixed the factory (and reloaded it), the next search in the same
    process refused the task it had built before."""
    import importlib
    import sys

    import pytest

    from dsnas.errors import SpecError
    from dsnas.spec import TaskSpec
    from dsnas.tasks import check_task, forget_built

    monkeypatch.setattr(sys, "path", list(sys.path))
    forget_built()
    (tmp_path / "fixme_task.py").write_text(
        "class T:\n    def arch_defaults(self):\n        return {}\n")
    spec = TaskSpec("fixme_task:T", {}, str(tmp_path))
    with pytest.raises(SpecError, match="T has no fingerprint"):
        check_task("study.toml", spec)
    (tmp_path / "fixme_task.py").write_text(
        "class T:\n    def arch_defaults(self):\n        return {}\n"
        "    def fingerprint(self):\n        return {'data': 'fixed'}\n"
        "    def evaluate_arch(self, arch, **kwargs):\n        return {}\n")
    importlib.reload(sys.modules["fixme_task"])
    check_task("study.toml", spec)
    sys.modules.pop("fixme_task", None)
    forget_built()


def test_a_user_factorys_relative_path_is_read_beside_the_study_file(tmp_path, monkeypatch):
    """corpus = "data.txt" reached the factory as written: run from another folder, it read that folder's data.txt
    (trained on other data without a word) or failed on a missing file. Paths in a study file are the study
    file's; a string that names nothing there is passed as it is."""
    import sys

    from dsnas.spec import TaskSpec
    from dsnas.tasks import forget_built, make_task

    study, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    study.mkdir(), elsewhere.mkdir()
    (study / "data.txt").write_text("the study's")
    (elsewhere / "data.txt").write_text("another folder's")
    (study / "path_task.py").write_text(
        "from pathlib import Path\n"
        "class T:\n    def __init__(self, corpus, kind):\n"
        "        self.text, self.kind = Path(corpus).read_text(), kind\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(elsewhere)
    forget_built()
    try:
        task = make_task(TaskSpec("path_task:T", {"corpus": "data.txt", "kind": "plain"}, str(study)))
        assert (task.text, task.kind) == ("the study's", "plain")
    finally:
        sys.modules.pop("path_task", None)
        forget_built()


def test_two_studies_with_a_plugin_of_the_same_name_each_import_their_own(tmp_path, monkeypatch):
    """A second study in the same process whose folder has a module named as the first's ran the first one's."""
    import sys

    from dsnas.plugins import import_callable

    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "same_name_task.py").write_text(
            "import same_name_helpers\n\n\ndef which():\n    return same_name_helpers.WHICH\n")
        (tmp_path / name / "same_name_helpers.py").write_text(f"WHICH = {name!r}\n")  # its own helpers too
    try:
        assert import_callable("same_name_task:which", tmp_path / "one")() == "one"
        assert import_callable("same_name_task:which", tmp_path / "two")() == "two"
        assert import_callable("same_name_task:which", tmp_path / "one")() == "one"
        kept = sys.modules["same_name_task"]
        assert import_callable("same_name_task:which", tmp_path / "one")() == "one"
        assert sys.modules["same_name_task"] is kept  # the study's own: kept, not imported again
        # A study inside another's folder, then the outer one; and a module of the name the notebook imported itself.
        (tmp_path / "one" / "inner").mkdir()
        (tmp_path / "one" / "inner" / "same_name_helpers.py").write_text("WHICH = 'inner'\n")
        (tmp_path / "one" / "inner" / "same_name_task.py").write_text(
            "import same_name_helpers\n\n\ndef which():\n    return same_name_helpers.WHICH\n")
        assert import_callable("same_name_task:which", tmp_path / "one" / "inner")() == "inner"
        assert import_callable("same_name_task:which", tmp_path / "one")() == "one"
        (tmp_path / "notebook").mkdir()
        (tmp_path / "notebook" / "same_name_task.py").write_text("def which():\n    return 'notebook'\n")
        sys.path.insert(0, str(tmp_path / "notebook"))
        sys.modules.pop("same_name_task")
        import same_name_task  # noqa: F401  (the notebook's own, imported before the search)

        assert import_callable("same_name_task:which", tmp_path / "two")() == "two"
        # Edited between two runs (even where the notebook imported it itself): the file as it is now.
        (tmp_path / "two" / "same_name_helpers.py").write_text("WHICH = 'two, edited'\n")
        assert import_callable("same_name_task:which", tmp_path / "two")() == "two"  # within the run: as it was
        from dsnas.plugins import new_run

        new_run()
        assert import_callable("same_name_task:which", tmp_path / "two")() == "two, edited"
        (tmp_path / "two" / "__main__.py").write_text("raise SystemExit('the study folder run as a script')\n")
        main = sys.modules["__main__"]
        new_run()
        import_callable("same_name_task:which", tmp_path / "two")
        assert sys.modules["__main__"] is main  # the running program, never the folder's __main__.py
        # A study folder holding a copy of dsnas, or a module named as an installed package: those stay loaded.
        import optuna

        import dsnas

        (tmp_path / "two" / "dsnas").mkdir()
        (tmp_path / "two" / "dsnas" / "__init__.py").write_text("")
        (tmp_path / "two" / "optuna.py").write_text("")
        import_callable("same_name_task:which", tmp_path / "two")
        assert sys.modules["dsnas"] is dsnas and sys.modules["optuna"] is optuna
    finally:
        sys.modules.pop("same_name_task", None)
        sys.modules.pop("same_name_helpers", None)


def test_a_folder_of_modules_without_init_is_the_studys_own_and_a_standard_librarys_name_is_refused(
        tmp_path, monkeypatch):
    """models/net.py (no __init__.py: a namespace package) of a second study in a notebook ran the first one's; and a
    builder in code.py ran locally but failed every Ray trial (the workers had the standard library's `code`)."""
    import sys

    import pytest

    from dsnas.errors import SpecError
    from dsnas.plugins import ShadowedModule, import_callable, new_run
    from dsnas.spec import _import_callable

    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("one", "two"):
        (tmp_path / name / "ns_models").mkdir(parents=True)
        (tmp_path / name / "ns_models" / "net.py").write_text(f"def which():\n    return {name!r}\n")
    try:
        assert import_callable("ns_models.net:which", tmp_path / "one")() == "one"
        assert import_callable("ns_models.net:which", tmp_path / "two")() == "two"
        (tmp_path / "two" / "ns_models" / "net.py").write_text("def which():\n    return 'two, edited'\n")
        new_run()
        assert import_callable("ns_models.net:which", tmp_path / "two")() == "two, edited"
        # NAME.py beside a folder NAME/ of scripts: Python imports NAME.py, and it was imported again at each use.
        (tmp_path / "one" / "ns_helpers").mkdir()
        (tmp_path / "one" / "ns_helpers" / "fetch.py").write_text("")
        (tmp_path / "one" / "ns_helpers.py").write_text("def which():\n    return 'module'\n")
        first = import_callable("ns_helpers:which", tmp_path / "one")
        assert first() == "module" and import_callable("ns_helpers:which", tmp_path / "one") is first
    finally:
        for held in [n for n in sys.modules if n.split(".")[0] in ("ns_models", "ns_helpers")]:
            del sys.modules[held]
    (tmp_path / "one" / "code.py").write_text("def build(arch):\n    return None\n")
    with pytest.raises(ShadowedModule):
        import_callable("code:build", tmp_path / "one")
    with pytest.raises(SpecError, match=r"study.toml: \[task.name\] names code.py of the study's folder, which has "
                                        r"the name of Python's standard-library module 'code'.*Fix: rename code.py "
                                        r"\(e.g. to study_code.py\) and name it so in the study$"):
        _import_callable("study.toml", "task.name", "code:build", tmp_path / "one")


def test_a_toml_date_given_to_a_user_task_is_refused_with_the_fix(tmp_path, monkeypatch):
    """A date blamed the user's factory ("Object of type date is not JSON serializable ... Fix: fix the factory"),
    which never ran: the parameters are stored as JSON."""
    import datetime
    import sys

    import pytest

    from dsnas.errors import SpecError
    from dsnas.spec import TaskSpec
    from dsnas.tasks import check_params

    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "dated_task.py").write_text("def make(since):\n    return None\n")
    spec = TaskSpec("dated_task:make", {"since": datetime.date(2024, 1, 1)}, str(tmp_path))
    with pytest.raises(SpecError, match=r"\[task.since\] must be a string, number, boolean .* not a TOML date, but "
                                        r"got '2024-01-01'. Fix: quote it: \"2024-01-01\""):
        check_params("study.toml", spec)
    within = TaskSpec("dated_task:make", {"since": ["x", datetime.date(2024, 1, 1)]}, str(tmp_path))
    with pytest.raises(SpecError, match=r"\[task.since\[1\]\] must be .* not a TOML date, but got '2024-01-01'"):
        check_params("study.toml", within)
    sys.modules.pop("dated_task", None)


def test_a_study_scored_on_overlapping_windows_by_an_older_dsnas_is_not_told_its_text_changed(tmp_path):
    """Resuming a study of a text whose validation split is shorter than val_tokens: the older dsnas's trials hold no
    val_windows, and the driver said "the data differs ... Fix: restore the data" of a text that had not changed."""
    from types import SimpleNamespace

    import pytest

    from dsnas.driver import Driver
    from dsnas.errors import DsnasError

    (tmp_path / "corpus.txt").write_bytes(bytes(range(256)) * 400)
    task = CharLMTask(CharLMConfig(corpus="corpus.txt", context=64), str(tmp_path))
    now = task.fingerprint()
    older = {k: v for k, v in now.items() if k != "val_windows"}
    trial = SimpleNamespace(user_attrs={"profile": {"task": older}})
    study = SimpleNamespace(get_trials=lambda deepcopy, states: [trial])
    with pytest.raises(DsnasError) as err:
        Driver._check_same_data(SimpleNamespace(study=study, data=now, spec=SimpleNamespace(path="s.toml"),
                                                task=task))
    assert "scored by an older dsnas on overlapping windows" in str(err.value)
    assert "restore the data" not in str(err.value) and str(err.value).endswith("give the study a new [study] name")


def test_fingerprints_compare_as_stored_and_an_older_image_reader_is_named():
    """A user fingerprint of tuples differed from itself stored (JSON lists): its study could never resume. A study
    of image folders searched before sub-folders were read was told to "restore the data" that had not changed."""
    from types import SimpleNamespace

    import pytest

    from dsnas.driver import Driver
    from dsnas.errors import DsnasError
    from dsnas.tasks import data_differs

    assert data_differs({"packages": ["a", "b"], "rows": {"1": 2}}, {"packages": ("a", "b"), "rows": {1: 2}}) == []
    assert data_differs({"packages": ["a"]}, {"packages": ("b",)}) == ["packages"]

    def check(recorded, now, read_otherwise=2):
        trial = SimpleNamespace(user_attrs={"profile": {"task": recorded}})
        study = SimpleNamespace(get_trials=lambda deepcopy, states: [trial])
        Driver._check_same_data(SimpleNamespace(study=study, data=now, spec=SimpleNamespace(path="s.toml"),
                                                task=SimpleNamespace(read_otherwise=read_otherwise)))

    old = {"task": "images", "dataset": "/d/pets", "dataset_sha256": "aa", "train_count": 6}
    check(old, {**old, "folder_reader": 2})  # the same images: an older record's missing key is no difference
    with pytest.raises(DsnasError, match=r"s.toml: \[task\] the stored trials were searched by an older dsnas, "
                                         r"which read no images in the class folders' sub-folders .* reads 2 of the "
                                         r"folder's images otherwise \(dataset_sha256, train_count differ\).*Fix: "
                                         r"give the study a new \[study\] name$"):
        check(old, {**old, "dataset_sha256": "bb", "train_count": 8, "folder_reader": 2})
    # A folder the older reader read alike, whose images changed: the data differs, as for any study.
    with pytest.raises(DsnasError, match=r"\[task\] the data differs .*Fix: restore the data"):
        check(old, {**old, "dataset_sha256": "bb", "train_count": 8, "folder_reader": 2}, read_otherwise=0)
    with pytest.raises(DsnasError, match=r"the data differs .*dataset_sha256 was \"a{55}\.\.\.\", now"):
        check({**old, "dataset_sha256": "a" * 64, "folder_reader": 2}, {**old, "folder_reader": 2})


def test_each_command_in_one_process_builds_its_task_from_the_data_as_it_is_now(tmp_path):
    """A notebook calling dsnas.cli.main twice: the second verify took the task the first had built ("task data
    same" after the corpus was edited)."""
    from dsnas import tasks
    from dsnas.cli import main
    from dsnas.spec import TaskSpec

    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    tasks.make_task(TaskSpec("charlm", {"corpus": "text.txt", "context": 8}, str(tmp_path)))
    assert tasks._built
    assert main(["report", str(tmp_path / "no_such_study.toml")]) == 2  # any command
    assert not tasks._built


def test_a_worker_kept_from_another_run_builds_its_task_and_imports_the_code_afresh(tmp_path):
    """Under a Ray the notebook started itself, its workers served the next search with the task (and the code)
    as the first had built it: an edited task ran as before the edit."""
    from types import SimpleNamespace

    from dsnas import tasks, worker
    from dsnas.spec import TaskSpec

    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    spec = TaskSpec("charlm", {"corpus": "text.txt", "context": 8}, str(tmp_path))
    worker._SERVED[0] = None
    worker._start_of_run(SimpleNamespace(run="other-host:1:100"))  # a fresh worker: nothing kept to forget
    tasks.make_task(spec)
    worker._start_of_run(SimpleNamespace(run="other-host:1:100"))  # the same run: kept
    assert tasks._built
    worker._start_of_run(SimpleNamespace(run="other-host:1:200"))  # the next run
    assert not tasks._built
    tasks.make_task(spec)
    import os
    import socket

    worker._start_of_run(SimpleNamespace(run=f"{socket.gethostname()}:{os.getpid()}:300"))  # the driver's process
    assert tasks._built
    worker._SERVED[0] = None
    tasks.forget_built()
