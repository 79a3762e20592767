"""fewstep's samplers in A1111: core's samplers registered as A1111 samplers ("FewStep consistency", ...), run in its
k-diffusion calling convention, with the options a run overrides only while they sample."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch

from ..core.parameterization import consistency_boundary_denoised
from ..core.samplers import SAMPLERS, get_sampler
from ..core.schedule import DiscreteSchedule
from . import forge
from .run_config import sampler_label
from .run_state import RUN_ATTR, ActiveRun, RunError


def a1111_sampler(name: str):
    """core sampler ``name`` in A1111's k-diffusion calling convention: noise from the request's per-image RNG (so a
    seed gives the same image alone or in a batch), LCM's boundary condition when the run's adapter needs it."""
    sample_fn = get_sampler(name)
    takes_noise = "noise_sampler" in inspect.signature(sample_fn).parameters

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        active = getattr(model.p, RUN_ATTR, None)
        if isinstance(active, RunError):
            raise active
        from modules import sd_samplers_common

        denoiser = model
        if isinstance(active, ActiveRun) and active.run.plan.consistency_boundary:
            schedule = DiscreteSchedule.from_sigmas(model.inner_model.sigmas)

            def denoiser(x_, sigma, **kwargs):
                return consistency_boundary_denoised(model(x_, sigma, **kwargs), x_, sigma, schedule.timestep(sigma))

        options = {}
        if takes_noise:
            rng = sd_samplers_common.TorchHijack(model.p)
            options["noise_sampler"] = lambda sigma, sigma_next: rng.randn_like(x)
        with options_overridden(active.sampling_options if isinstance(active, ActiveRun) else {}):
            return sample_fn(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)

    sample.__name__ = f"sample_fewstep_{name}"
    return sample


def register_samplers() -> None:
    """One A1111 sampler per core sampler ("FewStep consistency", ...); idempotent (scripts are reloaded)."""
    from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion

    for name in SAMPLERS:
        label = sampler_label(name)
        if label in sd_samplers.all_samplers_map:
            continue
        data = sd_samplers_common.SamplerData(
            label, lambda model, name=name: sd_samplers_kdiffusion.KDiffusionSampler(a1111_sampler(name), model),
            [f"fewstep_{name}"], {})
        sd_samplers.all_samplers.append(data)
        sd_samplers.all_samplers_map[label] = data
    sd_samplers.set_samplers()


def schedule_of(sd_model) -> DiscreteSchedule:
    """core's schedule over the loaded model's own noise schedule (A1111: its alphas_cumprod; Forge: its sigmas)."""
    if forge.is_forge(sd_model):
        return forge.schedule_of(sd_model)
    return DiscreteSchedule(sd_model.alphas_cumprod.detach().to("cpu", torch.float64))


@contextmanager
def options_overridden(options: dict[str, Any]):
    """A1111 options set to ``options`` inside the block, and back to the user's saved values, or to no entry where
    there was none, when it ends, whatever way it ends (an entry left behind would be saved with the settings as if
    the user had set it)."""
    if not options:
        yield
        return
    from modules import shared

    data = shared.opts.data
    saved = {name: (name in data, data.get(name)) for name in options}
    data.update(options)
    try:
        yield
    finally:
        for name, (had, old) in saved.items():
            if had:
                data[name] = old
            else:
                data.pop(name, None)
