"""diffusers schedulers driving this engine's loop (schedulers/diffusers_adapter.py).

- DDIMScheduler through the adapter equals our ddim bit for bit (both are diffusers' arithmetic).
- EulerDiscreteScheduler through the adapter equals our euler step for step from the same x to
  2e-6 relative: diffusers divides by sqrt(sigma^2 + 1) as a float32 tensor, our denoiser
  multiplies by c_in computed in float64, so the UNet input differs by about one ulp.
- The template a plan holds is never mutated, an instance given in is never mutated, and a
  plan run twice (or from two threads) gives the same result.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
)

from ldm_engine.errors import UserInputError
from pipelines.loop import denoise, per_image_noise
from pipelines.params import check_request
from schedulers import ScheduleConfig, get_sampler, make_denoiser, train_schedule

CONFIG = ScheduleConfig()
SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def denoiser(tiny_components):
    unet = tiny_components.unet.eval()
    cond = torch.randn(1, 5, unet.config.cross_attention_dim,
                       generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def model(x, t):
        return unet(x, t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1)).sample
    return make_denoiser(model, train_schedule(CONFIG), CONFIG.prediction_type)


def _run(denoiser, name, steps, seeds=(1, 2), eta=0.0):
    sampler = get_sampler(name)
    plan = sampler.make_plan(train_schedule(CONFIG), steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = per_image_noise((len(seeds), *SHAPE[1:]), gens, device=torch.device("cpu"),
                        dtype=torch.float32) * plan.init_noise_sigma
    return denoise(denoiser, x, sampler=sampler, plan=plan, generators=gens, eta=eta,
                   progress=False)


@pytest.mark.parametrize("steps", [1, 4])
def test_adapter_with_ddim_equals_our_ddim_bitwise(denoiser, steps):
    ours = _run(denoiser, "ddim", steps)
    theirs = _run(denoiser, "diffusers:DDIMScheduler", steps)
    assert torch.equal(ours, theirs)
    assert ours.std() > 0.1


def test_adapter_with_euler_equals_our_euler_step_for_step(denoiser):
    schedule = train_schedule(CONFIG)
    ours, theirs = get_sampler("euler"), get_sampler("diffusers:EulerDiscreteScheduler")
    p_ours, p_theirs = ours.make_plan(schedule, 4), theirs.make_plan(schedule, 4)
    assert torch.equal(p_ours.timesteps, p_theirs.timesteps.float())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(p_ours.sigmas[0])
    carry_a = carry_b = None
    xa = xb = x
    for i in range(4):
        xa, carry_a = ours.step(denoiser, p_ours, i, xa, carry_a, (), eta=0.0)
        # EulerDiscrete's step takes a generator (for s_churn), so the adapter asks for a draw.
        z = tuple(torch.randn(SHAPE) for _ in range(theirs.noise_draws(p_theirs, i, 0.0)))
        xb, carry_b = theirs.step(denoiser, p_theirs, i, xb, carry_b, z, eta=0.0)
        scale = xb.abs().max()
        assert (xa - xb).abs().max() <= 2e-6 * scale, f"step {i}"
        xb = xa               # step for step: both continue from the same sample


def test_plans_and_instances_are_never_mutated(denoiser):
    instance = EulerAncestralDiscreteScheduler.from_config(dataclasses.asdict(CONFIG))
    before = copy.deepcopy(instance.__dict__)
    sampler = get_sampler(instance)
    assert sampler.name == "diffusers:EulerAncestralDiscreteScheduler"
    plan = sampler.make_plan(train_schedule(CONFIG), 3)
    template = copy.deepcopy(plan.template.__dict__)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x = per_image_noise(SHAPE, gens, device=torch.device("cpu"), dtype=torch.float32)
    x = x * plan.init_noise_sigma
    first = denoise(denoiser, x, sampler=sampler, plan=plan,
                    generators=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
                    progress=False)
    again = denoise(denoiser, x, sampler=sampler, plan=plan,
                    generators=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
                    progress=False)
    assert torch.equal(first, again)
    for state, now in ((template, plan.template.__dict__), (before, instance.__dict__)):
        assert state.keys() == now.keys()
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, now[k]), k
            else:
                assert str(v) == str(now[k]), k
    assert plan.template.step_index is None


def test_stochastic_scheduler_keeps_images_independent_of_the_batch(denoiser):
    pair = _run(denoiser, "diffusers:EulerAncestralDiscreteScheduler", 3, seeds=(1, 2))
    alone = _run(denoiser, "diffusers:EulerAncestralDiscreteScheduler", 3, seeds=(2,))
    other = _run(denoiser, "diffusers:EulerAncestralDiscreteScheduler", 3, seeds=(3, 2))
    # Same batch size: bitwise; alone vs in a batch: the UNet's batched kernels round differently.
    assert torch.equal(other[1:], pair[1:])
    assert torch.allclose(pair[1:], alone, rtol=0, atol=1e-5)
    assert not torch.equal(pair[:1], other[:1])


def test_one_plan_serves_threads(denoiser):
    sampler = get_sampler("diffusers:DDIMScheduler")
    plan = sampler.make_plan(train_schedule(CONFIG), 3)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x = per_image_noise(SHAPE, gens, device=torch.device("cpu"), dtype=torch.float32)
    alone = denoise(denoiser, x, sampler=sampler, plan=plan, generators=gens, progress=False)
    out = [None] * 4
    start = threading.Barrier(4)

    def work(k):
        start.wait()
        out[k] = denoise(denoiser, x, sampler=sampler, plan=plan, generators=gens,
                         progress=False)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, alone) for o in out)


def test_heun_plans_count_every_model_call():
    sampler = get_sampler(HeunDiscreteScheduler.from_config(dataclasses.asdict(CONFIG)))
    plan = sampler.make_plan(train_schedule(CONFIG), 5)
    assert len(plan) == 9 and sampler.total_model_calls(plan) == 9


def test_bad_adapter_requests_are_one_line_user_errors():
    kw = dict(steps=3, guidance_scale=7.0, eta=0.0, height=64, width=64, vae_factor=4,
              schedule=CONFIG)
    with pytest.raises(UserInputError, match="diffusers has no scheduler class 'NoSuchScheduler'"):
        check_request(sampler="diffusers:NoSuchScheduler", **kw)
    with pytest.raises(UserInputError, match="no scheduler class 'os'"):
        check_request(sampler="diffusers:os", **kw)
    check_request(sampler="diffusers:EulerDiscreteScheduler", **kw)
    other = DDIMScheduler(beta_schedule="linear")
    with pytest.raises(ValueError, match="another training noise schedule"):
        get_sampler(other).make_plan(train_schedule(CONFIG), 3)
    with pytest.raises(ValueError, match="no 'karras' variant"):
        get_sampler("diffusers:DDIMScheduler").stepper.make_plan(train_schedule(CONFIG), 3,
                                                                   "karras")


def test_pipeline_takes_a_name_or_an_instance_and_records_the_name(tiny_dir):
    from pipelines import TextToImage

    pipe = TextToImage.from_folder(tiny_dir)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, seed=4, height=32, width=32,
              progress=False)
    ours = pipe("a red circle", sampler="ddim", **kw)
    by_name = pipe("a red circle", sampler="diffusers:DDIMScheduler", **kw)
    instance = DDIMScheduler.from_config(dataclasses.asdict(pipe.components.schedule))
    by_instance = pipe("a red circle", sampler=instance, **kw)
    assert torch.equal(ours.latents, by_name.latents)
    assert torch.equal(ours.latents, by_instance.latents)
    assert by_instance.params[0].sampler == "diffusers:DDIMScheduler"
    assert "Sampler: \"diffusers:DDIMScheduler\"" in by_instance.params[0].to_png_text()
