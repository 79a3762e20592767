"""SUN on a diffusers UNet: attention processors that run ``core.sun`` in every cross-attention layer.

The negative prompt's text features reach the processors through one shared ``SunInputs`` object, set around a
forward pass (``with inputs.negative_prompt(features):``). With no negative set, the processors compute plain
attention: the same UNet then serves as the frozen teacher, so training holds one copy of it.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ..core.sun import SunAdapter, SunLayer, sun_adapter_for_model


class SunInputs:
    """What the processors read during a forward pass: the negative text features and the negative strength."""

    def __init__(self):
        self.negative: Optional[torch.Tensor] = None
        self.strength = 1.0

    @contextlib.contextmanager
    def negative_prompt(self, features: torch.Tensor, strength: float = 1.0):
        previous = self.negative, self.strength
        self.negative, self.strength = features, strength
        try:
            yield
        finally:
            self.negative, self.strength = previous


def _multihead(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    batch, heads = query.shape[0], attn.heads
    q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, query.shape[-1])


class SunAttnProcessor:
    """A diffusers attention processor for one cross-attention layer with its SUN layer. SD-family attn2 layers have no
    spatial/group norm, cross norm or attention mask, so only what they use is kept (as the official processor does)."""

    def __init__(self, layer: SunLayer, inputs: SunInputs):
        self.layer, self.inputs = layer, inputs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        context = encoder_hidden_states
        query = attn.to_q(hidden_states)
        h_pos = _multihead(attn, query, attn.to_k(context), attn.to_v(context))
        if self.inputs.negative is not None:
            h_pos = self.layer(lambda q, k, v: _multihead(attn, q, k, v), query, h_pos, self.inputs.negative, context,
                               self.inputs.strength)
        out = attn.to_out[1](attn.to_out[0](h_pos))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_modules(unet) -> dict:
    """{diffusers name: Attention module} of the UNet's cross-attention layers."""
    return {name: module for name, module in unet.named_modules() if name.endswith("attn2") and hasattr(module, "to_k")}


def new_sun_adapter(unet, add_pos: bool) -> SunAdapter:
    """An adapter for every cross-attention layer of ``unet``, initialised to leave it unchanged (``init_from_layer``)."""
    layers = {}
    for name, attn in cross_attention_modules(unet).items():
        weight = attn.to_k.weight
        layers[name] = SunLayer(weight.shape[1], weight.shape[0], add_pos).init_from_layer(weight, attn.to_v.weight)
    return SunAdapter(layers).to(unet.device)


def sun_adapter_from_tensors(unet, tensors: Mapping[str, torch.Tensor]) -> SunAdapter:
    """An adapter from file tensors in our layout or the released one, checked against ``unet``'s layers."""
    names = {n[: -len(".processor")]: n[: -len(".processor")] for n in unet.attn_processors}
    key_shapes = {name: module.to_k.weight.shape for name, module in cross_attention_modules(unet).items()}
    return sun_adapter_for_model(tensors, names, key_shapes).to(unet.device, unet.dtype)


def attach_sun(unet, adapter: SunAdapter) -> SunInputs:
    """Install the adapter's processors on ``unet`` (its other attention layers keep theirs); returns their inputs."""
    inputs = SunInputs()
    processors = {}
    for name, processor in unet.attn_processors.items():
        module = name[: -len(".processor")]
        processors[name] = SunAttnProcessor(adapter.layer(module), inputs) if module in adapter.names else processor
    unet.set_attn_processor(processors)
    return inputs
