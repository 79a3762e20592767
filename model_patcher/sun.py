"""SUN adapters on a ModelPatcher (ComfyUI, Forge): attn2 replace patches that run ``core.sun`` and the
``transformer_options`` entry through which a guider hands them the negative prompt.

One replace patch goes on every cross-attention layer the adapter covers (keyed as the patcher's transformer blocks
address them: ("input", 1, 0), ("middle", 0, 0), ("output", 3, 0), ...) plus, for the add_pos variant, one attn2
patch that hands the raw positive text features on to the replace patch (which only sees projected keys). The
guider (ComfyUI's ``SunGuider``, Forge's conditioning modifier) puts the negative prompt's text features into
``transformer_options`` under ``SUN_OPTIONS_KEY``, where the patches read them.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import torch

from ..core.sun import SunAdapter, SunLayer

logger = logging.getLogger("fewstep")

SUN_OPTIONS_KEY = "fewstep_sun"              # transformer_options entry the guider sets: negative features, strength
POSITIVE_CONTEXT_KEY = "fewstep_sun_context"  # extra_options entry the context tap sets for the replace patches
_LDM_ATTN2 = re.compile(r"^(input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))\.1\.transformer_blocks\.(\d+)\.attn2$")


def patch_key(ldm_name: str) -> tuple[str, int, int]:
    """The (block, number, transformer index) under which ComfyUI looks up an attn2 replace patch."""
    m = _LDM_ATTN2.match(ldm_name)
    if m is None:
        raise ValueError(f"{ldm_name} is not a UNet cross-attention layer")
    if m.group(2) is not None:
        return "input", int(m.group(2)), int(m.group(4))
    if m.group(3) is not None:
        return "output", int(m.group(3)), int(m.group(4))
    return "middle", 0, int(m.group(4))


class SunAttn2Patch:
    """An attn2 replace patch: the layer's attention plus its SUN branches (``core.sun.SunLayer``). ComfyUI and Forge
    call replace patches the same way; ``attention(q, k, v, extra_options)`` is the host's attention function."""

    def __init__(self, layer: SunLayer, strength: float, key: tuple[str, int, int], attention):
        self.layer, self.strength, self.key, self.attention = layer, strength, key, attention
        self.fired = False   # ran with a negative prompt at least once

    def to(self, device) -> "SunAttn2Patch":
        self.layer.to(device)
        return self

    def __call__(self, q, k, v, extra_options):
        def attend(q_, k_, v_):
            return self.attention(q_, k_, v_, extra_options)

        h_pos = attend(q, k, v)
        sun = extra_options.get(SUN_OPTIONS_KEY)
        if sun is None:
            _warn_once("a SUN adapter ran without a negative prompt: sample with FewStep SUN Guider or FewStep KSampler")
            return h_pos
        if logger.isEnabledFor(logging.DEBUG):   # host tests check from the log that every patch fires
            logger.debug("fewstep: SUN layer %s ran with a negative prompt", self.key)
        self.fired = True
        positive = extra_options.get(POSITIVE_CONTEXT_KEY)
        with torch.no_grad():
            return self.layer.follow(q)(attend, q, h_pos, sun["negative"].to(q.device), positive, sun["negative_strength"], self.strength)


def positive_context_tap(n, context, value, extra_options):
    """attn2 patch: keep the raw positive text features for the add_pos branch of the replace patch."""
    extra_options[POSITIVE_CONTEXT_KEY] = context
    return n, context, value


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("fewstep: %s", message)


def put_sun_patches(model, sun: SunAdapter, ldm: dict[str, str], strength: float, attention) -> list[SunAttn2Patch]:
    """The adapter's attn2 replace patches at ``strength`` (and the context tap for add_pos) put on ``model``, a
    ComfyUI or Forge model patcher; ``ldm`` maps the adapter's attention names to the model's."""
    patches = []
    for layer_name in sun.names:
        patch = SunAttn2Patch(sun.layer(layer_name).requires_grad_(False), strength, patch_key(ldm[layer_name]), attention)
        model.set_model_attn2_replace(patch, *patch.key)
        patches.append(patch)
    if sun.variant == "add_pos":
        model.set_model_attn2_patch(positive_context_tap)
    return patches


def cross_attention_features(conds: Optional[list]) -> torch.Tensor:
    """The text features of the first processed conditioning entry (what a CLIP Text Encode produced)."""
    if not conds:
        raise ValueError("FewStep SUN Guider needs a negative conditioning (an empty prompt is fine)")
    return conds[0]["model_conds"]["c_crossattn"].cond


def with_sun_negative(model_options: dict, negative: torch.Tensor, negative_strength: float) -> dict:
    """A copy of ``model_options`` whose transformer_options hand the SUN patches the negative prompt's features."""
    transformer_options = {**model_options.get("transformer_options", {}),
                           SUN_OPTIONS_KEY: {"negative": negative, "negative_strength": negative_strength}}
    return {**model_options, "transformer_options": transformer_options}
