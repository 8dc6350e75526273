"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), as a frozen plan and a pure step with the history in the caller's carry.

This is diffusers' UniPCMultistepScheduler in its default configuration (the one SD pipelines get
from `UniPCMultistepScheduler.from_config(model_scheduler_config)`): solver_order 2, data
prediction (predict_x0), the B(h) = e^h - 1 variant "bh2", lower_order_final, the corrector at
every step, final sigma 0. Notation (the paper's Sec. 3, VP space): alpha_t = 1 / sqrt(sigma^2 + 1),
sigma_t = sigma alpha_t for the plan's sigma = sqrt((1 - alpha_bar) / alpha_bar), so that
x_t = alpha_t x0 + sigma_t eps; lambda = log(alpha_t / sigma_t) and h = lambda_next - lambda.
With m_i the model's x0 at step i, step i (from level i to level i + 1) is:

  UniC (i > 0), correcting x_i with the fresh m_i (paper Alg. 1 / eq. 8, order p of step i - 1):
      x_i <- (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h} - 1) m_{i-1}
             - alpha_i B(h) (rho_c D1 + rho_t (m_i - m_{i-1})),   D1 = (m_{i-2} - m_{i-1}) / r
  UniP (order p = 1 at the first and last steps, else 2; rho_p = 1/2 for p = 2, eq. 6):
      x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) m_i
                - alpha_{i+1} B(h) rho_p (m_{i-1} - m_i) / r,     r = (lambda_{i-1} - lambda_i) / h
  where x_{i-1} is the corrected sample before step i - 1's predictor, (rho_c, rho_t) solve
  R rho = b with R = [[1, 1], [r, 1]] and b_k = k! hh phi_{k+1}(hh) / B(h), hh = -h (the paper's
  eq. 7; phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z), and rho = 1/2 for a
  first-order corrector. B(h) = e^{hh} - 1 ("bh2").

The carry is (x_{i-1}, m_{i-1}, m_{i-2}): a generation's whole memory. The model is called once per
step at the plan's integer timesteps; the per-step scalars are computed once in the plan with the
same float32 tensor operations, in the same order, as diffusers, so that a step equals diffusers'
step bit for bit on the CPU (tests/test_unipc_lcm.py). UniPC has no clip_sample (as in diffusers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .contract import Carry, Denoiser, Noise, check_eta, check_noise, sigma_table
from .schedule import StepIndexed, Prediction, TrainSchedule, check_num_steps
from .tail import check_x0_noise, slice_steps

ORDER = 2  # diffusers' default solver_order (the paper's recommendation for guided sampling)


@dataclass(frozen=True, eq=False)
class UniPCPlan(StepIndexed):
    """Timesteps, noise levels and every per-step scalar of one UniPC generation (read-only)."""

    timesteps: torch.Tensor   # (N,) int64, strictly decreasing
    sigmas: torch.Tensor      # (N+1,) float32, sigmas[N] = 0
    prediction_type: Prediction
    # Per step j, 0-d float32 tensors (the transition from level j to j + 1):
    alpha: tuple[torch.Tensor, ...]       # alpha_j (the level the model is called at)
    sigma_vp: tuple[torch.Tensor, ...]    # sigma_j alpha_j
    ratio: tuple[torch.Tensor, ...]       # sigma_t / sigma_s0 (VP sigmas)
    a_phi: tuple[torch.Tensor, ...]       # alpha_t (e^{-h} - 1)
    a_bh: tuple[torch.Tensor, ...]        # alpha_t B(h)
    r: tuple[torch.Tensor | None, ...]    # (lambda_{j-1} - lambda_j) / h, None for order 1
    rho_c: tuple[torch.Tensor | None, ...]  # (2,) corrector weights of order 2; None: order 1
    order: tuple[int, ...]

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

@dataclass(frozen=True)
class UniPCCarry:
    """What step i + 1 needs from the past: the corrected sample before step i's predictor and
    the model's x0 at steps i and i - 1 (None before the second step)."""

    last_sample: torch.Tensor
    m_prev: torch.Tensor
    m_prev2: torch.Tensor | None


def unipc_timesteps(schedule: TrainSchedule, n: int) -> np.ndarray:
    """UniPCMultistepScheduler.set_timesteps' integer timesteps: its leading and linspace
    spacings divide T into N + 1 parts and drop the last, unlike DDIM's N parts."""
    config = schedule.config
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = T // (n + 1)
        t = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        t += config.steps_offset
    else:
        t = np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1
    if t[0] >= T or not (np.diff(t) < 0).all():
        raise ValueError(f"{n} UniPC steps of {config.timestep_spacing!r} spacing with "
                         f"steps_offset={config.steps_offset} do not give {n} distinct timesteps "
                         f"in [0, {T}); use fewer steps")
    return t


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    alpha_t, sigma_t = _alpha_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def _corrector_weights(r: torch.Tensor, h: torch.Tensor, b_h: torch.Tensor) -> torch.Tensor:
    """(rho_c, rho_t) of the order-2 UniC: solve R rho = b (paper eq. 7), b by diffusers'
    recursion on h_phi_k = hh phi_{k+1}(hh): h_phi_{k+1} = h_phi_k / hh - 1 / (k+1)!."""
    rks = torch.stack([r, torch.ones(())])
    hh = -h
    h_phi_k = torch.expm1(hh) / hh - 1
    factorial = 1
    rows, b = [], []
    for k in range(1, ORDER + 1):
        rows.append(torch.pow(rks, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.linalg.solve(torch.stack(rows), torch.stack(b))


def unipc_plan(schedule: TrainSchedule, num_steps: int) -> UniPCPlan:
    n = check_num_steps(schedule, num_steps)
    timesteps = unipc_timesteps(schedule, n)
    table = sigma_table(schedule).numpy()
    sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    alpha, sigma_vp, ratio, a_phi, a_bh, rs, rho_c, order = [], [], [], [], [], [], [], []
    for j in range(n):
        s0, t = sigmas[j], sigmas[j + 1]
        alpha_s0, sigma_s0 = _alpha_sigma(s0)
        alpha_t, sigma_t = _alpha_sigma(t)
        h = _lambda(t) - _lambda(s0)
        hh = -h
        b_h = torch.expm1(hh)                   # bh2: B(h) = e^h - 1 in hh = -h
        p = min(ORDER, n - j, j + 1)            # warm-up and lower_order_final
        alpha.append(alpha_s0)
        sigma_vp.append(sigma_s0)
        ratio.append(sigma_t / sigma_s0)
        a_phi.append(alpha_t * torch.expm1(hh))
        a_bh.append(alpha_t * b_h)
        order.append(p)
        if p == 2:
            r = (_lambda(sigmas[j - 1]) - _lambda(s0)) / h
            rs.append(r)
            rho_c.append(_corrector_weights(r, h, b_h))
        else:
            rs.append(None)
            rho_c.append(None)
    return UniPCPlan(timesteps=torch.from_numpy(timesteps), sigmas=sigmas,
                     prediction_type=schedule.config.prediction_type, alpha=tuple(alpha),
                     sigma_vp=tuple(sigma_vp), ratio=tuple(ratio), a_phi=tuple(a_phi),
                     a_bh=tuple(a_bh), r=tuple(rs), rho_c=tuple(rho_c), order=tuple(order))


def _x0(out: torch.Tensor, x: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
        prediction_type: Prediction) -> torch.Tensor:
    """The data prediction from the network output, in diffusers' UniPC arithmetic."""
    if prediction_type == "epsilon":
        return (x - sigma_t * out) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * out
    return out


@dataclass(frozen=True)
class UniPC:
    """The UniPC stepper (contract.Stepper); its plans are UniPCPlan over the model's spacing."""

    name: str = "unipc"
    space: str = "vp"
    default_eta: float = 0.0

    def make_plan(self, schedule: TrainSchedule, num_steps: int,
                  spacing: str | None) -> UniPCPlan:
        if spacing is not None:
            raise ValueError(f"unipc steps at the model's training timesteps; it has no "
                             f"{spacing!r} variant")
        return unipc_plan(schedule, num_steps)

    def noise_draws(self, plan: UniPCPlan, i: int, eta: float) -> int:
        plan.check_index(i)
        return 0

    def model_calls(self, plan: UniPCPlan, i: int) -> int:
        plan.check_index(i)
        return 1

    def step(self, denoiser: Denoiser, plan: UniPCPlan, i: int, x: torch.Tensor, carry: Carry,
             noise: Noise, *, eta: float) -> tuple[torch.Tensor, Carry]:
        i = plan.check_index(i)
        check_eta(eta, self.name)
        check_noise(noise, 0, x, self.name, i)
        if i > 0 and not isinstance(carry, UniPCCarry):
            raise ValueError(f"unipc step {i} needs the carry returned by step {i - 1}")
        dev = x.device
        t = torch.tensor(int(plan.timesteps[i]), dtype=torch.int64, device=dev)
        m = _x0(denoiser.model(x, t), x, plan.alpha[i].to(dev), plan.sigma_vp[i].to(dev),
                plan.prediction_type)
        if i > 0:
            x = self._correct(plan, i - 1, carry, x, m)
        m_prev = carry.m_prev if i > 0 else None
        x_next = plan.ratio[i].to(dev) * x - plan.a_phi[i].to(dev) * m
        if plan.order[i] == 2:
            d1 = (m_prev - m) / plan.r[i].to(dev)
            x_next = x_next - plan.a_bh[i].to(dev) * (0.5 * d1)
        return x_next.to(x.dtype), UniPCCarry(last_sample=x, m_prev=m, m_prev2=m_prev)

    def tail(self, plan: UniPCPlan, start: int) -> UniPCPlan:
        """Steps start..N-1 with the warm-up restarted: the order of tail step j is
        min(2, N - start - j, j + 1), so the tail's first step is a first-order UniP with no
        corrector (no carry), as diffusers' UniPC after set_begin_index, whose lower_order_nums
        and last_sample start at 0 and None. Every other per-step scalar depends only on the
        step's own levels and slices; r and rho_c go with order 2 and are dropped for order 1."""
        tail = slice_steps(plan, start)
        if tail is plan:
            return plan
        order = tuple(min(p, j + 1) for j, p in enumerate(tail.order))
        keep = [p == 2 for p in order]
        return dataclasses.replace(
            tail, order=order,
            r=tuple(r if k else None for r, k in zip(tail.r, keep)),
            rho_c=tuple(rho if k else None for rho, k in zip(tail.rho_c, keep)))

    def noised(self, plan: UniPCPlan, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """alpha_0 x0 + sigma_0 alpha_0 z with alpha_0 = 1 / sqrt(sigma_0^2 + 1), i.e.
        sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) z, in diffusers' UniPC add_noise arithmetic
        (the plan's sigma_0 cast to the sample's dtype, then _sigma_to_alpha_sigma_t)."""
        if len(plan) == 0:
            return x0
        noise = check_x0_noise(x0, noise)
        sigma = plan.sigmas[:1].to(device=x0.device, dtype=x0.dtype)
        sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        alpha_t, sigma_t = _alpha_sigma(sigma)
        return alpha_t * x0 + sigma_t * noise

    def level(self, plan: UniPCPlan, i: int) -> float:
        return float(plan.sigmas[i])

    @staticmethod
    def _correct(plan: UniPCPlan, j: int, carry: UniPCCarry, x: torch.Tensor,
                 m: torch.Tensor) -> torch.Tensor:
        """UniC over transition j (from level j to j + 1 = the current one) with the fresh x0."""
        dev = x.device
        base = plan.ratio[j].to(dev) * carry.last_sample - plan.a_phi[j].to(dev) * carry.m_prev
        d1_t = m - carry.m_prev
        if plan.order[j] == 2:
            rho = plan.rho_c[j].to(device=dev, dtype=x.dtype)
            d1 = (carry.m_prev2 - carry.m_prev) / plan.r[j].to(dev)
            res = rho[0] * d1 + rho[-1] * d1_t
        else:
            res = 0.5 * d1_t
        return (base - plan.a_bh[j].to(dev) * res).to(x.dtype)
