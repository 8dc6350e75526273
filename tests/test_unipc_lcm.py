"""UniPC and LCM against diffusers' UniPCMultistepScheduler and LCMScheduler, step for step.

Tolerance: none. Both are computed with diffusers' float32 tensor operations in diffusers' order
(the plans hold the per-step scalars as 0-d float32 tensors), so every step is compared with
torch.equal on the CPU, on a tiny random UNet, for eps / v prediction and leading / trailing /
linspace spacing (trailing with zero-terminal-SNR rescaling). k-diffusion has no UniPC or LCM, so
diffusers is the one reference (UniPC's own repository is what diffusers' implementation follows).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import LCMScheduler, UniPCMultistepScheduler

from pipelines.loop import denoise, per_image_noise
from schedulers import ScheduleConfig, get_sampler, make_denoiser, train_schedule
from schedulers.lcm import lcm_timesteps
from schedulers.unipc import UniPCCarry

CONFIGS = {
    "sd15": ScheduleConfig(),
    "v_trailing_zero_snr": ScheduleConfig(prediction_type="v_prediction",
                                          timestep_spacing="trailing", steps_offset=0,
                                          rescale_betas_zero_snr=True),
    "linspace_eps": ScheduleConfig(timestep_spacing="linspace", steps_offset=0),
}


@pytest.fixture(scope="module")
def model(tiny_components):
    unet = tiny_components.unet.eval()
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    calls = []

    @torch.no_grad()
    def fn(x, t):
        calls.append(t)
        return unet(x, t, encoder_hidden_states=cond).sample
    fn.calls = calls
    return fn


def _latents(unet_like_shape=(2, 4, 8, 8), seed=0):
    return torch.randn(unet_like_shape, generator=torch.Generator().manual_seed(seed))


def _diffusers(cls, config: ScheduleConfig):
    return cls.from_config(dataclasses.asdict(config))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_unipc_equals_diffusers_bitwise_every_step(model, name, steps):
    config = CONFIGS[name]
    ref = _diffusers(UniPCMultistepScheduler, config)
    ref.set_timesteps(steps)
    sampler = get_sampler("unipc")
    plan = sampler.make_plan(train_schedule(config), steps)
    assert torch.equal(plan.timesteps, ref.timesteps)
    assert torch.equal(plan.sigmas, ref.sigmas)
    denoiser = make_denoiser(model, train_schedule(config), config.prediction_type)
    x_ref = x = _latents()
    carry = None
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(model(x_ref, t), t, x_ref).prev_sample
        x, carry = sampler.step(denoiser, plan, i, x, carry, (), eta=0.0)
        assert isinstance(carry, UniPCCarry)
        assert torch.equal(x, x_ref), f"step {i}: {(x - x_ref).abs().max()}"
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_equals_diffusers_bitwise_with_the_same_generators(model, name, steps):
    config = CONFIGS[name]
    ref = _diffusers(LCMScheduler, config)
    ref.set_timesteps(steps)
    sampler = get_sampler("lcm")
    schedule = train_schedule(config)
    plan = sampler.make_plan(schedule, steps)
    assert torch.equal(plan.timesteps, ref.timesteps)
    denoiser = make_denoiser(model, schedule, config.prediction_type)
    shape = (2, 4, 8, 8)
    # diffusers' pipeline: initial latents, then one draw per step, per image generator.
    ref_gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    x_ref = per_image_noise(shape, ref_gens, device=torch.device("cpu"), dtype=torch.float32)
    for t in ref.timesteps:
        x_ref = ref.step(model(x_ref, t), t, x_ref, generator=ref_gens).prev_sample
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    x = per_image_noise(shape, gens, device=torch.device("cpu"), dtype=torch.float32)
    x = denoise(denoiser, x, sampler=sampler, plan=plan, generators=gens, progress=False)
    assert torch.equal(x, x_ref)
    assert sum(sampler.noise_draws(plan, i, 0.0) for i in range(steps)) == steps - 1


def test_lcm_spacing_is_its_own_and_bounded():
    with pytest.raises(ValueError, match="eps-predicting model cannot be sampled"):
        get_sampler("lcm").make_plan(train_schedule(ScheduleConfig(
            rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)), 4)
    schedule = train_schedule(ScheduleConfig())
    assert lcm_timesteps(schedule, 4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(schedule, 1).tolist() == [999]
    with pytest.raises(ValueError, match="at most 50"):
        get_sampler("lcm").make_plan(schedule, 51)


def test_unipc_calls_the_model_once_per_step_at_integer_timesteps(model):
    config = ScheduleConfig()
    sampler = get_sampler("unipc")
    plan = sampler.make_plan(train_schedule(config), 5)
    assert sampler.total_model_calls(plan) == 5
    denoiser = make_denoiser(model, train_schedule(config), "epsilon")
    model.calls.clear()
    denoise(denoiser, _latents(), sampler=sampler, plan=plan, generators=[torch.Generator()] * 2,
            progress=False)
    assert [int(t) for t in model.calls] == plan.timesteps.tolist()
    assert all(t.dtype == torch.int64 for t in model.calls)


def test_unipc_needs_the_carry_and_refuses_spacings(model):
    config = ScheduleConfig()
    sampler = get_sampler("unipc")
    schedule = train_schedule(config)
    plan = sampler.make_plan(schedule, 3)
    denoiser = make_denoiser(model, schedule, "epsilon")
    with pytest.raises(ValueError, match="needs the carry"):
        sampler.step(denoiser, plan, 1, _latents(), None, (), eta=0.0)
    with pytest.raises(ValueError, match="no 'karras' variant"):
        sampler.stepper.make_plan(schedule, 3, "karras")
    with pytest.raises(ValueError, match="distinct timesteps"):
        sampler.make_plan(schedule, 999)          # leading + steps_offset 1 reaches t = 1000
