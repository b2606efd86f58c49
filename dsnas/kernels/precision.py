"""Mixed precision training: one optimizer step with loss scaling where fp16 needs it, per-layer overflow flags
kept on the device and read once per step, and a per-layer fallback to fp32 that retries low precision later."""

from __future__ import annotations

import torch
from torch import nn

from dsnas.kernels.linear import EngineLinear, engine_layers

FALLBACK_STEPS = 20
LOSS_SCALE = "dsnas_loss_scale"  # the model attribute the fp16 loss scale is kept in between trainings


class TrainStep:
    """Backward + clip + optimizer step for a model built from EngineLinear layers.

    ``step(loss)`` returns True when the update was taken and False when it was skipped because the loss or a
    low-precision layer overflowed; it raises nothing: whether a run of skipped steps means divergence is the
    caller's call (``diverged``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, fallback_steps: int = FALLBACK_STEPS,
                 clip: float = 1.0) -> None:
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.fallback_steps = fallback_steps
        self.layers = [m for m in engine_layers(model).values() if m.precision != "fp32"]
        device = next(model.parameters()).device
        self.flags = torch.zeros(len(self.layers), dtype=torch.bool, device=device)
        for i, layer in enumerate(self.layers):
            layer.overflow = self.flags[i:i + 1]
        # fp16's range needs loss scaling (bf16's does not); the scaler also skips steps with inf/NaN gradients.
        # It starts at the scale an earlier training of this model ended at (the engine's fine-tuning and QAT
        # after the first training): from 2**16 again, each halving back costs a skipped step, and a short
        # fine-tuning spent them all and failed the trial as diverged.
        fp16 = any(m.precision == "fp16" for m in self.layers)
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16,
                                           init_scale=getattr(model, LOSS_SCALE, 2.0**16))
        self.skipped_in_a_row = 0
        self.skipped = 0
        self.unexplained = False  # the last loss was not finite and no low-precision layer overflowed

    def step(self, loss: torch.Tensor) -> bool:
        # dsnas's one host read of the step: the loss's finiteness and every layer's overflow flag together. (With
        # fp16, GradScaler reads its own inf check and scale too: two more syncs that loss scaling needs.)
        state = torch.cat([torch.isfinite(loss.detach()).reshape(1), self.flags]).cpu()
        finite, overflowed = bool(state[0]), [layer for layer, hit in zip(self.layers, state[1:]) if hit]
        self.optimizer.zero_grad(set_to_none=True)
        taken = False
        # A step in which a layer overflowed is skipped even when the loss came out finite: its gradients went
        # through an inf the layer produced.
        if finite and not overflowed:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # With scaling on, a lowered scale means the scaler found inf/NaN gradients and skipped the update.
            taken = not self.scaler.is_enabled() or self.scaler.get_scale() >= scale
        self.unexplained = not finite and not overflowed
        self._fall_back(overflowed)
        self.skipped_in_a_row = 0 if taken else self.skipped_in_a_row + 1
        self.skipped += 0 if taken else 1
        return taken

    def _fall_back(self, overflowed: list[EngineLinear]) -> None:
        for layer in self.layers:
            if layer.fallback_left > 0:
                layer.fallback_left -= 1
        for layer in overflowed:
            layer.fallback_left = self.fallback_steps
            layer.fallbacks += 1
        self.flags.zero_()

    def diverged(self, patience: int = 50) -> bool:
        """True when the loss went non-finite with no low-precision layer to blame, or when ``patience`` steps in a
        row were skipped (fallbacks and loss scaling did not recover it): training itself diverged."""
        return self.unexplained or self.skipped_in_a_row >= patience

    def close(self) -> None:
        if self.scaler.is_enabled():
            setattr(self.model, LOSS_SCALE, self.scaler.get_scale())
        for layer in self.layers:
            layer.overflow = None
            layer.fallback_left = 0
