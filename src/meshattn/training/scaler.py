"""Dynamic loss scaling for float16 autocast, decided the same way on every rank.

fp16 has a narrow exponent range: small gradients underflow to zero. The loss is multiplied by
`scale` before backward, so gradients are computed `scale` times larger, then divided by it
before the optimizer step. If the scaled gradients overflowed (a non-finite global gradient
norm), the step is skipped and the scale halved; after `growth_interval` good steps in a row it
doubles. The decision reads the *global* gradient norm, which every rank already computes with
the same all-reduce (train.grad_norm), so all ranks skip or step together with no extra
collective; torch.amp.GradScaler decides per rank from local gradients only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel.fsdp import local


@dataclass
class LossScaler:
    scale: float = 2.0**16
    growth_interval: int = 200
    factor: float = 2.0
    min_scale: float = 1.0  # below this, overflow is not a scaling problem: the run is diverging
    good_steps: int = 0
    skipped: int = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params) -> None:
        for p in params:
            if p.grad is not None:
                local(p.grad).mul_(1.0 / self.scale)  # this rank's piece under FSDP

    def update(self, finite: bool) -> None:
        """After a step: shrink on overflow, grow after growth_interval clean steps."""
        if not finite:
            self.scale /= self.factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= self.factor

    @property
    def exhausted(self) -> bool:
        return self.scale < self.min_scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps, self.skipped = state["scale"], state["good_steps"], state["skipped"]
