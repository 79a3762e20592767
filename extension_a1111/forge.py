"""Forge glue: the run ``host`` configures, applied through Forge's model patcher instead of A1111's modules.

Forge rebuilds ``p.sd_model.forge_objects`` from its LoRA-applied copy before every batch and samples with whatever
``forge_objects.unet`` then holds, so fewstep puts its patches on a clone in ``process_before_every_sampling`` (called
again before the hires pass); they vanish with the clone and need no undoing:
- CFG: Forge runs one model pass per step when the CFG scale is 1, and then never encodes the negative prompt;
  every kind but SUN sets the scale to 1 for both passes.
- SUN: the attn2 replace patches ComfyUI uses (``model_patcher.sun``) and a conditioning modifier that hands them the
  negative prompt's features and sets the scale to 1 for the model call. The negative prompt must be encoded for
  that, so the run's CFG scale stays above 1 (it has no other effect).
- whole-UNet students (guided, GDD): their weights as weight patches (the weights moved to the student's by the strength, after the
  prompt's LoRAs), a guided student's w offset as an object patch on the time MLP.
Host modules are imported inside functions.
"""

from __future__ import annotations

import os

from ..core.adapter_file import AdapterFileError
from ..core.guidance import TimeEmbedWithW
from ..core.run_plan import LORA, SUN_LAYERS, UNET_BLEND
from ..core.schedule import DiscreteSchedule
from ..model_patcher.sun import cross_attention_features, put_sun_patches, with_sun_negative
from ..model_patcher.unet_blend import add_unet_blend
from .ldm_unet import student_keys, sun_layers
from .run_state import ActiveRun

ENCODE_NEGATIVE_CFG = 2.0   # a CFG scale other than 1, so that Forge encodes the negative prompt for SUN


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


def ldm_unet(sd_model):
    return sd_model.forge_objects.unet.model.diffusion_model


def schedule_of(sd_model) -> DiscreteSchedule:
    return DiscreteSchedule.from_sigmas(sd_model.forge_objects.unet.model.predictor.sigmas.detach().float().cpu())


def forge_attention(q, k, v, extra_options):
    """Forge's attention (the implementation its start-up flags chose) on projected q, k, v."""
    from backend.attention import attention_function

    return attention_function(q, k, v, extra_options["n_heads"])


def configure(p, active: ActiveRun) -> None:
    """What Forge needs beyond the sampler settings ``host`` makes: the CFG scales, the adapter checked against the
    UNet (so that a mismatch stops the run before sampling). A LoRA goes through Forge's LoRA loader (the prompt tag)."""
    plan, unet = active.run.plan, ldm_unet(p.sd_model)
    if plan.weights == LORA:
        pass
    elif plan.weights == UNET_BLEND:
        active.student_keys = student_keys(unet, active.adapter)
    elif plan.weights == SUN_LAYERS:
        active.sun = sun_layers(unet, active.adapter)
    else:
        raise AdapterFileError(f"{active.run.adapter_name}: Forge cannot apply {plan.weights} weights with fewstep yet")
    if plan.negative_in_adapter:
        if p.cfg_scale == 1:
            p.cfg_scale = ENCODE_NEGATIVE_CFG
        p.hr_cfg = p.cfg_scale
    else:
        p.cfg_scale = p.hr_cfg = plan.cfg_scale


class SunNegative:
    """Conditioning modifier: the negative prompt's features go to the SUN patches, the model call runs at CFG 1
    (Forge then leaves the negative pass out)."""

    def __init__(self, negative_strength: float, cfg_scale: float):
        self.negative_strength, self.cfg_scale = negative_strength, cfg_scale

    def __call__(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        if uncond:
            model_options = with_sun_negative(model_options, cross_attention_features(uncond), self.negative_strength)
        return model, x, timestep, uncond, cond, self.cfg_scale, model_options, seed


def patch_unet(p, active: ActiveRun) -> None:
    """Before every sampling pass: the run's patches on a clone of the UNet Forge is about to sample with."""
    plan = active.run.plan
    unet = p.sd_model.forge_objects.unet.clone()
    if active.sun is not None:
        sun, names = active.sun
        active.sun_patches += put_sun_patches(unet, sun, names, plan.strength, forge_attention)
        unet.add_conditioning_modifier(SunNegative(plan.negative_strength, plan.cfg_scale))
    if active.run.unet_weights:
        tensors = active.adapter.tensors
        # Weight merged = weight · (1 − strength) + student · strength, after the patches already there (LoRAs).
        # Forge re-merges weights when the names of the patch sets change: the name says which file, which version.
        name = f"fewstep:{active.adapter.path}:{os.stat(active.adapter.path).st_mtime_ns}"
        add_unet_blend(unet, {f"diffusion_model.{ldm}": tensors[key] for key, ldm in active.student_keys.items()},
                       plan.strength, filename=name)
    if plan.w is not None:
        time_embed = unet.get_model_object("diffusion_model.time_embed")
        unet.add_object_patch("diffusion_model.time_embed", TimeEmbedWithW(time_embed, plan.w_offset(active.adapter.tensors)))
    p.sd_model.forge_objects.unet = unet


def lora_modules_applied(sd_model, path: str) -> int:
    """How many layers of the UNet and text encoder Forge's LoRA loader patched from the file at ``path``."""
    objects = sd_model.forge_objects_after_applying_lora
    count = 0
    for patcher in (objects.unet, objects.clip.patcher):
        for (filename, *_), patches in patcher.lora_patches.items():
            if os.path.realpath(filename) == os.path.realpath(path):
                count += len(patches)
    return count

