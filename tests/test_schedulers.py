"""schedulers/: parity with diffusers' DDIMScheduler / DDPMScheduler, schedule properties, errors.

Parity tests run a fixed deterministic "model" through both implementations for whole trajectories
on tiny (2, 4, 8, 8) tensors. diffusers draws its variance noise from a list of per-sample CPU
generators; ours draws from identical generators only as often as `noise_draws` says, so the random
streams only line up if both consume noise at the same steps. Tolerance: max |diff| <= 1e-6 at
every step (in practice the trajectories are bit-identical).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from schedulers import (
    SAMPLERS,
    SamplingPlan,
    ScheduleConfig,
    add_noise,
    ddim_step,
    ddpm_needs_noise,
    ddpm_step,
    get_sampler,
    load_schedule_config,
    make_denoiser,
    to_x0_eps,
    train_schedule,
    velocity,
)

VP_SAMPLERS = ["ddim", "ddpm"]

SHAPE = (2, 4, 8, 8)
TOL = 1e-6
BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "trailing", "linspace"]
STEP_COUNTS = [4, 7]

# The scheduler_config.json shipped with Stable Diffusion 1.5, written out literally.
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def fake_model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """A fixed function of (x, t) for the UNet; its range exceeds [-1, 1] so clipping bites."""
    return torch.tanh(0.8 * x + int(t) / 700.0) * 1.3 + 0.1 * torch.sin(3.0 * x)


def draw_noise(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One sample per generator, concatenated: how a pipeline draws noise with per-image seeds."""
    shape = (1, *like.shape[1:])
    return torch.cat([torch.randn(shape, generator=g, dtype=like.dtype) for g in generators])


def generators(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + b) for b in range(SHAPE[0])]


def initial_latents(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)


def assert_parity(kind, config, num_steps, eta, dtype=torch.float32, tol=TOL):
    """Run diffusers' scheduler and ours side by side over a full trajectory."""
    reference_cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    reference = reference_cls.from_config(config.to_dict(reference_cls.__name__))
    reference.set_timesteps(num_steps)
    sampler = get_sampler(kind)
    schedule = train_schedule(config)
    plan = sampler.make_plan(schedule, num_steps)
    assert torch.equal(plan.timesteps, reference.timesteps), (plan.timesteps, reference.timesteps)
    denoiser = make_denoiser(fake_model, schedule, config.prediction_type)

    x_ref = x = initial_latents(dtype)
    gen_ref, gen = generators(100), generators(100)
    step_kwargs = {"eta": eta} if kind == "ddim" else {}
    for i, t in enumerate(reference.timesteps):
        out_ref = fake_model(x_ref, t)
        x_ref = reference.step(out_ref, t, x_ref, generator=gen_ref, **step_kwargs).prev_sample
        # The contract's step: the denoiser calls the model at plan.timesteps[i] and converts its
        # output with alpha_bar as a python float, as the pipeline did before the contract.
        noise = tuple(draw_noise(gen, x) for _ in range(sampler.noise_draws(plan, i, eta)))
        x, carry = sampler.step(denoiser, plan, i, x, None, noise, eta=eta)
        assert carry is None
        assert x.dtype == x_ref.dtype == dtype
        diff = (x.float() - x_ref.float()).abs().max().item()
        assert diff <= tol, f"step {i} (t={int(t)}): max |diff| {diff:.3g} > {tol}"
    # Both consumed the same number of draws iff the generators are still in the same state.
    for g_ref, g in zip(gen_ref, gen):
        assert torch.equal(g_ref.get_state(), g.get_state())


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddim_matches_diffusers(
    beta_schedule, prediction, spacing, eta, set_alpha_to_one, clip_sample, steps_offset, num_steps
):
    config = ScheduleConfig(
        beta_schedule=beta_schedule,
        prediction_type=prediction,
        timestep_spacing=spacing,
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=clip_sample,
        steps_offset=steps_offset,
    )
    assert_parity("ddim", config, num_steps, eta)


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_matches_diffusers(
    beta_schedule, prediction, spacing, variance_type, clip_sample, num_steps
):
    config = ScheduleConfig(
        beta_schedule=beta_schedule,
        prediction_type=prediction,
        timestep_spacing=spacing,
        variance_type=variance_type,
        clip_sample=clip_sample,
    )
    assert_parity("ddpm", config, num_steps, eta=0.0)


@pytest.mark.parametrize("num_steps", [4, 5])
@pytest.mark.parametrize("kind, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_zero_terminal_snr_matches_diffusers(kind, eta, set_alpha_to_one, num_steps):
    # Lin et al. 2024's recipe: rescaled betas, trailing timesteps, v-prediction.
    config = ScheduleConfig(
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        set_alpha_to_one=set_alpha_to_one,
    )
    assert_parity(kind, config, num_steps, eta)


@pytest.mark.parametrize("num_steps", [7, 50])
def test_ddim_eta_one_at_zero_terminal_snr_stays_finite(num_steps):
    # At alpha_bar_t = 0 and eta = 1, sigma_t^2 = 1 - alpha_bar_prev, so the direction term of
    # eq. 12 vanishes. In float32 the difference can round below 0: diffusers then returns NaN, we
    # return x_prev = sqrt(alpha_bar_prev) x0 + sigma_t z.
    config = ScheduleConfig(
        rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    )
    reference = DDIMScheduler.from_config(config.to_dict())
    reference.set_timesteps(num_steps)
    plan = SAMPLERS["ddim"].make_plan(train_schedule(config), num_steps)
    x = initial_latents()
    out = fake_model(x, plan.timesteps[0])
    noise = draw_noise(generators(3), x)
    t = reference.timesteps[0]
    x_ref = reference.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
    assert torch.isnan(x_ref).all()
    x0, eps = to_x0_eps(out, x, plan.alpha_bar[0], plan.prediction_type)
    x_prev = ddim_step(plan, 0, x, x0, eps, eta=1.0, noise=noise)
    a_prev = plan.alpha_bar_prev[0]
    assert torch.allclose(x_prev, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * noise, atol=1e-6)


@pytest.mark.parametrize("kind, eta", [("ddim", 0.5), ("ddpm", 0.0)])
def test_bfloat16_steps_match_diffusers(kind, eta):
    # The step arithmetic runs in the sample's dtype, as in diffusers, so bf16 rounding agrees too.
    config = ScheduleConfig(prediction_type="v_prediction", clip_sample=True)
    assert_parity(kind, config, 5, eta, dtype=torch.bfloat16, tol=0.0)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_alphas_cumprod_match_diffusers(beta_schedule, rescale):
    config = ScheduleConfig(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
    schedule = train_schedule(config)
    reference = DDPMScheduler.from_config(config.to_dict("DDPMScheduler"))
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == torch.float32
    assert schedule.betas.shape == schedule.alphas_cumprod.shape == (1000,)
    assert (schedule.alphas_cumprod - reference.alphas_cumprod).abs().max().item() <= 1e-7
    assert (schedule.betas - reference.betas).abs().max().item() <= 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 16)])
def test_add_noise_and_velocity_match_diffusers(dtype, shape):
    config = ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    schedule = train_schedule(config)
    reference = DDPMScheduler.from_config(config.to_dict("DDPMScheduler"))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    timesteps = torch.tensor([0, 500, 999])
    x_t = add_noise(schedule, x0, noise, timesteps)
    v = velocity(schedule, x0, noise, timesteps)
    assert x_t.dtype == v.dtype == dtype and x_t.shape == v.shape == shape
    assert torch.equal(x_t, reference.add_noise(x0, noise, timesteps))
    assert torch.equal(v, reference.get_velocity(x0, noise, timesteps))
    # The samples at t = 0 are hardly noised; at t = 999 they are almost pure noise.
    assert (x_t[0].float() - x0[0].float()).abs().max() < 0.05
    assert (x_t[2].float() - noise[2].float()).abs().max() < 0.1


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_schedule_properties(beta_schedule):
    schedule = train_schedule(ScheduleConfig(beta_schedule=beta_schedule))
    betas, alpha_bar = schedule.betas, schedule.alphas_cumprod
    assert ((betas > 0) & (betas < 1)).all()
    assert ((alpha_bar > 0) & (alpha_bar <= 1)).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()


def test_zero_terminal_snr_properties():
    plain = train_schedule(ScheduleConfig())
    rescaled = train_schedule(ScheduleConfig(rescale_betas_zero_snr=True))
    alpha_bar = rescaled.alphas_cumprod
    assert alpha_bar[-1] == 0  # SNR_T = alpha_bar_T / (1 - alpha_bar_T) = 0
    assert torch.allclose(alpha_bar[0], plain.alphas_cumprod[0])  # the first step is kept
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert ((rescaled.betas > 0) & (rescaled.betas <= 1)).all()


# 61 and 103: diffusers' "trailing" arange overshoots by one there; 1000: every training timestep.
PLAN_STEP_COUNTS = [1, 2, 3, 4, 7, 10, 50, 61, 103, 999, 1000]


@pytest.mark.parametrize("kind", VP_SAMPLERS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_plan_properties(kind, spacing):
    for steps_offset, set_alpha_to_one in itertools.product([0, 1], [True, False]):
        config = ScheduleConfig(
            timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one
        )
        schedule = train_schedule(config)
        for n in PLAN_STEP_COUNTS:
            if spacing == "leading" and steps_offset > 0 and n == 1000:
                continue  # would start at t = 1000; see test_leading_offset_beyond_last_timestep
            plan = SAMPLERS[kind].make_plan(schedule, n)
            assert isinstance(plan, SamplingPlan) and len(plan) == n
            t = plan.timesteps
            assert t.dtype == torch.int64 and t.shape == (n,)
            assert plan.alpha_bar.dtype == plan.alpha_bar_prev.dtype == torch.float32
            assert plan.alpha_bar.shape == plan.alpha_bar_prev.shape == (n,)
            assert (t[1:] < t[:-1]).all() and t.min() >= 0 and t.max() < 1000
            assert (plan.prev_timesteps < t).all()
            assert (plan.alpha_bar_prev >= plan.alpha_bar).all()
            assert torch.equal(plan.alpha_bar, schedule.alphas_cumprod[t])


@pytest.mark.parametrize("spacing", SPACINGS)
def test_plan_timesteps_match_diffusers_for_many_step_counts(spacing):
    config = ScheduleConfig(timestep_spacing=spacing)
    reference = DDIMScheduler.from_config(config.to_dict())
    schedule = train_schedule(config)
    for n in PLAN_STEP_COUNTS[:-1]:
        reference.set_timesteps(n)
        plan = SAMPLERS["ddim"].make_plan(schedule, n)
        # For "trailing" with n = 61 or 103 diffusers returns n + 1 timesteps ending in -1;
        # the first n agree and the spurious last one is dropped.
        assert torch.equal(plan.timesteps, reference.timesteps[:n])


def test_final_alpha_bar_rules():
    schedule = train_schedule(ScheduleConfig(set_alpha_to_one=False))
    alpha_bar_0 = schedule.alphas_cumprod[0]
    assert SAMPLERS["ddim"].make_plan(schedule, 10).alpha_bar_prev[-1] == alpha_bar_0
    assert SAMPLERS["ddpm"].make_plan(schedule, 10).alpha_bar_prev[-1] == 1.0
    schedule = train_schedule(ScheduleConfig(set_alpha_to_one=True))
    assert SAMPLERS["ddim"].make_plan(schedule, 10).alpha_bar_prev[-1] == 1.0


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_to_x0_eps_round_trip(prediction):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    alpha_bar = torch.tensor([0.9, 0.2])  # one noise level per sample
    a = alpha_bar.view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    target = {"epsilon": eps, "sample": x0, "v_prediction": v}[prediction]
    for alpha_bar_t in (alpha_bar, a):
        x0_hat, eps_hat = to_x0_eps(target, x_t, alpha_bar_t, prediction)
        assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)
    # A single noise level as a python float, a 0-d tensor and in bf16.
    x_t0 = x_t[:1]
    for alpha_bar_t in (0.9, torch.tensor(0.9)):
        x0_hat, eps_hat = to_x0_eps(target[:1], x_t0, alpha_bar_t, prediction)
        assert torch.allclose(x0_hat, x0[:1], atol=1e-5)
        assert torch.allclose(eps_hat, eps[:1], atol=1e-5)
    x0_hat, eps_hat = to_x0_eps(target.bfloat16(), x_t.bfloat16(), a, prediction)
    assert x0_hat.dtype == eps_hat.dtype == torch.bfloat16
    assert torch.allclose(x0_hat.float(), x0, atol=0.1)
    assert torch.allclose(eps_hat.float(), eps, atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_to_x0_eps_same_for_every_alpha_bar_form(prediction, dtype):
    # A python float, a 0-d tensor, a (B,) and a (B, 1, 1, 1) tensor of one float32 value agree, bit
    # for bit in float32; the result stays in the sample's dtype.
    g = torch.Generator().manual_seed(4)
    x_t, out = torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)
    alpha_bar = train_schedule(ScheduleConfig()).alphas_cumprod[321]
    forms = [float(alpha_bar), alpha_bar, alpha_bar.repeat(2), alpha_bar.repeat(2).view(2, 1, 1, 1)]
    results = [to_x0_eps(out, x_t, a, prediction) for a in forms]
    tol = 0.0 if dtype == torch.float32 else 0.05  # bf16 products may round the coefficient first
    for x0, eps in results:
        assert x0.dtype == eps.dtype == dtype
        assert (x0.float() - results[0][0].float()).abs().max() <= tol
        assert (eps.float() - results[0][1].float()).abs().max() <= tol


def run_generation(sampler, plan, eta, seed):
    """A whole trajectory, yielding the sample after each step (so that runs can be interleaved)."""
    x, gen, carry = initial_latents(), generators(seed), None
    denoiser = make_denoiser(fake_model, train_schedule(ScheduleConfig(
        prediction_type=plan.prediction_type)), plan.prediction_type)
    for i in range(len(plan)):
        noise = tuple(draw_noise(gen, x) for _ in range(sampler.noise_draws(plan, i, eta)))
        x, carry = sampler.step(denoiser, plan, i, x, carry, noise, eta=eta)
        yield x


@pytest.mark.parametrize("kind, eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_one_sampler_serves_interleaved_generations(kind, eta):
    sampler = get_sampler(kind)
    schedule = train_schedule(ScheduleConfig(prediction_type="v_prediction"))
    plan_a, plan_b = sampler.make_plan(schedule, 5), sampler.make_plan(schedule, 9)
    alone_a = list(run_generation(sampler, plan_a, eta, seed=1))
    alone_b = list(run_generation(sampler, plan_b, eta, seed=2))
    run_a = run_generation(sampler, plan_a, eta, seed=1)
    run_b = run_generation(sampler, plan_b, eta, seed=2)
    together_a, together_b = [], []
    for i in range(9):
        together_b.append(next(run_b))
        if i < 5:
            together_a.append(next(run_a))
    assert all(torch.equal(p, q) for p, q in zip(alone_a, together_a, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(alone_b, together_b, strict=True))
    # A later plan with the same step count is interchangeable with the first one.
    again = list(run_generation(sampler, sampler.make_plan(schedule, 5), eta, seed=1))
    assert torch.equal(again[-1], alone_a[-1])


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="unknown sampler 'euler_b'; valid samplers: ddim, ddpm, "
                       ".*euler, euler_karras, .*dpmpp_2m_karras"):
        get_sampler("euler_b")
    assert get_sampler("ddim").name == "ddim" and get_sampler("ddpm") is SAMPLERS["ddpm"]


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
@pytest.mark.parametrize("num_steps", [0, -1, 1001])
def test_bad_step_counts(kind, num_steps):
    message = rf"num_steps={num_steps} is invalid.*between 1 and num_train_timesteps=1000"
    with pytest.raises(ValueError, match=message):
        SAMPLERS[kind].make_plan(train_schedule(ScheduleConfig()), num_steps)


def test_leading_offset_beyond_last_timestep():
    # 1000 leading steps with steps_offset=1 would call the model at t = 1000 (diffusers would index
    # past the end of alphas_cumprod).
    with pytest.raises(ValueError, match="t=1000, outside"):
        SAMPLERS["ddim"].make_plan(train_schedule(ScheduleConfig(steps_offset=1)), 1000)
    schedule = train_schedule(ScheduleConfig(steps_offset=0))
    assert len(SAMPLERS["ddim"].make_plan(schedule, 1000)) == 1000


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("beta_schedule", "cosine",
         "beta_schedule='cosine' is invalid; "
         "valid values: linear, scaled_linear, squaredcos_cap_v2"),
        ("prediction_type", "v",
         "prediction_type='v' is invalid; valid values: epsilon, v_prediction, sample"),
        ("timestep_spacing", "even",
         "timestep_spacing='even' is invalid; valid values: leading, trailing, linspace"),
        ("variance_type", "learned_range",
         "variance_type='learned_range' is invalid; valid values: fixed_small, fixed_large"),
        ("num_train_timesteps", 0, "num_train_timesteps=0 is invalid"),
        ("num_train_timesteps", 1000.0, "num_train_timesteps=1000.0 is invalid"),
        ("steps_offset", -1, "steps_offset=-1 is invalid"),
        ("beta_start", "0.1", "beta_start='0.1' is invalid"),
        ("beta_end", 1.5, "beta_end=1.5 is invalid"),
        ("beta_start", 0.5, "beta_start=0.5 is larger than beta_end=0.012"),
        ("clip_sample_range", 0.0, "clip_sample_range=0.0 is invalid"),
        ("clip_sample", "yes", "clip_sample='yes' is invalid; valid values: true, false"),
    ],
)
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ScheduleConfig.from_dict({**SD15_PNDM_CONFIG, field: value})


def test_unsupported_config_keys():
    with pytest.raises(ValueError, match="trained_betas is not supported"):
        ScheduleConfig.from_dict({**SD15_PNDM_CONFIG, "trained_betas": [0.001] * 1000})
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        ScheduleConfig.from_dict({**SD15_PNDM_CONFIG, "thresholding": True})
    with pytest.raises(ValueError, match="must be a JSON object"):
        ScheduleConfig.from_dict([1, 2])


def test_missing_noise_is_an_error():
    schedule = train_schedule(ScheduleConfig())
    x = initial_latents()
    ddim = SAMPLERS["ddim"].make_plan(schedule, 4)
    with pytest.raises(ValueError, match="ddim step 0 adds variance noise, but noise=None"):
        ddim_step(ddim, 0, x, x, x, eta=0.5)
    ddim_step(ddim, 0, x, x, x, eta=0.0)  # deterministic DDIM needs none
    with pytest.raises(ValueError, match="noise has shape"):
        ddim_step(ddim, 0, x, x, x, eta=0.5, noise=x[:1])
    with pytest.raises(ValueError, match="eta=-0.1 is invalid"):
        ddim_step(ddim, 0, x, x, x, eta=-0.1)
    with pytest.raises(IndexError, match="step index 4 is out of range"):
        ddim_step(ddim, 4, x, x, x)
    ddpm = SAMPLERS["ddpm"].make_plan(train_schedule(ScheduleConfig(steps_offset=0)), 4)
    needs = [SAMPLERS["ddpm"].noise_draws(ddpm, i, 0.0) for i in range(4)]
    assert needs == [1, 1, 1, 0] == [int(ddpm_needs_noise(ddpm, i)) for i in range(4)]
    with pytest.raises(ValueError, match="ddpm step 2 adds variance noise, but noise=None"):
        ddpm_step(ddpm, 2, x, x, x)
    ddpm_step(ddpm, 3, x, x, x)  # t = 0: the last step adds no noise


@pytest.mark.parametrize("kind, cls", [("ddim", DDIMScheduler), ("ddpm", DDPMScheduler)])
def test_to_dict_round_trips_through_diffusers(kind, cls):
    config = ScheduleConfig(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=0,
        clip_sample=True,
        clip_sample_range=2.5,
        variance_type="fixed_large",
        set_alpha_to_one=True,
    )
    d = config.to_dict(cls.__name__)
    assert d["_class_name"] == cls.__name__
    json.dumps(d)  # writable as scheduler_config.json
    reference = cls.from_config(d)
    assert torch.equal(reference.alphas_cumprod, train_schedule(config).alphas_cumprod)
    reference.set_timesteps(7)
    plan = SAMPLERS[kind].make_plan(train_schedule(config), 7)
    assert torch.equal(reference.timesteps, plan.timesteps)
    for key in ("prediction_type", "timestep_spacing", "clip_sample", "clip_sample_range"):
        assert reference.config[key] == getattr(config, key)
    assert ScheduleConfig.from_dict(d) == config


def test_from_dict_reads_the_sd15_pndm_config(tmp_path):
    config = ScheduleConfig.from_dict(SD15_PNDM_CONFIG)
    assert config == ScheduleConfig()  # the defaults are SD 1.x's
    reference = DDIMScheduler.from_config(SD15_PNDM_CONFIG)
    assert torch.equal(reference.alphas_cumprod, train_schedule(config).alphas_cumprod)
    reference.set_timesteps(50)
    plan = SAMPLERS["ddim"].make_plan(train_schedule(config), 50)
    assert torch.equal(reference.timesteps, plan.timesteps)
    assert int(reference.timesteps[0]) == 981 and int(reference.timesteps[-1]) == 1

    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(SD15_PNDM_CONFIG))
    assert load_schedule_config(path) == config
    assert load_schedule_config(path.parent) == config
    euler = {
        **SD15_PNDM_CONFIG,
        "_class_name": "EulerDiscreteScheduler",
        "use_karras_sigmas": False,
        "interpolation_type": "linear",
        "timestep_spacing": "trailing",
    }
    path.write_text(json.dumps(euler))
    assert load_schedule_config(path) == dataclasses.replace(config, timestep_spacing="trailing")


def test_load_schedule_config_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_schedule_config(missing)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_schedule_config(bad_json)
    bad_value = tmp_path / "bad_value.json"
    bad_value.write_text(json.dumps({**SD15_PNDM_CONFIG, "beta_schedule": "cosine"}))
    with pytest.raises(ValueError, match="bad_value.json: beta_schedule='cosine' is invalid"):
        load_schedule_config(bad_value)


@pytest.mark.gpu  # skipped without CUDA by conftest.py
@pytest.mark.parametrize("kind, eta", [("ddim", 0.5), ("ddpm", 0.0)])
def test_steps_run_on_the_sample_device(kind, eta):
    # The plan stays on the CPU; its per-step values enter the CUDA kernels as scalars.
    sampler = get_sampler(kind)
    schedule = train_schedule(ScheduleConfig(prediction_type="v_prediction"))
    plan = sampler.make_plan(schedule, 4)
    denoiser = make_denoiser(fake_model, schedule, "v_prediction")
    x_cpu = initial_latents()
    x_gpu = x_cpu.cuda()
    for i in range(len(plan)):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        noise = (noise,) * sampler.noise_draws(plan, i, eta)
        x_cpu, _ = sampler.step(denoiser, plan, i, x_cpu, None, noise, eta=eta)
        x_gpu, _ = sampler.step(denoiser, plan, i, x_gpu, None, tuple(z.cuda() for z in noise),
                                eta=eta)
        assert x_gpu.device.type == "cuda"
        assert torch.allclose(x_gpu.cpu(), x_cpu, atol=1e-5)
