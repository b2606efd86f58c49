"""Export a trial as a bundle and load it back: the loaded model gives the trial's outputs."""

from __future__ import annotations

import json

import pytest
import torch

import dsnas
from dsnas.cli import main
from dsnas.errors import DsnasError
from dsnas.export import read_probe


@pytest.fixture
def searched(tiny_study):
    assert main(["search", str(tiny_study), "--executor", "local"]) == 0
    return tiny_study


def test_export_pick_and_load_round_trip(searched, capsys):
    out = searched.parent / "bundle"
    assert main(["export", str(searched), "--pick", "max-accuracy", "--out", str(out)]) == 0
    assert "exported trial" in capsys.readouterr().out
    arch = json.loads((out / "arch.json").read_text())
    assert arch["_type"] == "dsnas.bundle" and arch["_version"] == 1 and arch["arch"]["family"] == "transformer_lm"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objectives"]["accuracy"] == metrics["metrics"]["accuracy"]
    assert metrics["profile"]["fingerprint"]["device"] == "cpu"

    model = dsnas.load(out)
    probe = read_probe(out)
    with torch.inference_mode():
        logits = model(probe["input"])
    # The same weights on the same input: the trial's own logits, bit for bit on the same machine.
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-6)
    assert model.head.weight.data_ptr() == model.tok.weight.data_ptr()  # tied weights stay tied


def test_export_by_trial_number_and_pick_picks_the_best(searched, tmp_path):
    from dsnas.search import open_study
    from dsnas.spec import load_study

    spec = load_study(searched)
    study = open_study(spec)
    best = max(study.trials, key=lambda t: t.user_attrs["accuracy"])
    assert main(["export", str(searched), "--trial", str(best.number), "--out", str(tmp_path / "a")]) == 0
    assert main(["export", str(searched), "--pick", "max-accuracy", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()


def test_export_errors(searched, capsys):
    assert main(["export", str(searched), "--trial", "99"]) == 2
    assert "no completed trial with that number" in capsys.readouterr().err
    assert main(["export", str(searched), "--pick", "best"]) == 2
    assert "must be max-NAME or min-NAME" in capsys.readouterr().err
    assert main(["export", str(searched)]) == 2
    assert "exactly one of --trial N and --pick" in capsys.readouterr().err


def test_load_rejects_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "arch.json").write_text(json.dumps({"_type": "something", "_version": 1}))
    with pytest.raises(DsnasError, match="expected _type 'dsnas.bundle'"):
        dsnas.load(tmp_path)


def test_export_of_a_study_never_searched_says_so_and_writes_nothing(tiny_study, capsys):
    assert main(["export", str(tiny_study), "--pick", "max-accuracy"]) == 2
    assert "no study 'tiny' is stored" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_study.parent.iterdir()) == ["tiny.toml", "tiny_space.toml"]
