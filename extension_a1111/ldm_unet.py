"""fewstep adapters on an LDM-layout UNet (A1111's and Forge's ``diffusion_model``): the SUN layers' modules and a
whole-UNet student's parameters, found by name and checked by shape before a run starts."""

from __future__ import annotations

import os

import torch

from ..core.adapter_file import W_EMBEDDING_KEY, Adapter, AdapterFileError
from ..core.sun import SunAdapter, SunFileError, sun_adapter_for_model
from ..core.unet_names import diffusers_attention_name, ldm_unet_keys


def layers_per_block(unet: torch.nn.Module) -> int:
    blocks = unet.num_res_blocks
    return blocks[0] if isinstance(blocks, (list, tuple)) else blocks


def sun_layers(unet: torch.nn.Module, adapter: Adapter) -> tuple[SunAdapter, dict[str, str]]:
    """The adapter's layers checked against the LDM UNet, and {diffusers name: LDM name} of its attention modules."""
    names = {diffusers_attention_name(n, layers_per_block(unet)): n for n, _ in unet.named_modules()
             if n.endswith((".attn1", ".attn2"))}
    key_shapes = {n: unet.get_submodule(n).to_k.weight.shape for n in names.values() if n.endswith("attn2")}
    try:
        return sun_adapter_for_model(adapter.tensors, names, key_shapes), names
    except (SunFileError, ValueError) as exc:
        raise AdapterFileError(f"{os.path.basename(adapter.path)}: {exc}") from None


def student_keys(unet: torch.nn.Module, adapter: Adapter) -> dict[str, str]:
    """{the student file's UNet key: the LDM UNet's parameter name}; every tensor must fit, and a guided student needs
    its w projection (checked before the run)."""
    name = os.path.basename(adapter.path)
    tensors = {k: v for k, v in adapter.tensors.items() if k != W_EMBEDDING_KEY}
    try:
        keys = ldm_unet_keys(tensors, layers_per_block(unet))
    except ValueError as exc:
        raise AdapterFileError(f"{name}: {exc}") from None
    params = dict(unet.named_parameters())
    unmatched = [k for k, n in keys.items() if n not in params or tuple(params[n].shape) != tuple(tensors[k].shape)]
    if unmatched or (adapter.metadata.kind == "guided_student" and W_EMBEDDING_KEY not in adapter.tensors):
        example = unmatched[0] if unmatched else W_EMBEDDING_KEY
        raise AdapterFileError(f"{name}: {len(unmatched) or 1} UNet tensors do not fit this model (e.g. {example}): the "
                               "student was made for a different model")
    return keys
