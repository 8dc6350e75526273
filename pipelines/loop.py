"""The one denoising loop every pipeline runs.

Pipelines differ only in how they prepare the starting latents and, optionally, in a per-step hook
(e.g. inpainting re-imposes the known region after each step). The loop itself:

    denoiser = make_denoiser(guided_model, schedule, prediction_type)   # D(x, sigma) -> x0
    carry = None                                                        # the sampler's history
    for i in range(len(plan)):
        noise    = pre-drawn sampler.noise_draws(plan, i, eta) tensors
        x, carry = sampler.step(denoiser, plan, i, x, carry, noise, eta=eta)
        x        = on_step(i, x)                                        # optional hook

Randomness stays outside the sampler: each image has its own CPU ``torch.Generator``, from which
its share of the variance noise is drawn exactly as many times as the sampler says each step
consumes (none for DDIM at eta 0 and the ODE samplers, two per step for DPM++ SDE).
Per-image generators are what makes an image in a batch identical to the same image made alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from schedulers import Denoiser, Plan, Sampler

StepHook = Callable[[int, torch.Tensor], torch.Tensor]


def per_image_noise(shape: Sequence[int], generators: Sequence[torch.Generator], *,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of shape (B, ...), row b drawn from generators[b] on the CPU.

    Drawing on the CPU in float32 keeps the stream independent of the compute device and dtype,
    so a seed means the same image on CPU and GPU, fp32 or bf16 (up to arithmetic).
    """
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for batch {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(device=device, dtype=dtype)


def denoise(denoiser: Denoiser, x: torch.Tensor, *, sampler: Sampler, plan: Plan,
            generators: Sequence[torch.Generator], eta: float = 0.0,
            on_step: StepHook | None = None, progress: bool = True) -> torch.Tensor:
    """Run ``plan`` from x (the starting latents, at the plan's first noise level: for pure noise
    that is ``z * plan.init_noise_sigma``) down to x_0.

    The sampler's history (``carry``) lives here, one per call, so concurrent calls share nothing.
    """
    n = len(plan)
    bar = tqdm(total=n, disable=not progress, desc=sampler.name, leave=False)
    # Every step's noise draws are made up front, in the same order as drawing at each step (step
    # by step, draw by draw, image by image: a generator shared by several images gives the same
    # values), and moved to the device in one copy rather than one per step.
    cpu = torch.device("cpu")
    counts = [sampler.noise_draws(plan, i, eta) for i in range(n)]
    total = sum(counts)
    drawn = None
    if total:
        drawn = torch.stack([per_image_noise(x.shape, generators, device=cpu, dtype=torch.float32)
                             for _ in range(total)]).to(device=x.device, dtype=x.dtype)
    carry, used = None, 0
    for i in range(n):
        noise = tuple(drawn[used + k] for k in range(counts[i]))
        used += counts[i]
        x, carry = sampler.step(denoiser, plan, i, x, carry, noise, eta=eta)
        if on_step is not None:
            x = on_step(i, x)
        bar.update(1)
    bar.close()
    return x
