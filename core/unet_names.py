"""Names of a UNet's attention blocks in diffusers and in the original LDM code (A1111, Forge and ComfyUI keep LDM's).

diffusers groups a level's layers in ``down_blocks.i`` / ``up_blocks.i``; LDM numbers every block in one list, where
input block 0 is the input convolution, each level adds ``layers_per_block`` blocks plus a downsampler (none after the
last level), and each output level has ``layers_per_block + 1`` blocks. A transformer sits at index 1 of its LDM block
(index 0 is the ResNet). So with L = layers_per_block:

    down_blocks.i.attentions.j.<rest>  <->  input_blocks.(1 + i (L + 1) + j).1.<rest>
    mid_block.attentions.0.<rest>      <->  middle_block.1.<rest>
    up_blocks.i.attentions.j.<rest>    <->  output_blocks.(i (L + 1) + j).1.<rest>

``<rest>`` (``transformer_blocks.0.attn2``, ``proj_in``, …) is the same on both sides.
"""

from __future__ import annotations

import re

_DIFFUSERS = re.compile(r"^(down_blocks\.(\d+)|up_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.(.+)$")
_LDM = re.compile(r"^(input_blocks\.(\d+)|output_blocks\.(\d+)|middle_block)\.1\.(.+)$")


def ldm_attention_name(name: str, layers_per_block: int) -> str:
    """The LDM name of a diffusers attention-block module (``down_blocks.0.attentions.1.transformer_blocks.0.attn2``)."""
    m = _DIFFUSERS.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a module inside a diffusers UNet attention block")
    down, up, attention, rest = m.group(2), m.group(3), int(m.group(4)), m.group(5)
    if down is not None:
        return f"input_blocks.{1 + int(down) * (layers_per_block + 1) + attention}.1.{rest}"
    if up is not None:
        return f"output_blocks.{int(up) * (layers_per_block + 1) + attention}.1.{rest}"
    if attention != 0:
        raise ValueError(f"{name!r}: the mid block has one attention block")
    return f"middle_block.1.{rest}"


def diffusers_attention_name(name: str, layers_per_block: int) -> str:
    """The inverse of ``ldm_attention_name``."""
    m = _LDM.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a module inside an LDM UNet transformer")
    input_block, output_block, rest = m.group(2), m.group(3), m.group(4)
    if input_block is not None:
        level, index = divmod(int(input_block) - 1, layers_per_block + 1)
        if index == layers_per_block:
            raise ValueError(f"{name!r}: input block {input_block} is a downsampler, it holds no attention")
        return f"down_blocks.{level}.attentions.{index}.{rest}"
    if output_block is not None:
        level, index = divmod(int(output_block), layers_per_block + 1)
        return f"up_blocks.{level}.attentions.{index}.{rest}"
    return f"mid_block.attentions.0.{rest}"
