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
