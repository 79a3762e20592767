"""Stable Diffusion's discrete noise schedule, seen in the sigma space the samplers work in.

A DDPM latent at timestep t is x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t = alphas_cumprod[t]).
Samplers use the equivalent variance-exploding form x = x_t / sqrt(a_t) = x0 + sigma eps with
sigma = sqrt((1 - a_t) / a_t), as k-diffusion and ComfyUI's ``ModelSamplingDiscrete`` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
SD_BETA_START = 0.00085
SD_BETA_END = 0.012

BetaSchedule = Literal["scaled_linear", "linear"]
Prediction = Literal["epsilon", "v_prediction"]
Spacing = Literal["trailing", "leading", "linspace", "lcm"]

SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace", "lcm")
PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction")


def make_betas(
    beta_schedule: BetaSchedule = "scaled_linear",
    beta_start: float = SD_BETA_START,
    beta_end: float = SD_BETA_END,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """Betas in float64. diffusers' "scaled_linear" is what LDM and ComfyUI call "linear"."""
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}; expected 'scaled_linear' or 'linear'")


@dataclass(frozen=True)
class DiscreteSchedule:
    """A discrete-time schedule: alphas_cumprod (float64, one per training timestep) and what the model predicts.

    Args:
        alphas_cumprod: cumulative product of (1 - beta), shape (T,), float64.
        prediction_type: "epsilon" (SD1.5, SDXL) or "v_prediction" (SD2-v and some fine-tunes).
    """

    alphas_cumprod: torch.Tensor
    prediction_type: Prediction = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}; expected one of {PREDICTIONS}")

    @classmethod
    def from_betas(
        cls,
        beta_schedule: BetaSchedule = "scaled_linear",
        beta_start: float = SD_BETA_START,
        beta_end: float = SD_BETA_END,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        prediction_type: Prediction = "epsilon",
    ) -> "DiscreteSchedule":
        betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        return cls(torch.cumprod(1.0 - betas, dim=0), prediction_type)

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, prediction_type: Prediction = "epsilon") -> "DiscreteSchedule":
        """The schedule whose per-timestep sigmas are ``sigmas`` (increasing), e.g. a host model's own table."""
        sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
        return cls(1.0 / (1.0 + sig**2), prediction_type)

    @classmethod
    def stable_diffusion(cls, prediction_type: Prediction = "epsilon") -> "DiscreteSchedule":
        """SD1.5 and SDXL: scaled-linear betas 0.00085-0.012 over 1000 steps."""
        return cls.from_betas(prediction_type=prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sigma for every training timestep, float64 on the CPU, increasing."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @cached_property
    def _log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # Lookups run in float64 on the CPU (MPS has no float64) and return on the caller's device.

    def sigma(self, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """sigma at a (possibly fractional) timestep: log-linear interpolation, as ComfyUI's ``sigma()``."""
        t = torch.as_tensor(timestep)
        t64 = t.detach().to("cpu", torch.float64).clamp(0, self.num_train_timesteps - 1)
        low, high, w = t64.floor().long(), t64.ceil().long(), t64.frac()
        out = ((1 - w) * self._log_sigmas[low] + w * self._log_sigmas[high]).exp()
        return out.to(t.device, t.dtype if t.is_floating_point() else torch.float32)

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The training timestep nearest in log-sigma, as ComfyUI's ``timestep()``; sigma 0 maps to timestep 0."""
        s = torch.as_tensor(sigma)
        log_s = s.detach().to("cpu", torch.float64).reshape(-1).log()
        # Binary search for the two neighbours, then the nearer one (the lower on a tie, as argmin picks).
        high = torch.searchsorted(self._log_sigmas, log_s).clamp(1, self.num_train_timesteps - 1)
        low = high - 1
        nearer_high = (self._log_sigmas[high] - log_s) < (log_s - self._log_sigmas[low])
        return torch.where(nearer_high, high, low).reshape(s.shape).to(s.device)

    def sigmas_for_timesteps(self, timesteps: Sequence[int] | torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """The sigma vector a sampler takes: sigma(t) for each timestep, then a final 0."""
        t = torch.as_tensor(list(map(int, timesteps)) if not torch.is_tensor(timesteps) else timesteps)
        sig = self.sigmas[t.long()]
        return torch.cat([sig, sig.new_zeros(1)]).to(dtype)


def timesteps_trailing(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Evenly spaced, ending at the last training timestep (4 -> 999, 749, 499, 249); diffusers' "trailing"."""
    _check_steps(num_steps, num_train_timesteps)
    ratio = num_train_timesteps / num_steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(num_steps)]


def timesteps_leading(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, steps_offset: int = 1) -> list[int]:
    """Multiples of T // N plus an offset (4 -> 751, 501, 251, 1 with SD's offset 1); diffusers' "leading"."""
    _check_steps(num_steps, num_train_timesteps)
    ratio = num_train_timesteps // num_steps
    return [i * ratio + steps_offset for i in reversed(range(num_steps))]


def timesteps_linspace(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """N points from T-1 down to 0, rounded; diffusers' "linspace"."""
    _check_steps(num_steps, num_train_timesteps)
    if num_steps == 1:
        return [0]
    step = (num_train_timesteps - 1) / (num_steps - 1)
    return [int(round(i * step)) for i in reversed(range(num_steps))]


def timesteps_lcm(
    num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, original_steps: int = 50
) -> list[int]:
    """LCM's skipping grid (4 -> 999, 759, 499, 259), as diffusers' LCMScheduler and TCDScheduler choose them.

    The distillation grid is every k = T // original_steps-th timestep; N indices are taken evenly from it.
    """
    _check_steps(num_steps, original_steps)
    k = num_train_timesteps // original_steps
    grid = [(i + 1) * k - 1 for i in reversed(range(original_steps))]
    step = original_steps / num_steps  # as numpy.linspace(0, original_steps, N, endpoint=False)
    return [grid[math.floor(i * step)] for i in range(num_steps)]


def timesteps_explicit(timesteps: Sequence[int], num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """A user's list, checked: integers, strictly decreasing, inside [0, T)."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("explicit timesteps: the list is empty")
    if any(t < 0 or t >= num_train_timesteps for t in ts):
        raise ValueError(f"explicit timesteps must lie in [0, {num_train_timesteps}); got {ts}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"explicit timesteps must be strictly decreasing; got {ts}")
    return ts


def timesteps_for_denoise(timesteps: Sequence[int], denoise: float) -> list[int]:
    """The timesteps of a partial denoise (img2img, inpainting, hires refine): the same spacing squeezed below
    denoise * T, so the step count stays (t -> round((t + 1) * denoise) - 1; 999, 749, 499, 249 at 0.5 ->
    499, 374, 249, 124), as LCM's img2img shrinks its grid with strength; denoise 1 keeps them. Steps that would
    coincide merge."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1]; got {denoise}")
    out: list[int] = []
    for t in timesteps:
        scaled = max(int(round((int(t) + 1) * denoise)) - 1, 0)
        if not out or scaled < out[-1]:
            out.append(scaled)
    return out


def distillation_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The one timestep policy of fewstep's students: the grid they are trained on (their teachers' rollouts too), the
    timesteps their files record and their previews sample at, and what a file's other step counts fall back to:
    trailing spacing, which starts at pure noise (t = T - 1) whatever the step count."""
    return timesteps_trailing(num_steps, num_train_timesteps)


def select_timesteps(spacing: Spacing, num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Timesteps for N steps by one of the named spacings."""
    if spacing == "trailing":
        return timesteps_trailing(num_steps, num_train_timesteps)
    elif spacing == "leading":
        return timesteps_leading(num_steps, num_train_timesteps)
    elif spacing == "linspace":
        return timesteps_linspace(num_steps, num_train_timesteps)
    elif spacing == "lcm":
        return timesteps_lcm(num_steps, num_train_timesteps)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")


def _check_steps(num_steps: int, limit: int) -> None:
    if not 1 <= num_steps <= limit:
        raise ValueError(f"number of steps must be between 1 and {limit}; got {num_steps}")
