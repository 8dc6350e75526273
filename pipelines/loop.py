"""The one denoising loop every pipeline runs.

Pipelines differ only in how they prepare the starting latents and, optionally, in a per-step hook
(e.g. inpainting re-imposes the known region after each step). The loop itself:

    for i, t in enumerate(plan.timesteps):
        out      = model(x_t, t)                     # guided network output
        x0, eps  = to_x0_eps(out, x_t, alpha_bar_t)  # one adapter for eps / v / x0 networks
        x_{t-1}  = sampler.step(plan, i, x_t, x0, eps, noise)

Randomness stays outside the sampler: each image has its own CPU ``torch.Generator``, from which
its share of the variance noise is drawn exactly when the sampler says a step consumes noise.
Per-image generators are what makes an image in a batch identical to the same image made alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from schedulers import Sampler, SamplingPlan, to_x0_eps

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


def denoise(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, *,
            sampler: Sampler, plan: SamplingPlan, prediction_type: str, generators:
            Sequence[torch.Generator], eta: float = 0.0, on_step: StepHook | None = None,
            progress: bool = True) -> torch.Tensor:
    """Run ``plan`` from x (the starting latents, at the plan's first timestep) down to x_0."""
    n = len(plan.timesteps)
    # Per-step scalars as python floats, read once: no device syncs inside the loop.
    alpha_bar = plan.alpha_bar.tolist()
    bar = tqdm(total=n, disable=not progress, desc=sampler.name, leave=False)
    t_tensors = plan.timesteps.to(x.device)
    # Every step's variance noise is drawn up front, in the same order as drawing at each step
    # (step by step, image by image: a generator shared by several images gives the same values),
    # and moved to the device in one copy rather than one per step.
    cpu = torch.device("cpu")
    noisy = [i for i in range(n) if sampler.needs_noise(plan, i, eta)]
    drawn = torch.stack([per_image_noise(x.shape, generators, device=cpu, dtype=torch.float32)
                         for _ in noisy]).to(device=x.device, dtype=x.dtype) if noisy else None
    noise_at = {i: k for k, i in enumerate(noisy)}
    for i in range(n):
        out = model(x, t_tensors[i])
        x0, eps = to_x0_eps(out, x, alpha_bar[i], prediction_type)
        noise = drawn[noise_at[i]] if i in noise_at else None
        x = sampler.step(plan, i, x, x0, eps, eta=eta, noise=noise)
        if on_step is not None:
            x = on_step(i, x)
        bar.update(1)
    bar.close()
    return x
