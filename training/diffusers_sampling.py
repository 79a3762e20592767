"""Run core's samplers on a diffusers UNet: the binding that the CLI, training evaluation and tests share."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..core.guidance import cfg, guidance_scale_embedding
from ..core.parameterization import denoise, start_noise_scaling
from ..core.schedule import DiscreteSchedule
from .pipelines import cat_cond


class UNetDenoiser:
    """``model(x, sigma, **cond)`` -> x0 for a diffusers ``UNet2DConditionModel``, in core's sigma space.

    ``cond`` is what the UNet's forward takes besides sample and timestep (``encoder_hidden_states``,
    ``added_cond_kwargs``, ``timestep_cond``). ``seed``, which samplers pass along in extra_args, is ignored.
    """

    def __init__(self, unet, schedule: DiscreteSchedule, consistency_boundary: bool = False):
        self.unet = unet
        self.schedule = schedule
        self.consistency_boundary = consistency_boundary

    def _network(self, x_t: torch.Tensor, timestep: torch.Tensor, **cond) -> torch.Tensor:
        return self.unet(x_t.to(self.unet.dtype), timestep, return_dict=False, **cond)[0].to(x_t.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, seed: Optional[int] = None, **cond) -> torch.Tensor:
        return denoise(self._network, x, sigma, self.schedule, self.consistency_boundary, **cond)


def run_sampler(
    sampler: Callable,
    model: Callable,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Optional[dict] = None,
    seed: Optional[int] = None,
    progress: bool = True,
    callback: Optional[Callable[[dict], None]] = None,
    **options,
) -> torch.Tensor:
    """Sample from pure noise: scale unit ``noise`` to sigmas[0] as a DDPM start, then run ``sampler``.

    ``options`` go to the sampler (gamma, eta, schedule, ...); ``callback`` gets each step's k-diffusion dict.
    """
    extra_args = dict(cond or {})
    if seed is not None:
        extra_args["seed"] = seed
    sigmas = sigmas.to(noise.device)
    x = noise * start_noise_scaling(sigmas[0])
    with tqdm(total=len(sigmas) - 1, disable=not progress, desc="sampling", leave=False) as bar:

        def on_step(info: dict) -> None:
            bar.update(1)
            if callback is not None:
                callback(info)

        return sampler(model, x, sigmas, extra_args=extra_args, callback=on_step, **options)


class CFGDenoiser:
    """Classifier-free guidance around a ``UNetDenoiser``: one batched pass over [cond, uncond] per step.

    ``cond``/``uncond`` are UNet conditioning dicts (``PromptEncoder`` output) or bare text states.
    ``scale`` is the UI/diffusers CFG scale, a number or one per sample (1 = no guidance: the
    unconditional pass is skipped).
    """

    def __init__(self, denoiser: UNetDenoiser, cond, uncond, scale: float | torch.Tensor):
        self.denoiser, self.scale = denoiser, scale
        self.cond, self.uncond = _as_cond(cond), _as_cond(uncond)
        self.both = cat_cond(self.cond, self.uncond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, seed: Optional[int] = None, **_) -> torch.Tensor:
        if not torch.is_tensor(self.scale) and self.scale == 1.0:
            return self.denoiser(x, sigma, **self.cond)
        cond, uncond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **self.both).chunk(2)
        return cfg(cond, uncond, self.scale)


def _as_cond(cond) -> dict:
    return cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def w_condition(w: torch.Tensor | float, embedding_dim: int, like: torch.Tensor, n: int) -> dict:
    """The UNet keyword that carries a guided student's w (``time_cond_proj_dim`` features), one row per sample."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).expand(n)
    return {"timestep_cond": guidance_scale_embedding(w, embedding_dim).to(like.device, like.dtype)}
