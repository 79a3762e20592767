"""What a run changes in A1111's own UNet (Forge goes through its model patcher instead: ``forge.py``): SUN layers
beside the cross-attention modules, a whole-UNet student's weights and a guided student's time MLP; each change is
pushed on ``run_state.pending_undo``."""

from __future__ import annotations

import torch

from ..core.guidance import TimeEmbedWithW
from ..core.run_plan import unet_blend
from ..core.sun import multi_head_attention
from .ldm_unet import sun_layers
from .run_state import RUN_ATTR, ActiveRun, pending_undo


class SunAttention:
    """Stands in for one cross-attention module's forward during a run: its attention plus the SUN layer."""

    def __init__(self, module: torch.nn.Module, layer, name: str, active: ActiveRun):
        self.module, self.layer, self.name, self.active = module, layer, name, active

    def __call__(self, x, context=None, mask=None, **kwargs):
        m = self.module
        context = x if context is None else context
        q, k, v = m.to_q(x), m.to_k(context), m.to_v(context)

        def attend(q_, k_, v_):
            return multi_head_attention(q_, k_, v_, m.heads)

        h = attend(q, k, v)
        negative = self.active.negative
        if negative is not None:
            plan = self.active.run.plan
            with torch.no_grad():
                h = self.layer.follow(q)(attend, q, h, negative.to(q.device), context, plan.negative_strength, plan.strength)
            self.active.sun_layers_fired.add(self.name)
        return m.to_out(h)


def ldm_unet(sd_model) -> torch.nn.Module:
    return sd_model.model.diffusion_model


def install_sun(sd_model, active: ActiveRun) -> int:
    """Put the SUN layers on the model's cross-attention modules until the run ends; returns how many."""
    unet = ldm_unet(sd_model)
    sun, names = sun_layers(unet, active.adapter)
    for name in sun.names:
        module = unet.get_submodule(names[name])
        own = module.__dict__.get("forward")   # another extension's instance-level forward, kept as it was
        module.forward = SunAttention(module, sun.layer(name).requires_grad_(False), names[name], active)

        def restore(module=module, own=own):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own

        pending_undo.push(f"SUN on {names[name]}", restore)
    return len(sun.names)


def on_cfg_denoiser(params) -> None:
    """A1111 callback before every denoiser call: keep the negative prompt's text features for the SUN layers (A1111
    hands them over even when the negative pass itself is skipped)."""
    active = getattr(getattr(params.denoiser, "p", None), RUN_ATTR, None)
    if isinstance(active, ActiveRun) and active.run.plan.negative_in_adapter:
        uncond = params.text_uncond
        active.negative = uncond["crossattn"] if isinstance(uncond, dict) else uncond


def apply_student(sd_model, active: ActiveRun) -> None:
    """Once per run, after the prompt's LoRAs (and a LoRA student's own) are applied: a whole-UNet student's weights
    moved to the student's by the strength, a guided student's w offset on its time MLP."""
    if active.student_applied:
        return
    active.student_applied = True
    unet, plan = ldm_unet(sd_model), active.run.plan
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for key, ldm in active.student_keys.items():
            param, saved = params[ldm], params[ldm].detach().to("cpu", copy=True)
            param.copy_(unet_blend(param, active.adapter.tensors[key], plan.strength))
            pending_undo.push(f"weight {ldm}", lambda param=param, saved=saved: param.data.copy_(saved.to(param)))
    if plan.w is None:
        return
    time_embed = unet.time_embed
    offset = plan.w_offset(active.adapter.tensors)
    unet.time_embed = TimeEmbedWithW(time_embed, offset.to(next(time_embed.parameters()).device))

    def restore():
        unet.time_embed = time_embed

    pending_undo.push("time MLP", restore)
