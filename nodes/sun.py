"""ComfyUI glue for SUN adapters: the adapter's layers found in a MODEL, the patches (``model_patcher.sun``, shared
with Forge) put on a clone with ComfyUI's attention, and a guider that feeds them the negative prompt.

``SunGuider`` runs one model pass per step with the positive prompt and puts the negative prompt's text features
into ``transformer_options``, where the patches read them.
"""

from __future__ import annotations

import os

from ..core.adapter_file import Adapter, AdapterFileError
from ..core.sun import SunAdapter, SunFileError, sun_adapter_for_model
from ..model_patcher.sun import SunAttn2Patch, cross_attention_features, put_sun_patches, with_sun_negative


def diffusers_to_ldm_attention(model) -> dict[str, str]:
    """{diffusers attention module name: LDM name} for the MODEL's UNet (attn1 and attn2)."""
    import comfy.utils

    names = {}
    for key, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
        if key.endswith((".attn1.to_q.weight", ".attn2.to_q.weight")):
            names[key[: -len(".to_q.weight")]] = ldm[: -len(".to_q.weight")]
    return names


def comfy_attention(q, k, v, extra_options):
    """ComfyUI's attention (the implementation its start-up flags chose) on projected q, k, v."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))


def sun_adapter_for(model, adapter: Adapter) -> tuple[SunAdapter, dict[str, str]]:
    """The adapter's layers (released or our layout) and the LDM names of their attention modules in this MODEL."""
    ldm = diffusers_to_ldm_attention(model)
    state = model.model.state_dict()
    key_shapes = {name: state[f"diffusion_model.{name}.to_k.weight"].shape for name in ldm.values() if name.endswith("attn2")}
    try:
        return sun_adapter_for_model(adapter.tensors, ldm, key_shapes), ldm
    except (SunFileError, ValueError) as exc:
        raise AdapterFileError(f"{os.path.basename(adapter.path)}: {exc}") from None


def add_sun(model, adapter: Adapter, strength: float) -> tuple[object, list[SunAttn2Patch]]:
    """A clone with the adapter's patches at ``strength``; the patches are returned so that callers can check they
    fire."""
    sun, ldm = sun_adapter_for(model, adapter)
    model = model.clone()
    return model, put_sun_patches(model, sun, ldm, strength, comfy_attention)


def make_sun_guider(model, negative_strength: float):
    """A CFGGuider subclass instance: one pass per step on the positive prompt, the negative in the SUN patches."""
    import comfy.samplers

    class SunGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            options = with_sun_negative(model_options, cross_attention_features(self.conds.get("negative")), negative_strength)
            return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds.get("positive")], x, timestep, options)[0]

    return SunGuider(model)
