"""The one denoising loop every pipeline runs.

Pipelines differ only in how they prepare the starting latents and, optionally, in a per-step hook
(e.g. inpainting re-imposes the known region after each step). The loop itself:

    denoiser = make_denoiser(guided_model, schedule, prediction_type)   # D(x, sigma) -> x0
    carry = None                                                        # the sampler's history
    for i in range(len(plan)):
        noise    = pre-drawn sampler.noise_draws(plan, i, eta) tensors
        x, carry = sampler.step(denoiser, plan, i, x, carry, noise, eta=eta)
        x        = on_step(i, x)                                        # optional hook
        observers see (i, x, the step's x0 estimate); a cancelled run stops before step i + 1

Randomness stays outside the sampler: each image has its own CPU ``torch.Generator``, from which
its share of the variance noise is drawn exactly as many times as the sampler says each step
consumes (none for DDIM at eta 0 and the ODE samplers, two per step for DPM++ SDE).
Per-image generators are what makes an image in a batch identical to the same image made alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ldm_engine.errors import GenerationCancelled
from schedulers import Denoiser, Plan, Sampler

from .observe import Observer, Progress

StepHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class _Watched(Denoiser):
    """The denoiser of one run, keeping the last x0 it returned for the observers' previews
    (the box is this run's own: nothing is shared between generations)."""

    box: list = field(default_factory=list)

    def __call__(self, x, sigma, t=None):
        x0 = super().__call__(x, sigma, t)
        self.box[:] = [x0]
        return x0

    def vp(self, x, t, alpha_bar):
        x0, eps = super().vp(x, t, alpha_bar)
        self.box[:] = [x0]
        return x0, eps


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
            on_step: StepHook | None = None, observers: Sequence[Observer] = (),
            decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
            pass_index: int = 0, passes: int = 1, progress: bool = False) -> torch.Tensor:
    """Run ``plan`` from x (the starting latents, at the plan's first noise level: for pure noise
    that is ``z * plan.init_noise_sigma``, for a plan's tail ``sampler.noised(plan, x0, z)``)
    down to x_0. An empty plan returns x unchanged.

    The sampler's history (``carry``) lives here, one per call, so concurrent calls share nothing.
    `decode` turns latents into pixels for the observers' previews; progress=True adds a bar.
    """
    bar = None
    if progress:
        from .observe import ProgressBar
        bar = ProgressBar(sampler.name)
        observers = [*observers, bar]
    try:
        return _run(denoiser, x, sampler, plan, generators, eta, on_step, observers, decode,
                    pass_index, passes)
    finally:
        if bar is not None:
            bar.on_end()


def _run(denoiser, x, sampler, plan, generators, eta, on_step, observers, decode, pass_index,
         passes):
    n = len(plan)
    if observers:
        denoiser = _Watched(**{f.name: getattr(denoiser, f.name)
                               for f in dataclasses.fields(Denoiser)})
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
        if any(o.cancelled() for o in observers):
            raise GenerationCancelled(f"generation cancelled after {i} of {n} steps"
                                      + (f" (pass {pass_index + 1} of {passes})"
                                         if passes > 1 else ""))
        noise = tuple(drawn[used + k] for k in range(counts[i]))
        used += counts[i]
        x, carry = sampler.step(denoiser, plan, i, x, carry, noise, eta=eta)
        if on_step is not None:
            x = on_step(i, x)
        if observers:
            seen = denoiser.box[0] if denoiser.box else None
            progress = Progress(step=i + 1, total=n, pass_index=pass_index, passes=passes,
                                latents=x, denoised=seen, _decode=decode or _no_decode)
            for o in observers:
                o.on_step(progress)
    return x


def _no_decode(latents: torch.Tensor) -> torch.Tensor:
    raise ValueError("this run was given no decoder: previews are not available")
