"""Your task: the data, the training loop, the metric and an example input. This one classifies 96-byte snippets
of the Python standard library's source by the package they come from (json, email, asyncio, ...): real text
every machine has, nothing downloaded. Files are split into training and validation, never snippets of one file."""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PACKAGES = ("asyncio", "email", "json", "logging", "unittest", "xml")


class SnippetTask:
    tokens_per_example = 1  # throughput counts snippets per second ...
    throughput_unit = "snippets/s"  # ... and says so in tables

    def __init__(self, length: int = 96, train_snippets: int = 24_000, batch_size: int = 64, lr: float = 3e-3) -> None:
        self.length, self.train_snippets, self.batch_size, self.lr = length, train_snippets, batch_size, lr
        root = Path(sysconfig.get_paths()["stdlib"])
        train, val = [], []
        for label, package in enumerate(PACKAGES):
            files = sorted((root / package).rglob("*.py"))
            for i, file in enumerate(files):
                data = file.read_bytes()
                if len(data) > length:
                    (val if i % 5 == 4 else train).append((data, label))
        self.train_files, self.val_files = train, val
        digest = hashlib.sha256(b"".join(d for d, _ in train + val)).hexdigest()
        self._fingerprint = {"task": "stdlib-snippets", "packages": list(PACKAGES), "length": length,
                             "sha256": digest, "train_files": len(train), "val_files": len(val)}
        self.val_x, self.val_y = self._sample(val, 2048, torch.Generator().manual_seed(1234))

    def _sample(self, files: list[tuple[bytes, int]], n: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(0, len(files), (n,), generator=gen).tolist()
        xs, ys = [], []
        for i in picks:
            data, label = files[i]
            start = int(torch.randint(0, len(data) - self.length, (1,), generator=gen))
            xs.append(torch.frombuffer(bytearray(data[start:start + self.length]), dtype=torch.uint8))
            ys.append(label)
        return torch.stack(xs).long(), torch.tensor(ys)

    # ---- what dsnas calls --------------------------------------------------------------------------------------

    def arch_defaults(self) -> dict[str, Any]:
        """Architecture keys the task fixes: the builder reads them beside the sampled choices."""
        return {"n_classes": len(PACKAGES)}

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint

    def train(self, model: torch.nn.Module, device: Any, *, seed: int, checkpoint: Callable[[], None],
              fraction: float = 1.0, lr_scale: float = 1.0) -> dict[str, float]:
        """Train in place on ``fraction`` of the budget (the engine's fine-tuning uses the rest) and call
        ``checkpoint()`` between steps (dsnas stops a trial there)."""
        steps = max(1, int(fraction * self.train_snippets) // self.batch_size)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr * lr_scale)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr * lr_scale, total_steps=steps)
        model.train()
        for _ in range(steps):
            x, y = self.batches(1, device, int(torch.randint(0, 2**31, (1,), generator=gen)))[0]
            loss = self.loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            checkpoint()
        return {"train_loss": loss.item(), "train_steps": float(steps)}

    def batches(self, n: int, device: Any, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` training batches (the engine's calibration and sparsity saliency read them too)."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            x, y = self._sample(self.train_files, self.batch_size, gen)
            out.append((x.to(device), y.to(device)))
        return out

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: Any) -> dict[str, float]:
        """Validation metrics; ``accuracy`` is required."""
        model.eval()
        logits = torch.cat([model(x.to(device)).float().cpu() for x in self.val_x.split(256)])
        return {"accuracy": (logits.argmax(1) == self.val_y).float().mean().item(),
                "val_loss": F.cross_entropy(logits, self.val_y).item()}

    def example_batch(self, batch_size: int, device: Any) -> torch.Tensor:
        """A fixed input batch of this size: dsnas measures with it and checks the exported model on it."""
        rows = torch.arange(batch_size) % len(self.val_x)
        return self.val_x[rows].to(device)
