"""Few-step samplers with k-diffusion's signature.

Every sampler is ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``:
``model(x, sigma, **extra_args)`` returns the denoised x0 in sigma space (x = x0 + sigma * eps), ``x`` is
the starting latent already scaled to ``sigmas[0]``, and ``sigmas`` ends in 0. The same function runs in
ComfyUI (``KSAMPLER(fn)``), A1111 (``KDiffusionSampler``) and fewstep's own diffusers loop.

Noise comes from ``noise_sampler(sigma, sigma_next)`` when given, else from a generator seeded with
``extra_args["seed"]`` (ComfyUI puts the seed there), else from torch's global RNG. Progress is reported
through ``callback`` (keys ``x, i, sigma, sigma_hat, denoised``), which is how the hosts draw their bars;
``disable`` is accepted for signature compatibility.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .parameterization import ddim_step
from .schedule import DiscreteSchedule

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_noise_sampler(x: torch.Tensor, seed: Optional[int] = None) -> NoiseSampler:
    """Unit Gaussian noise shaped like x, from a generator seeded with ``seed`` (global RNG if None)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))
    return lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to sigma_to into a deterministic part to sigma_down and fresh noise of std sigma_up.

    sigma_down^2 + sigma_up^2 = sigma_to^2. With eta = 1 this is DDPM's posterior; DDIM's eta in sigma space.
    """
    if not eta or sigma_to == 0:
        return sigma_to, sigma_to * 0.0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt())
    sigma_down = (sigma_to**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up


def renoise(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_down: torch.Tensor, sigma_up: torch.Tensor, noise: Optional[torch.Tensor]
) -> torch.Tensor:
    """x0 + sigma_down * eps_hat + sigma_up * noise, with eps_hat = (x - x0) / sigma the model's implied noise: the DDIM
    step to sigma_down plus fresh noise."""
    out = ddim_step(x, denoised, sigma, sigma_down)
    if noise is not None and sigma_up > 0:
        out = out + noise * sigma_up
    return out


def _setup(x: torch.Tensor, extra_args: Optional[dict], noise_sampler: Optional[NoiseSampler]):
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    return extra_args, noise_sampler, x.new_ones([x.shape[0]])


def _report(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_consistency(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback=None,
    disable=None,
    noise_sampler: Optional[NoiseSampler] = None,
    gamma: float = 1.0,
    schedule: Optional[DiscreteSchedule] = None,
) -> torch.Tensor:
    """Multistep consistency sampling: predict x0, then re-noise it to the next sigma.

    Algorithm 1 of Song et al. (2023, Consistency Models) as LCM (Luo et al. 2023) and Flash Diffusion
    (Chadebec et al. 2024) sample. ``gamma`` is TCD's stochasticity (Zheng et al. 2024, Strategic Stochastic
    Sampling): each step first moves deterministically to timestep s = floor((1 - gamma) t_next), then adds
    noise up to t_next. gamma = 1 is LCM (pure re-noising), gamma = 0 is DDIM. Fractional gamma needs the
    discrete ``schedule`` to find s (SD's schedule by default).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1]; got {gamma}")
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    if 0.0 < gamma < 1.0 and schedule is None:
        schedule = DiscreteSchedule.stable_diffusion()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        if gamma == 1.0:
            sigma_s = sigma_next * 0.0
        elif gamma == 0.0:
            sigma_s = sigma_next
        else:
            timestep_s = math.floor((1.0 - gamma) * int(schedule.timestep(sigma_next)))
            sigma_s = schedule.sigmas[timestep_s].to(sigma_next) if timestep_s > 0 else sigma_next * 0.0
        sigma_up = (sigma_next**2 - sigma_s**2).clamp(min=0).sqrt()
        x = renoise(x, denoised, sigma, sigma_s, sigma_up, noise_sampler(sigma, sigma_next) if sigma_up > 0 else None)
    return x


@torch.no_grad()
def sample_ddim(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback=None,
    disable=None,
    noise_sampler: Optional[NoiseSampler] = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) in sigma space; eta = 0 is deterministic, eta = 1 is DDPM-like."""
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = renoise(x, denoised, sigma, sigma_down, sigma_up, noise_sampler(sigma, sigma_next) if sigma_up > 0 else None)
    return x


@torch.no_grad()
def sample_stochastic(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback=None,
    disable=None,
    noise_sampler: Optional[NoiseSampler] = None,
) -> torch.Tensor:
    """The stochastic N-step sampler of Meng et al. (2023, On Distillation of Guided Diffusion Models, sec. 4.3).

    Each step takes one deterministic DDIM step of twice the length (sigmas[i] -> sigmas[i + 2]), then
    perturbs the result with fresh noise back up to sigmas[i + 1]. The last step is a plain DDIM step to 0.
    """
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    last = len(sigmas) - 2
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, denoised)
        if i == last:
            x = renoise(x, denoised, sigma, sigma_next, sigma_next * 0.0, None)
            continue
        sigma_far = sigmas[i + 2]
        x = renoise(x, denoised, sigma, sigma_far, (sigma_next**2 - sigma_far**2).sqrt(), noise_sampler(sigma, sigma_next))
    return x


@torch.no_grad()
def sample_onestep(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback=None,
    disable=None,
) -> torch.Tensor:
    """One network pass from sigmas[0] straight to x0: one-step generators (GDD, Flash/LCM at 1 step)."""
    if len(sigmas) != 2 or sigmas[-1] != 0:
        raise ValueError(
            f"the one-step sampler takes sigmas [sigma_start, 0]; got {len(sigmas) - 1} steps ending at {float(sigmas[-1]):g}"
        )
    extra_args = {} if extra_args is None else extra_args
    denoised = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)
    _report(callback, x, 0, sigmas[0], denoised)
    return denoised


@torch.no_grad()
def sample_dpmpp_2m(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback=None,
    disable=None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order in log-sigma time, as k-diffusion writes it.

    Flash Diffusion's teacher solver. First order on the first step (no history yet) and on the step to
    sigma = 0, like diffusers' DPMSolverMultistepScheduler with ``final_sigmas_type="zero"``.
    """
    extra_args, _, s_in = _setup(x, extra_args, None)
    previous = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        estimate = denoised
        if previous is not None:
            half_inverse_ratio = h / (2 * (sigmas[i - 1].log() - sigma.log()))
            estimate = (1 + half_inverse_ratio) * denoised - half_inverse_ratio * previous
        x = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
        previous = denoised
    return x


SAMPLERS = {
    "consistency": sample_consistency,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "stochastic": sample_stochastic,
    "onestep": sample_onestep,
}


def get_sampler(name: str):
    """The sampler function for a name used in adapter metadata and host menus."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None
