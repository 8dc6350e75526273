"""The sigma samplers against k-diffusion's sample_* functions and diffusers' schedulers.

A fixed smooth function of (x, t) stands in for the UNet (fractional t matters: it is what the
log-sigma interpolation feeds the network), on (2, 4, 8, 8) latents, with the same starting
latents and the same per-image noise for every implementation. k-diffusion gets our plan's
sigmas and a noise_sampler that draws from the same per-image generators our loop draws from.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from pipelines.loop import denoise, per_image_noise
from schedulers import (
    SAMPLERS,
    SIGMA_SPACINGS,
    ScheduleConfig,
    SigmaPlan,
    get_sampler,
    make_denoiser,
    sigma_table,
    train_schedule,
)
import kdiffusion_ref

K_SAMPLING, K_EXTERNAL = kdiffusion_ref.load()
# diffusers' set_timesteps trips numpy 2's __array__(copy=) deprecation thousands of times.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

SHAPE = (2, 4, 8, 8)
STEPPERS = ["euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde",
            "dpmpp_sde", "dpmpp_2s_a"]
K_FUNCTION = {"euler": "sample_euler", "euler_a": "sample_euler_ancestral",
              "heun": "sample_heun", "dpm2": "sample_dpm_2", "dpm2_a": "sample_dpm_2_ancestral",
              "lms": "sample_lms", "dpmpp_2m": "sample_dpmpp_2m",
              "dpmpp_2m_sde": "sample_dpmpp_2m_sde", "dpmpp_sde": "sample_dpmpp_sde",
              "dpmpp_2s_a": "sample_dpmpp_2s_ancestral"}
STOCHASTIC = {"euler_a", "dpm2_a", "dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2s_a"}


def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth function of the scaled input and the (fractional) timestep."""
    t = t.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.8 * x + t / 700.0) * 1.3 + 0.1 * torch.sin(3.0 * x)


def gens(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + b) for b in range(SHAPE[0])]


def start(plan) -> torch.Tensor:
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    return z * plan.init_noise_sigma


def k_denoiser(schedule, prediction):
    """k-diffusion's discrete-DDPM wrapper around `net`, on the same (clamped) sigma table."""
    sigmas = sigma_table(schedule)
    alphas_cumprod = 1 / (sigmas**2 + 1)
    cls = (K_EXTERNAL.DiscreteEpsDDPMDenoiser if prediction == "epsilon"
           else K_EXTERNAL.DiscreteVDDPMDenoiser)
    return cls(net, alphas_cumprod, quantize=False)


def ours(name, config, steps, eta, seed=100, model=None):
    """Our loop: (final x, [x after each step])."""
    schedule = train_schedule(config)
    sampler = get_sampler(name)
    plan = sampler.make_plan(schedule, steps)
    after = []
    model = net if model is None else model
    x = denoise(make_denoiser(model, schedule, config.prediction_type), start(plan),
                sampler=sampler, plan=plan, generators=gens(seed), eta=eta,
                on_step=lambda i, x: after.append(x) or x, progress=False)
    return plan, x, after


def k_reference(name, config, plan, eta, seed=100):
    """k-diffusion's sample_* on our plan's sigmas: (final x, [x at the start of each step])."""
    schedule = train_schedule(config)
    fn = getattr(K_SAMPLING, K_FUNCTION[get_sampler(name).stepper.name])
    g = gens(seed)
    seen = []
    kw = {"callback": lambda d: seen.append(d["x"].clone()), "disable": True}
    if get_sampler(name).stepper.name in STOCHASTIC:
        kw |= {"eta": eta, "noise_sampler": lambda s, s_next: per_image_noise(
            SHAPE, g, device=torch.device("cpu"), dtype=torch.float32)}
    x = fn(k_denoiser(schedule, config.prediction_type), start(plan), plan.sigmas, **kw)
    return x, seen


CONFIGS = {
    "sd15_eps": ScheduleConfig(),
    "v_pred_linspace": ScheduleConfig(prediction_type="v_prediction", timestep_spacing="linspace"),
    "zero_snr_v_trailing": ScheduleConfig(prediction_type="v_prediction",
                                          timestep_spacing="trailing",
                                          rescale_betas_zero_snr=True),
}


def _tol(*xs: torch.Tensor, rel: float = 2e-5) -> float:
    # float32 arithmetic in a different order (python-float vs 0-d float32 coefficients) gives a
    # few ulps of the largest magnitude in play: the step's input (x at sigma_max = 4096 z for
    # zero terminal SNR loses ~ulp(4096) = 5e-4 to cancellation), compounded over the steps.
    return rel * max(1.0, *(float(x.abs().max()) for x in xs))


@pytest.mark.parametrize("spacing", [None, "karras", "exponential", "normal"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("stepper", STEPPERS)
def test_matches_k_diffusion_step_for_step(stepper, config_name, spacing):
    name = stepper if spacing is None else f"{stepper}_{spacing}"
    config = CONFIGS[config_name]
    eta = 1.0 if stepper in STOCHASTIC else 0.0
    plan, x, after = ours(name, config, 6, eta)
    x_ref, seen = k_reference(name, config, plan, eta)
    assert len(seen) == len(plan)
    rel = 2e-5
    if stepper == "dpm2_a" and config.rescale_betas_zero_snr:
        # Ill-conditioned in float32, for any implementation: from sigma_0 = 4096 the ancestral
        # split's sigma_down = sqrt(sigma_1^2 - sigma_up^2) ~ 0.02 cancels (k-diffusion computes
        # it in float32, we in float64), and the 4096-long DPM2 step multiplies the slope's
        # rounding by 4096; in float64 the two agree to 1e-9 (test_dpm2_a_zero_snr_in_float64).
        rel = 5e-4
    # seen[i + 1] is k-diffusion's x after step i.
    for i, (a, b) in enumerate(zip(after[:-1], seen[1:], strict=True)):
        diff = float((a - b).abs().max())
        assert diff <= _tol(*seen[:i + 2], rel=rel), f"{name} step {i}: max |diff| {diff:.3g}"
    diff = float((x - x_ref).abs().max())
    assert diff <= _tol(x_ref, *seen, rel=rel), f"{name} final: max |diff| {diff:.3g}"
    assert x.abs().max() < 50 and torch.isfinite(x).all()


@pytest.mark.parametrize("eta", [0.5, 3.0])
@pytest.mark.parametrize("stepper", sorted(STOCHASTIC))
def test_other_etas_match_k_diffusion(stepper, eta):
    # eta > 1 makes sigma_up = sigma_next, sigma_down = 0 at some steps (x -> x0 plus noise).
    config = CONFIGS["sd15_eps"]
    plan, x, _ = ours(f"{stepper}_karras", config, 6, eta)
    x_ref, seen = k_reference(f"{stepper}_karras", config, plan, eta)
    assert torch.isfinite(x).all()
    assert float((x - x_ref).abs().max()) <= _tol(x_ref, *seen)


def test_dpm2_a_zero_snr_in_float64():
    config = CONFIGS["zero_snr_v_trailing"]
    schedule = train_schedule(config)
    sampler = get_sampler("dpm2_a")
    plan = sampler.make_plan(schedule, 6)
    x = start(plan).double()
    ours_x = denoise(make_denoiser(net, schedule, "v_prediction"), x, sampler=sampler, plan=plan,
                     generators=gens(100), eta=1.0, progress=False)
    alphas_cumprod = 1 / (sigma_table(schedule).double() ** 2 + 1)
    g = gens(100)
    ref = K_SAMPLING.sample_dpm_2_ancestral(
        K_EXTERNAL.DiscreteVDDPMDenoiser(net, alphas_cumprod, quantize=False), x,
        plan.sigmas.double(), eta=1.0, disable=True,
        noise_sampler=lambda s, s_next: per_image_noise(SHAPE, g, device=torch.device("cpu"),
                                                        dtype=torch.float64))
    assert ours_x.dtype == torch.float64
    assert float((ours_x - ref).abs().max()) <= 1e-9


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_denoiser_recovers_x0_for_every_parameterisation(prediction):
    # A network that outputs the exact training target of (x0, eps) at noise level sigma gives
    # back x0: D(x0 + sigma eps, sigma) = x0 (EDM Table 1 with sigma_data = 1).
    schedule = train_schedule(ScheduleConfig(prediction_type=prediction))
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for sigma in (0.03, 1.0, 14.6):
        a = 1 / (sigma**2 + 1)                 # alpha_bar of this sigma
        target = {"epsilon": eps, "sample": x0,
                  "v_prediction": a**0.5 * eps - (1 - a) ** 0.5 * x0}[prediction]
        seen = []

        def oracle(x_in, t, target=target, a=a):
            # The network sees the VP sample sqrt(a) x0 + sqrt(1 - a) eps.
            seen.append((x_in, float(t)))
            return target

        d = make_denoiser(oracle, schedule, prediction)
        out = d(x0 + sigma * eps, sigma)
        assert torch.allclose(out, x0, atol=1e-5 * max(1, sigma))
        assert torch.allclose(seen[0][0], a**0.5 * x0 + (1 - a) ** 0.5 * eps, atol=1e-5)
        assert 0 <= seen[0][1] <= 999


@pytest.mark.parametrize("stepper", sorted(STOCHASTIC))
def test_stochastic_samplers_use_their_noise(stepper):
    config = CONFIGS["sd15_eps"]
    _, a, _ = ours(stepper, config, 5, 1.0, seed=1)
    _, b, _ = ours(stepper, config, 5, 1.0, seed=2)
    _, c, _ = ours(stepper, config, 5, 0.0, seed=1)
    _, d, _ = ours(stepper, config, 5, 0.0, seed=2)
    assert (a - b).abs().max() > 1e-2       # eta 1: the seed changes the result
    assert torch.equal(c, d)                # eta 0: no noise is drawn at all


def test_spacings_match_k_diffusion():
    schedule = train_schedule(ScheduleConfig())
    table = sigma_table(schedule)
    s_min, s_max = float(table[0]), float(table[-1])
    reference = {
        "karras": K_SAMPLING.get_sigmas_karras(10, s_min, s_max),
        "exponential": K_SAMPLING.get_sigmas_exponential(10, s_min, s_max),
        "polyexponential": K_SAMPLING.get_sigmas_polyexponential(10, s_min, s_max),
    }
    k_schedule = K_EXTERNAL.DiscreteEpsDDPMDenoiser(net, schedule.alphas_cumprod, False)
    reference["normal"] = k_schedule.get_sigmas(10)
    assert set(reference) == set(SIGMA_SPACINGS)
    for spacing, sigmas in reference.items():
        plan = get_sampler(f"euler_{spacing}").make_plan(schedule, 10)
        assert isinstance(plan, SigmaPlan) and plan.sigmas.dtype == torch.float32
        # k-diffusion evaluates in float32, we in float64 rounded once: a few float32 ulps.
        assert torch.allclose(plan.sigmas, sigmas, rtol=1e-6, atol=0), spacing
        assert plan.sigmas[-1] == 0 and (plan.sigmas[1:] < plan.sigmas[:-1]).all()
        t_ref = k_schedule.sigma_to_t(plan.sigmas[:-1])
        assert torch.allclose(plan.timesteps, t_ref, atol=1e-3), spacing
        if spacing == "normal":     # bit for bit: the same float32 operations
            assert torch.equal(plan.sigmas, sigmas)     # (10 steps: t = 999, 888, ..., 0)
        else:
            assert not torch.equal(plan.timesteps, plan.timesteps.round())   # fractional
        assert float(plan.timesteps[0]) == pytest.approx(999, abs=1e-3)


def test_karras_ends_at_the_training_range():
    # With diffusers' default "leading" spacing, use_karras_sigmas starts at sigma(t=981) for 50
    # steps; k-diffusion and A1111 (and we) start at sigma(t=999) whatever the spacing.
    schedule = train_schedule(ScheduleConfig(timestep_spacing="leading"))
    plan = get_sampler("dpmpp_2m_karras").make_plan(schedule, 50)
    assert float(plan.sigmas[0]) == pytest.approx(float(sigma_table(schedule)[-1]), rel=1e-6)
    assert float(plan.sigmas[-2]) == pytest.approx(float(sigma_table(schedule)[0]), rel=1e-6)


def test_zero_terminal_snr_clamps_sigma_max():
    # alpha_bar_{T-1} = 0 is sigma_max = inf; the table clamps alpha_bar to 2^-24 as diffusers'
    # Euler / DPM schedulers do, so every sigma sampler can start there.
    schedule = train_schedule(CONFIGS["zero_snr_v_trailing"])
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    table = sigma_table(schedule)
    assert torch.isfinite(table).all()
    assert float(table[-1]) == pytest.approx(math.sqrt(2.0**24 - 1), rel=1e-6)
    for name in ("euler", "dpmpp_2m_karras", "dpmpp_sde_exponential"):
        plan = get_sampler(name).make_plan(schedule, 8)
        assert plan.init_noise_sigma == pytest.approx(4096.0, rel=1e-3)


@pytest.mark.parametrize("stepper", STEPPERS)
def test_model_call_counts(stepper):
    schedule = train_schedule(ScheduleConfig())
    calls = []

    def counting(x, t):
        calls.append(float(t))
        return net(x, t)

    sampler = get_sampler(f"{stepper}_karras")
    plan = sampler.make_plan(schedule, 5)
    eta = 1.0 if stepper in STOCHASTIC else 0.0
    denoise(make_denoiser(counting, schedule, "epsilon"), start(plan), sampler=sampler,
            plan=plan, generators=gens(0), eta=eta, progress=False)
    assert len(calls) == sampler.total_model_calls(plan)
    two_stage = stepper in {"heun", "dpm2", "dpm2_a", "dpmpp_sde", "dpmpp_2s_a"}
    assert len(calls) == (2 * 5 - 1 if two_stage else 5)


def test_registry_names_and_errors():
    for stepper in STEPPERS:
        assert SAMPLERS[stepper].spacing is None
        for spacing in SIGMA_SPACINGS:
            sampler = get_sampler(f"{stepper}_{spacing}")
            assert sampler.stepper is SAMPLERS[stepper].stepper and sampler.spacing == spacing
    assert get_sampler("dpmpp_2m_karras").stepper.name == "dpmpp_2m"
    with pytest.raises(ValueError, match=r"unknown sampler 'Euler A'; valid samplers: ddim, "
                                         r"ddpm, .*euler, .*dpmpp_2s_a_polyexponential"):
        get_sampler("Euler A")
    with pytest.raises(ValueError, match="ddim steps at the model's training timesteps"):
        SAMPLERS["ddim"].stepper.make_plan(train_schedule(ScheduleConfig()), 5, "karras")
    assert [SAMPLERS[n].default_eta for n in ("ddim", "euler", "euler_a", "dpmpp_2m_sde")] == \
        [0.0, 0.0, 1.0, 1.0]


def test_step_checks_its_noise_and_index():
    schedule = train_schedule(ScheduleConfig())
    sampler = get_sampler("dpmpp_sde")
    plan = sampler.make_plan(schedule, 4)
    d = make_denoiser(net, schedule, "epsilon")
    x = start(plan)
    z = torch.zeros(SHAPE)
    assert sampler.noise_draws(plan, 0, 1.0) == 2 and sampler.noise_draws(plan, 3, 1.0) == 0
    with pytest.raises(ValueError, match="dpmpp_sde step 0 consumes 2 noise draw"):
        sampler.step(d, plan, 0, x, None, (z,), eta=1.0)
    with pytest.raises(ValueError, match="noise has shape"):
        sampler.step(d, plan, 0, x, None, (z, z[:1]), eta=1.0)
    with pytest.raises(ValueError, match="eta=-1.0 is invalid"):
        sampler.step(d, plan, 0, x, None, (), eta=-1.0)
    with pytest.raises(IndexError, match="step index 4 is out of range"):
        sampler.step(d, plan, 4, x, None, (), eta=0.0)


def test_carry_is_the_only_history():
    # Two generations interleaved step by step on one sampler equal each run alone.
    schedule = train_schedule(ScheduleConfig(prediction_type="v_prediction"))
    sampler = get_sampler("dpmpp_2m_karras")
    d = make_denoiser(net, schedule, "v_prediction")
    plans = [sampler.make_plan(schedule, n) for n in (4, 7)]
    alone = []
    for plan in plans:
        x, carry = start(plan), None
        for i in range(len(plan)):
            x, carry = sampler.step(d, plan, i, x, carry, (), eta=0.0)
        alone.append(x)
    xs, carries = [start(p) for p in plans], [None, None]
    for i in range(7):
        for k, plan in enumerate(plans):
            if i < len(plan):
                xs[k], carries[k] = sampler.step(d, plan, i, xs[k], carries[k], (), eta=0.0)
    assert all(torch.equal(a, b) for a, b in zip(alone, xs))


# ---------------------------------------------------------------------------------------------
# diffusers' schedulers: the same network, starting latents and per-image noise generators.

from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)


def diffusers_run(cls, config, steps, x_start, *, model=None, vp=False, seed=100, **options):
    """diffusers' scheduler loop from our starting latents (x_VE; divided by sqrt(sigma_0^2 + 1)
    for the VP-space DPM-Solver schedulers): (final x, scheduler)."""
    model = net if model is None else model
    scheduler = cls.from_config(config.to_dict(cls.__name__), **options)
    scheduler.set_timesteps(steps)
    x = x_start / math.sqrt(float(scheduler.sigmas[0]) ** 2 + 1) if vp else x_start
    g = gens(seed)
    if cls is DPMSolverSDEScheduler:
        # Instead of its Brownian tree (seeded by noise_sampler_seed): our per-image draws.
        scheduler.noise_sampler = lambda s, s_next: per_image_noise(
            SHAPE, g, device=torch.device("cpu"), dtype=torch.float32)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **({"generator": g} if takes_generator else {})).prev_sample
    return x, scheduler


DIFFUSERS_CASES = [
    # (our sampler, diffusers class, options, config, tolerance relative to max |x|)
    ("euler", EulerDiscreteScheduler, {}, "sd15_eps", 2e-5),
    ("euler", EulerDiscreteScheduler, {}, "v_pred_linspace", 2e-5),
    ("euler", EulerDiscreteScheduler, {}, "zero_snr_v_trailing", 2e-5),
    ("euler_karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}, "v_pred_linspace",
     2e-5),
    ("euler_exponential", EulerDiscreteScheduler, {"use_exponential_sigmas": True},
     "v_pred_linspace", 2e-5),
    ("euler_a", EulerAncestralDiscreteScheduler, {}, "sd15_eps", 2e-5),
    ("euler_a", EulerAncestralDiscreteScheduler, {}, "zero_snr_v_trailing", 2e-5),
    ("heun", HeunDiscreteScheduler, {}, "sd15_eps", 2e-5),
    ("heun_karras", HeunDiscreteScheduler, {"use_karras_sigmas": True}, "v_pred_linspace", 2e-5),
    ("lms", LMSDiscreteScheduler, {}, "sd15_eps", 2e-5),
    ("lms_karras", LMSDiscreteScheduler, {"use_karras_sigmas": True}, "v_pred_linspace", 2e-5),
    ("dpm2", KDPM2DiscreteScheduler, {}, "sd15_eps", 2e-5),
    ("dpm2_a", KDPM2AncestralDiscreteScheduler, {}, "sd15_eps", 2e-5),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"},
     "zero_snr_v_trailing", 2e-5),
    # DPMSolverMultistep rounds the karras sigmas' timesteps to integers (and calls the UNet at
    # the rounded t, the sigma unrounded); k-diffusion and we call it at the fractional t, so
    # these cases run a network that rounds t itself (exact then); test_dpmsolver_karras_t_rounding
    # bounds the difference the rounding alone makes.
    ("dpmpp_2m_karras", DPMSolverMultistepScheduler,
     {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, "sd15_eps", 2e-5),
    ("dpmpp_2m_sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"},
     "zero_snr_v_trailing", 2e-5),
    ("dpmpp_2m_sde_karras", DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "sd15_eps", 2e-5),
    ("dpmpp_sde", DPMSolverSDEScheduler, {}, "sd15_eps", 2e-5),
    ("dpmpp_sde_karras", DPMSolverSDEScheduler, {"use_karras_sigmas": True}, "v_pred_linspace",
     2e-5),
    # Not compared with diffusers: dpmpp_2s_a (DPMSolverSinglestep's 2nd-order step evaluates
    # at the next grid timestep, pairing steps, and has no ancestral noise: another method than
    # k-diffusion's log-midpoint 2S; it is exact against k-diffusion above).
]


@pytest.mark.parametrize("name, cls, options, config_name, rel", DIFFUSERS_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in DIFFUSERS_CASES])
def test_matches_diffusers(name, cls, options, config_name, rel):
    config = CONFIGS[config_name]
    stepper = get_sampler(name).stepper.name
    eta = 1.0 if stepper in STOCHASTIC else 0.0
    rounds_t = cls is DPMSolverMultistepScheduler and options.get("use_karras_sigmas", False)
    model = net_rounding_t if rounds_t else net
    plan, x, _ = ours(name, config, 6, eta, model=model)
    x_ref, scheduler = diffusers_run(cls, config, 6, start(plan), model=model,
                                     vp=cls is DPMSolverMultistepScheduler, **options)
    # The same noise levels (diffusers keeps them in float32 too, computed the same way).
    levels = torch.unique_consecutive(scheduler.sigmas.to(torch.float32))
    assert torch.allclose(levels, plan.sigmas, rtol=1e-6, atol=0), (levels, plan.sigmas)
    diff = float((x - x_ref).abs().max())
    assert diff <= _tol(start(plan), rel=rel), f"{name}: max |diff| {diff:.3g}"


def net_rounding_t(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return net(x, t.to(torch.float32).round())


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpmsolver_karras_t_rounding(algorithm):
    # With the fractional-t network, diffusers' integer t changes each output by at most
    # 1.3 * 0.5 / 700 ~ 1e-3 (net's t-dependence): the images differ by about that, no more.
    config = CONFIGS["sd15_eps"]
    name = "dpmpp_2m_karras" if algorithm == "dpmsolver++" else "dpmpp_2m_sde_karras"
    plan, x, _ = ours(name, config, 6, 1.0 if "sde" in algorithm else 0.0)
    x_ref, _ = diffusers_run(DPMSolverMultistepScheduler, config, 6, start(plan), vp=True,
                             algorithm_type=algorithm, use_karras_sigmas=True)
    assert 1e-5 < float((x - x_ref).abs().max()) <= 1e-2


# ---------------------------------------------------------------------------------------------
# End to end on the tiny random model: TextToImage against diffusers' pipeline and k-diffusion.

PROMPTS = ["a red circle on the left", "two blue squares, green background"]


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def reference(tiny_diffusers_pipe):
    return tiny_diffusers_pipe


@pytest.mark.parametrize("name, cls", [
    ("euler", EulerDiscreteScheduler),
    ("euler_a", EulerAncestralDiscreteScheduler),
    # Two UNet calls per step, and step for step against diffusers above: slow suite only.
    pytest.param("heun", HeunDiscreteScheduler, marks=pytest.mark.slow),
    pytest.param("dpm2_a", KDPM2AncestralDiscreteScheduler, marks=pytest.mark.slow),
])
def test_pipeline_matches_diffusers(pipe, reference, name, cls):
    kw = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64)
    ours_out = pipe(PROMPTS, negative_prompt="blurry", sampler=name, seed=1234, progress=False,
                    **kw)
    assert ours_out.params[0].eta == (1.0 if name in STOCHASTIC else 0.0)   # the default eta
    reference.scheduler = cls.from_config(reference.scheduler.config)
    reference.scheduler.set_timesteps(4)
    # Our starting latents are sigma_max z (k-diffusion's), diffusers' sqrt(sigma_max^2 + 1) z
    # for leading spacing: hand it ours, from the generators that then draw the step noise.
    g = [torch.Generator().manual_seed(1234 + j) for j in range(2)]
    z = per_image_noise((2, 4, 8, 8), g, device=torch.device("cpu"), dtype=torch.float32)
    plan = get_sampler(name).make_plan(train_schedule(pipe.components.schedule), 4)
    latents = z * (plan.init_noise_sigma / float(reference.scheduler.init_noise_sigma))
    theirs = reference(PROMPTS, negative_prompt=["blurry"] * 2, generator=g, latents=latents,
                       output_type="np", **kw).images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    assert ours_out.pixels.std() > 0.02
    assert (ours_out.pixels - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "dpmpp_sde_karras", "lms_exponential",
                                  "dpmpp_2s_a"])
def test_pipeline_matches_k_diffusion(pipe, name):
    """The guided tiny UNet wrapped by k-diffusion's DiscreteEpsDDPMDenoiser, our plan's sigmas
    and noise: final latents within float32 rounding of ours."""
    kw = dict(num_inference_steps=5, guidance_scale=7.5, height=64, width=64)
    ours_out = pipe(PROMPTS, negative_prompt="blurry", sampler=name, seed=77, progress=False,
                    **kw)
    schedule = train_schedule(pipe.components.schedule)
    plan = get_sampler(name).make_plan(schedule, 5)
    guided = pipe.guidance(PROMPTS, ["blurry"] * 2, 7.5).model(pipe.denoiser())
    g = [torch.Generator().manual_seed(77 + j) for j in range(2)]
    x = per_image_noise((2, 4, 8, 8), g, device=torch.device("cpu"), dtype=torch.float32)

    def k_model(x, t):          # k-diffusion passes t per sample; our UNet fn takes one t
        return guided(x, t[0])

    k_kw = {"disable": True}
    if get_sampler(name).stepper.name in STOCHASTIC:
        k_kw |= {"eta": 1.0, "noise_sampler": lambda s, s_next: per_image_noise(
            (2, 4, 8, 8), g, device=torch.device("cpu"), dtype=torch.float32)}
    fn = getattr(K_SAMPLING, K_FUNCTION[get_sampler(name).stepper.name])
    with torch.inference_mode():
        ref = fn(K_EXTERNAL.DiscreteEpsDDPMDenoiser(k_model, schedule.alphas_cumprod, False),
                 x * plan.init_noise_sigma, plan.sigmas, **k_kw)
    assert (ours_out.latents - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras"])
def test_cli_generate_with_a_sampler(pipe, tiny_dir, tmp_path, name):
    import numpy as np
    from PIL import Image

    from ldm_engine.apps.cli import main
    from pipelines import read_png_params
    out = tmp_path / "s.png"
    assert main(["generate", "a red circle", "--model", str(tiny_dir), "--out", str(out),
                 "--steps", "3", "--seed", "5", "--sampler", name, "--dtype", "fp32",
                 "--quiet"]) == 0
    # The same image as the Python call with the sampler's default eta (1 for euler_a).
    made = pipe("a red circle", num_inference_steps=3, seed=5, sampler=name, progress=False)
    assert made.params[0].eta == (1.0 if name == "euler_a" else 0.0)
    assert read_png_params(out).eta == made.params[0].eta
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(made.images[0]))
    # And it differs from the DDIM image of the same seed.
    ddim = pipe("a red circle", num_inference_steps=3, seed=5, sampler="ddim", progress=False)
    assert not np.array_equal(np.asarray(made.images[0]), np.asarray(ddim.images[0]))
