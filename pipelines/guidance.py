"""Classifier-free guidance (Ho & Salimans 2022), in one place for every pipeline.

With an unconditional prediction eps(x, 0) and a conditional one eps(x, c), guidance extrapolates

    eps_hat = eps(x, 0) + w * (eps(x, c) - eps(x, 0))

The two are computed in one batched UNet call, (uncond; cond) stacked on the batch axis, which is
what diffusers does and so what pixel parity with it needs. w = 1 is plain conditional sampling and
skips the unconditional half of the batch entirely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (x_t (B,C,h,w), t scalar tensor, text states (B,77k,D)) -> network output (B,C,h,w)
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    scale: float
    cond: torch.Tensor            # (B, 77k, D) text states for the prompts (k 75-token windows)
    uncond: torch.Tensor | None   # (B, 77k, D) for the negative prompts; None when scale == 1

    @property
    def active(self) -> bool:
        return self.uncond is not None

    def model(self, unet: UNetFn) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The guided denoiser x_t, t -> output, in the network's own parameterisation.

        Guidance is linear, so combining raw eps-, v- or x0-outputs is the same as combining eps.
        """
        if not self.active:
            return lambda x, t: unet(x, t, self.cond)
        states = torch.cat([self.uncond, self.cond])   # (2B, 77k, D), built once per generation
        w = self.scale

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out_uncond, out_cond = unet(torch.cat([x, x]), t, states).chunk(2)
            return out_uncond + w * (out_cond - out_uncond)

        return guided
