"""Names of a UNet's attention blocks in diffusers and in the original LDM code (A1111, Forge and ComfyUI keep LDM's).

diffusers groups a level's layers in ``down_blocks.i`` / ``up_blocks.i``; LDM numbers every block in one list, where
input block 0 is the input convolution, each level adds ``layers_per_block`` blocks plus a downsampler (none after the
last level), and each output level has ``layers_per_block + 1`` blocks. A transformer sits at index 1 of its LDM block
(index 0 is the ResNet). So with L = layers_per_block:

    down_blocks.i.attentions.j.<rest>  <->  input_blocks.(1 + i (L + 1) + j).1.<rest>
    mid_block.attentions.0.<rest>      <->  middle_block.1.<rest>
    up_blocks.i.attentions.j.<rest>    <->  output_blocks.(i (L + 1) + j).1.<rest>

``<rest>`` (``transformer_blocks.0.attn2``, ``proj_in``, …) is the same on both sides. ``ldm_unet_keys`` maps every
weight of a UNet (ResNets, samplers, embeddings too), for hosts that patch a whole UNet (a guided student).
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


_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                 "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID_PART = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _resnet(rest: str) -> str:
    part, _, param = rest.rpartition(".")
    return f"{_RESNET_PARTS.get(part, part)}.{param}"


def ldm_unet_keys(keys, layers_per_block: int) -> dict[str, str]:
    """{diffusers UNet2DConditionModel state-dict key: LDM key (without ``model.diffusion_model.``)} for SD1.5/SDXL-style
    UNets. An up block's upsampler sits after its transformer when the block has one, which ``keys`` tells."""
    keys = list(keys)
    with_attention = {int(m.group(2)) for m in map(_BLOCK_PART.match, keys) if m and m.group(1) == "up_blocks" and m.group(3) == "attentions"}
    out = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module in _TOP_LEVEL:
            out[key] = f"{_TOP_LEVEL[module]}.{param}"
            continue
        m = _MID_PART.match(key)
        if m:
            kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
            out[key] = f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * index}.{_resnet(rest)}"
            continue
        m = _BLOCK_PART.match(key)
        if m is None:
            raise ValueError(f"{key!r} is not a key of an SD-style UNet2DConditionModel")
        section, level, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        first = 1 + level * (layers_per_block + 1) if section == "down_blocks" else level * (layers_per_block + 1)
        if kind == "resnets":
            out[key] = f"{'input' if section == 'down_blocks' else 'output'}_blocks.{first + index}.0.{_resnet(rest)}"
        elif kind == "attentions":
            out[key] = ldm_attention_name(f"{section}.{level}.attentions.{index}.{rest}", layers_per_block)
        elif kind == "downsamplers":
            out[key] = f"input_blocks.{first + layers_per_block}.0.{rest.replace('conv.', 'op.', 1)}"
        else:
            out[key] = f"output_blocks.{first + layers_per_block}.{2 if level in with_attention else 1}.{rest}"
    return out


def comfy_unet_config(base: dict, config: dict) -> dict:
    """ComfyUI's UNet config for a diffusers ``UNet2DConditionModel`` config of the base model's family: per-level
    ``num_res_blocks`` and one transformer depth per layer (0: no cross-attention), the up layers' in reverse
    (``comfy.utils.unet_to_diffusers`` pops them from the end), ``transformer_depth_middle`` -2 for no mid block.
    This is how ComfyUI itself describes pruned UNets (SSD-1B, Vega, KOALA)."""
    levels = len(config["down_block_types"])
    layers = config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    depth = config.get("transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    reverse = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))

    def per_layer(block_type: str, level_depth, n: int) -> list[int]:
        if not block_type.startswith("CrossAttn"):
            return [0] * n
        return list(level_depth) if isinstance(level_depth, (list, tuple)) else [level_depth] * n

    down = [d for i in range(levels) for d in per_layer(config["down_block_types"][i], depth[i], layers[i])]
    up = [d for j in range(levels) for d in per_layer(config["up_block_types"][j], reverse[j], layers[levels - 1 - j] + 1)]
    mid = depth[-1] if isinstance(depth[-1], int) else max(depth[-1])
    return {**base, "num_res_blocks": layers, "transformer_depth": down, "transformer_depth_output": up[::-1],
            "transformer_depth_middle": -2 if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None else mid}
