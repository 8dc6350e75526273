"""Plan tails and forward noising (schedulers/tail.py) against diffusers' img2img and inpaint.

The reference is what diffusers' StableDiffusionImg2ImgPipeline does, written out here:
set_timesteps(N); t_start = max(N - min(int(N strength), N), 0); the loop runs
timesteps[t_start * order:] after set_begin_index(t_start * order), from
add_noise(x0, z, timesteps[:1]). A fixed smooth function of (x, t) stands in for the UNet.

Tolerances: the tail's timesteps and every forward noising are compared exactly (the same float32
or bf16 operations in the same order). A run of tail steps is compared to 1e-5 of the largest
magnitude in play (max |x|, at least 1), as tests/test_samplers.py does for whole plans; DDIM and
UniPC, which step bit for bit like diffusers, are also compared exactly.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

import kdiffusion_ref
from ldm_engine.errors import UserInputError
from pipelines.loop import denoise
from schedulers import (
    SAMPLERS,
    ScheduleConfig,
    get_sampler,
    make_denoiser,
    sigma_table,
    strength_start,
    train_schedule,
)

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

SHAPE = (2, 4, 8, 8)
CONFIGS = {
    "sd15": ScheduleConfig(),
    # DPMSolverMultistep spaces "leading" timesteps over N + 1 parts (our sigma plans: N parts,
    # Euler's); with "trailing" both pick the same timesteps, so DPM++ 2M is compared there.
    "trailing": ScheduleConfig(timestep_spacing="trailing", steps_offset=0),
}
STRENGTHS = (0.3, 0.5, 1.0)


def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth function of the scaled input and the (fractional) timestep."""
    t = t.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.8 * x + t / 700.0) * 1.3 + 0.1 * torch.sin(3.0 * x)


def latents(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def diffusers_img2img(cls, config: ScheduleConfig, n: int, strength: float, **options):
    """diffusers' get_timesteps, written out: (scheduler at its begin index, loop timesteps)."""
    scheduler = cls.from_config(config.to_dict(cls.__name__), **options)
    scheduler.set_timesteps(n)
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler, timesteps


# (our sampler, diffusers class, options, config): the full plans pick the same timesteps.
CASES = [
    ("ddim", DDIMScheduler, {}, "sd15"),
    ("ddpm", DDPMScheduler, {}, "sd15"),
    ("euler", EulerDiscreteScheduler, {}, "sd15"),
    ("euler_a", EulerAncestralDiscreteScheduler, {}, "sd15"),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, "trailing"),
    ("unipc", UniPCMultistepScheduler, {}, "sd15"),
    ("unipc", UniPCMultistepScheduler, {}, "trailing"),
    ("lms", LMSDiscreteScheduler, {}, "sd15"),
    ("diffusers:DDIMScheduler", DDIMScheduler, {}, "sd15"),
    # order 2: one plan step per model call, the tail starts at t_start * 2.
    ("diffusers:HeunDiscreteScheduler", HeunDiscreteScheduler, {}, "sd15"),
]


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("name, cls, options, config_name", CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_tail_timesteps_are_diffusers_img2img_timesteps(name, cls, options, config_name, n):
    config = CONFIGS[config_name]
    sampler = get_sampler(name)
    schedule = train_schedule(config)
    for strength in STRENGTHS:
        ref, timesteps = diffusers_img2img(cls, config, n, strength, **options)
        tail = sampler.strength_plan(schedule, n, strength)
        assert len(tail) == len(timesteps)
        assert torch.equal(tail.timesteps.to(torch.float64), timesteps.to(torch.float64)), \
            (strength, tail.timesteps, timesteps)
        if hasattr(tail, "sigmas") and cls is not DPMSolverMultistepScheduler:
            # Sigma plans visit diffusers' sigmas from the begin index on (UniPC: its own too).
            begin = ref.begin_index
            assert torch.equal(tail.sigmas, ref.sigmas[begin:].to(torch.float32))


def _run_ours(name, config, n, strength, x0, z):
    sampler = get_sampler(name)
    schedule = train_schedule(config)
    plan = sampler.strength_plan(schedule, n, strength)
    x = sampler.noised(plan, x0, z)
    gens = [torch.Generator().manual_seed(b) for b in range(SHAPE[0])]
    return denoise(make_denoiser(net, schedule, config.prediction_type), x, sampler=sampler,
                   plan=plan, generators=gens, eta=0.0, progress=False)


def _run_diffusers(cls, config, n, strength, x0, z, **options):
    scheduler, timesteps = diffusers_img2img(cls, config, n, strength, **options)
    x = scheduler.add_noise(x0, z, timesteps[:1].repeat(SHAPE[0]))
    for t in timesteps:
        out = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x).prev_sample
    return x


RUNS = [
    ("ddim", DDIMScheduler, {}, "sd15", True),
    ("euler", EulerDiscreteScheduler, {}, "sd15", False),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, "trailing",
     False),
    ("unipc", UniPCMultistepScheduler, {}, "sd15", True),
    ("unipc", UniPCMultistepScheduler, {}, "trailing", True),
    ("diffusers:EulerDiscreteScheduler", EulerDiscreteScheduler, {}, "sd15", True),
]


@pytest.mark.parametrize("name, cls, options, config_name, exact", RUNS,
                         ids=[f"{c[0]}-{c[3]}" for c in RUNS])
def test_running_the_tail_equals_diffusers_from_its_begin_index(name, cls, options,
                                                                config_name, exact):
    config = CONFIGS[config_name]
    x0, z = latents(1), latents(2)
    for n in (10, 25):
        for strength in STRENGTHS:
            x = _run_ours(name, config, n, strength, x0, z)
            x_ref = _run_diffusers(cls, config, n, strength, x0, z, **options)
            diff = float((x - x_ref).abs().max())
            scale = max(1.0, float(x_ref.abs().max()), float(x0.abs().max()))
            assert diff <= 1e-5 * scale, f"{name} N={n} strength={strength}: {diff:.3g}"
            if exact:
                assert torch.equal(x, x_ref), f"{name} N={n} strength={strength}: {diff:.3g}"


def test_multistep_tails_restart_their_history_like_k_diffusion_on_sliced_sigmas():
    # k-diffusion's sample_lms / sample_dpmpp_2m on sigmas[start:] warm up afresh (LMS order
    # 1, 2, 3, 4; DPM++ 2M first order): the tail run from carry None must be that run.
    k_sampling, k_external = kdiffusion_ref.load()
    config = CONFIGS["sd15"]
    schedule = train_schedule(config)
    alphas_cumprod = 1 / (sigma_table(schedule) ** 2 + 1)
    k_model = k_external.DiscreteEpsDDPMDenoiser(net, alphas_cumprod, quantize=False)
    x0, z = latents(3), latents(4)
    for name, fn in (("lms", k_sampling.sample_lms), ("dpmpp_2m", k_sampling.sample_dpmpp_2m),
                     ("dpmpp_2m_karras", k_sampling.sample_dpmpp_2m)):
        sampler = get_sampler(name)
        full = sampler.make_plan(schedule, 12)
        tail = sampler.tail(full, 5)
        x = denoise(make_denoiser(net, schedule, "epsilon"), sampler.noised(tail, x0, z),
                    sampler=sampler, plan=tail, generators=[], eta=0.0, progress=False)
        x_ref = fn(k_model, x0 + z * full.sigmas[5], full.sigmas[5:], disable=True)
        diff = float((x - x_ref).abs().max())
        assert diff <= 2e-5 * max(1.0, float(x_ref.abs().max())), f"{name}: {diff:.3g}"


def test_unipc_tail_warms_up_afresh():
    schedule = train_schedule(CONFIGS["sd15"])
    full = get_sampler("unipc").make_plan(schedule, 8)
    assert full.order == (1, 2, 2, 2, 2, 2, 2, 1)
    tail = get_sampler("unipc").tail(full, 3)
    assert tail.order == (1, 2, 2, 2, 1)
    assert tail.r[0] is None and tail.rho_c[0] is None
    assert all(torch.equal(a, b) for a, b in zip(tail.rho_c[1:-1], full.rho_c[4:-1]))
    assert tail.rho_c[-1] is None and full.rho_c[-1] is None


NOISED = [
    ("ddim", DDIMScheduler),
    ("ddpm", DDPMScheduler),
    ("euler", EulerDiscreteScheduler),
    ("unipc", UniPCMultistepScheduler),
    ("lms", LMSDiscreteScheduler),
    ("diffusers:EulerDiscreteScheduler", EulerDiscreteScheduler),
    ("diffusers:DDIMScheduler", DDIMScheduler),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, cls", NOISED, ids=[c[0] for c in NOISED])
def test_noised_equals_diffusers_add_noise(name, cls, dtype):
    config = CONFIGS["sd15"]
    sampler = get_sampler(name)
    x0, z = latents(5).to(dtype), latents(6).to(dtype)
    for strength in STRENGTHS:
        ref, timesteps = diffusers_img2img(cls, config, 10, strength)
        x_ref = ref.add_noise(x0, z, timesteps[:1].repeat(SHAPE[0]))
        x = sampler.noised(sampler.strength_plan(train_schedule(config), 10, strength), x0, z)
        assert x.dtype == dtype
        assert torch.equal(x, x_ref), (strength, float((x - x_ref).abs().max()))


@pytest.mark.parametrize("name, cls", [("ddim", DDIMScheduler),
                                       ("euler", EulerDiscreteScheduler),
                                       ("unipc", UniPCMultistepScheduler)])
def test_noised_to_is_what_diffusers_inpaint_reimposes(name, cls):
    # diffusers' inpaint, after step i < len - 1: add_noise(image_latents, noise, timesteps[i+1])
    # with the scheduler's step index already at i + 1; the last step keeps image_latents.
    config = CONFIGS["sd15"]
    sampler = get_sampler(name)
    plan = sampler.strength_plan(train_schedule(config), 10, 0.6)
    ref, timesteps = diffusers_img2img(cls, config, 10, 0.6)
    x0, z = latents(7), latents(8)
    x = ref.add_noise(x0, z, timesteps[:1].repeat(SHAPE[0]))
    for i, t in enumerate(timesteps):
        x = ref.step(net(ref.scale_model_input(x, t), t), t, x).prev_sample
        if i < len(timesteps) - 1:
            known = ref.add_noise(x0, z, timesteps[i + 1:i + 2])
            assert torch.equal(sampler.noised_to(plan, i + 1, x0, z), known), i
    assert sampler.noised_to(plan, len(plan), x0, z) is x0


def test_levels():
    schedule = train_schedule(CONFIGS["sd15"])
    table = sigma_table(schedule)
    ddim, euler = get_sampler("ddim"), get_sampler("euler")
    p_ddim, p_euler = ddim.make_plan(schedule, 10), euler.make_plan(schedule, 10)
    for i in range(10):
        # The same timesteps: the VP level sqrt((1 - alpha_bar) / alpha_bar) is the VE sigma.
        t = int(p_ddim.timesteps[i])
        assert math.isclose(ddim.level(p_ddim, i), float(table[t]), rel_tol=1e-6)
        assert euler.level(p_euler, i) == float(p_euler.sigmas[i])
    for name in ("ddim", "ddpm", "euler", "dpmpp_2m_karras", "unipc", "lcm",
                 "diffusers:DDIMScheduler", "diffusers:EulerDiscreteScheduler"):
        sampler = get_sampler(name)
        plan = sampler.make_plan(schedule, 6)
        levels = [sampler.level(plan, i) for i in range(len(plan) + 1)]
        assert levels[-1] == 0.0 and all(a > b for a, b in zip(levels, levels[1:])), name
        tail = sampler.tail(plan, 2)
        assert [sampler.level(tail, i) for i in range(len(tail) + 1)] == levels[2:], name
    # A tail's first level is the one the adapter's scheduler noises to.
    adapter = get_sampler("diffusers:EulerDiscreteScheduler")
    tail = adapter.tail(adapter.make_plan(schedule, 6), 2)
    assert adapter.level(tail, 0) == euler.level(euler.make_plan(schedule, 6), 2)


def _same_plan(a, b) -> bool:
    for f in dataclasses.fields(a):
        u, v = getattr(a, f.name), getattr(b, f.name)
        if f.name == "template":
            continue
        if isinstance(u, torch.Tensor):
            if not torch.equal(u, v):
                return False
        elif isinstance(u, tuple):
            if len(u) != len(v) or not all(
                    (p is None and q is None) or (isinstance(p, int) and p == q)
                    or (isinstance(p, torch.Tensor) and torch.equal(p, q)) for p, q in zip(u, v)):
                return False
        elif u != v:
            return False
    return True


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_karras", "lms", "unipc", "lcm",
                                  "diffusers:EulerDiscreteScheduler"])
def test_tail_of_a_tail_is_the_tail(name):
    sampler = get_sampler(name)
    plan = sampler.make_plan(train_schedule(CONFIGS["sd15"]), 9)
    assert sampler.tail(plan, 0) is plan
    for a in range(10):
        for b in range(10 - a):
            assert _same_plan(sampler.tail(sampler.tail(plan, a), b), sampler.tail(plan, a + b))


def test_start_n_is_an_empty_plan_the_loop_runs_as_no_steps():
    schedule = train_schedule(CONFIGS["sd15"])
    x0, z = latents(9), latents(10)
    names = [*SAMPLERS, "diffusers:DDIMScheduler", "diffusers:EulerDiscreteScheduler"]
    for name in names:
        sampler = get_sampler(name)
        plan = sampler.make_plan(schedule, 4)
        empty = sampler.tail(plan, len(plan))
        assert type(empty) is type(plan) and len(empty) == 0, name
        assert sampler.noised(empty, x0, z) is x0
        assert sampler.level(empty, 0) == 0.0
        x = denoise(make_denoiser(net, schedule, "epsilon"), x0, sampler=sampler, plan=empty,
                    generators=[torch.Generator()] * SHAPE[0], progress=False)
        assert x is x0
    # A strength too small for one step of N runs none (diffusers' int(N strength) = 0).
    assert strength_start(4, 0.2) == 4
    assert len(get_sampler("euler").strength_plan(schedule, 4, 0.2)) == 0


def test_bad_start_and_index_are_refused():
    schedule = train_schedule(CONFIGS["sd15"])
    x0 = latents(11)
    for name in ("ddim", "euler", "unipc", "lcm", "diffusers:DDIMScheduler"):
        sampler = get_sampler(name)
        plan = sampler.make_plan(schedule, 5)
        for bad in (-1, 6, 1.5, True, None):
            with pytest.raises(ValueError, match="start"):
                sampler.tail(plan, bad)
            with pytest.raises(ValueError, match="i="):
                sampler.level(plan, bad)
            with pytest.raises(ValueError, match="i="):
                sampler.noised_to(plan, bad, x0, x0)
        with pytest.raises(ValueError, match="noise has shape"):
            sampler.noised(plan, x0, x0[:1])


def test_strength_start_is_diffusers_formula():
    for n in range(1, 40):
        for strength in (0.01, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.75, 0.999, 1.0, 1):
            assert strength_start(n, strength) == max(n - min(int(n * strength), n), 0)
    assert strength_start(10, 1.0) == 0 and strength_start(10, 0.3) == 7
    for bad in (0, 0.0, -0.5, 1.01, math.nan, math.inf, "0.5", None, True):
        with pytest.raises(UserInputError, match="strength="):
            strength_start(10, bad)
    with pytest.raises(UserInputError, match="num_steps="):
        strength_start(0, 0.5)
