"""A diffusers ``UNet2DConditionModel`` config read from an untrusted file: checked field by field, sized before building.

A snap_student file carries its own (slim) UNet's architecture. Hosts build that network from the config, so a few
bytes of metadata could ask for a default full-size UNet or for terabytes; ``unet_parameter_count`` computes what the
config would allocate without building anything, and ``check_unet_config`` refuses fields outside the architectures
fewstep writes (SD1.5/SDXL-style UNets, SnapFusion's slim ones) with one line naming the field.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
MAX_LEVELS = 6
MAX_LAYERS_PER_LEVEL = 10
MAX_TRANSFORMER_DEPTH = 20
MAX_CHANNELS = 4096


class UnetConfigError(ValueError):
    """A UNet config that fewstep will not build; the message names the field."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and lo <= v <= hi


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _one_of(*allowed) -> Callable[[Any], bool]:
    return lambda v: any(v == a and type(v) is type(a) for a in allowed)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _per_level(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: check(v) or isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_LEVELS and all(map(check, v))


def _depth(v) -> bool:
    """A transformer depth per level: one int, or one per layer (SDXL's reverse depths are written that way)."""
    depth = _int_in(0, MAX_TRANSFORMER_DEPTH)
    return depth(v) or isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_LAYERS_PER_LEVEL + 1 and all(map(depth, v))


_BOOL = _one_of(True, False)
# field -> (check, what the check accepts); every field diffusers' UNet2DConditionModel takes, and no other.
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sample_size": (_optional(_int_in(1, 1024)), "an integer latent size"),
    "in_channels": (_int_in(1, 64), "a small positive integer"),
    "out_channels": (_int_in(1, 64), "a small positive integer"),
    "center_input_sample": (_BOOL, "true or false"),
    "flip_sin_to_cos": (_BOOL, "true or false"),
    "freq_shift": (_number, "a number"),
    "down_block_types": (lambda v: isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_LEVELS and all(b in DOWN_BLOCKS for b in v),
                         f"1 to {MAX_LEVELS} of {', '.join(DOWN_BLOCKS)}"),
    "mid_block_type": (lambda v: v in MID_BLOCKS, "UNetMidBlock2DCrossAttn or null"),
    "up_block_types": (lambda v: isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_LEVELS and all(b in UP_BLOCKS for b in v),
                       f"1 to {MAX_LEVELS} of {', '.join(UP_BLOCKS)}"),
    "only_cross_attention": (_one_of(False), "false"),
    "block_out_channels": (lambda v: isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_LEVELS and all(map(_int_in(1, MAX_CHANNELS), v)),
                           f"one channel count (1 to {MAX_CHANNELS}) per level"),
    "layers_per_block": (_per_level(_int_in(1, MAX_LAYERS_PER_LEVEL)), f"1 to {MAX_LAYERS_PER_LEVEL} layers, or one count per level"),
    "downsample_padding": (_int_in(0, 1), "0 or 1"),
    "mid_block_scale_factor": (_number, "a number"),
    "dropout": (_number, "a number"),
    "act_fn": (_one_of("silu"), '"silu"'),
    "norm_num_groups": (_int_in(1, MAX_CHANNELS), "a positive integer"),
    "norm_eps": (_number, "a number"),
    "cross_attention_dim": (_int_in(1, MAX_CHANNELS), "the text encoder's width"),
    "transformer_layers_per_block": (lambda v: _int_in(0, MAX_TRANSFORMER_DEPTH)(v) or isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_LEVELS and all(map(_depth, v)),
                                     "a transformer depth, or one per level"),
    "reverse_transformer_layers_per_block": (_optional(lambda v: isinstance(v, (list, tuple)) and 0 < len(v) <= MAX_LEVELS and all(map(_depth, v))),
                                             "null or one transformer depth per up level"),
    "encoder_hid_dim": (_one_of(None), "null"),
    "encoder_hid_dim_type": (_one_of(None), "null"),
    "attention_head_dim": (_per_level(_int_in(1, MAX_CHANNELS)), "a head count or width, or one per level"),
    "num_attention_heads": (_one_of(None), "null (diffusers takes the heads from attention_head_dim)"),
    "dual_cross_attention": (_one_of(False), "false"),
    "use_linear_projection": (_BOOL, "true or false"),
    "class_embed_type": (_one_of(None), "null"),
    "addition_embed_type": (_one_of(None, "text_time"), 'null or "text_time"'),
    "addition_time_embed_dim": (_optional(_int_in(1, MAX_CHANNELS)), "null or a positive integer"),
    "num_class_embeds": (_one_of(None), "null"),
    "upcast_attention": (_optional(_BOOL), "true or false"),
    "resnet_time_scale_shift": (_one_of("default"), '"default"'),
    "resnet_skip_time_act": (_one_of(False), "false"),
    "resnet_out_scale_factor": (_number, "a number"),
    "time_embedding_type": (_one_of("positional"), '"positional"'),
    "time_embedding_dim": (_optional(_int_in(1, 4 * MAX_CHANNELS)), "null or a positive integer"),
    "time_embedding_act_fn": (_one_of(None), "null"),
    "timestep_post_act": (_one_of(None), "null"),
    "time_cond_proj_dim": (_optional(_int_in(1, 4 * MAX_CHANNELS)), "null or a positive integer"),
    "conv_in_kernel": (_one_of(1, 3), "1 or 3"),
    "conv_out_kernel": (_one_of(1, 3), "1 or 3"),
    "projection_class_embeddings_input_dim": (_optional(_int_in(1, 16 * MAX_CHANNELS)), "null or a positive integer"),
    "attention_type": (_one_of("default"), '"default"'),
    "class_embeddings_concat": (_one_of(False), "false"),
    "mid_block_only_cross_attention": (_optional(_one_of(False)), "null or false"),
    "cross_attention_norm": (_one_of(None), "null"),
    "addition_embed_type_num_heads": (_int_in(1, 1024), "a positive integer"),
}
REQUIRED = ("down_block_types", "up_block_types", "block_out_channels", "cross_attention_dim")


def check_unet_config(config: Any) -> int:
    """Raise UnetConfigError unless ``config`` is a UNet fewstep can build; return its parameter count."""
    if not isinstance(config, Mapping):
        raise UnetConfigError(f"the UNet config must be a JSON object; found {type(config).__name__}")
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
        raise UnetConfigError(f"unknown UNet config field {unknown[0]!r}")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise UnetConfigError(f"the UNet config lacks {', '.join(missing)}")
    for key, value in config.items():
        check, expected = FIELDS[key]
        if not check(value):
            raise UnetConfigError(f"UNet config field {key!r} is {_short(value)}; expected {expected}")
    levels = len(config["block_out_channels"])
    for key in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim", "num_attention_heads",
                "transformer_layers_per_block", "reverse_transformer_layers_per_block"):
        value = config.get(key)
        if isinstance(value, (list, tuple)) and len(value) != levels:
            raise UnetConfigError(f"UNet config field {key!r} has {len(value)} entries for {levels} levels")
    groups = config.get("norm_num_groups", 32)
    heads = config.get("attention_head_dim", 8)
    for level, channels in enumerate(config["block_out_channels"]):
        level_heads = heads[level] if isinstance(heads, (list, tuple)) else heads
        if channels % groups or channels % level_heads:
            raise UnetConfigError(f"UNet level {level} has {channels} channels, which {groups} norm groups and "
                                  f"{level_heads} attention heads must divide")
    if config.get("addition_embed_type") == "text_time" and not (
            config.get("addition_time_embed_dim") and config.get("projection_class_embeddings_input_dim")):
        raise UnetConfigError("a text_time UNet config needs addition_time_embed_dim and projection_class_embeddings_input_dim")
    return unet_parameter_count(config)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _conv(n_in: int, n_out: int, kernel: int) -> int:
    return n_in * n_out * kernel * kernel + n_out


def _resnet(n_in: int, n_out: int, temb: int) -> int:
    """diffusers' ResnetBlock2D: two GroupNorms, two 3x3 convs, the time projection, a 1x1 shortcut when widths differ."""
    shortcut = _conv(n_in, n_out, 1) if n_in != n_out else 0
    return 2 * n_in + _conv(n_in, n_out, 3) + _linear(temb, n_out) + 2 * n_out + _conv(n_out, n_out, 3) + shortcut


def _transformer(channels: int, depth: int, context: int) -> int:
    """diffusers' Transformer2DModel at width ``channels``: norm, proj_in/out (linear or 1x1 conv: the same count) and
    ``depth`` BasicTransformerBlocks (self-attention, cross-attention over ``context``, GEGLU feed-forward)."""
    d = channels
    block = (2 * d + 3 * d * d + _linear(d, d)                     # norm1, attn1
             + 2 * d + d * d + 2 * context * d + _linear(d, d)     # norm2, attn2
             + 2 * d + _linear(d, 8 * d) + _linear(4 * d, d))      # norm3, GEGLU feed-forward
    return 2 * d + 2 * _linear(d, d) + depth * block


def _level_values(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _layer_depths(depth, layers: int) -> list[int]:
    return list(depth) if isinstance(depth, (list, tuple)) else [depth] * layers


def unet_parameter_count(config: Mapping[str, Any]) -> int:
    """The number of parameters ``UNet2DConditionModel(**config)`` has, computed without building it (a config that
    ``check_unet_config`` accepted)."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers = _level_values(config.get("layers_per_block", 2), levels)
    depths = _level_values(config.get("transformer_layers_per_block", 1), levels)
    reverse = config.get("reverse_transformer_layers_per_block") or list(reversed(depths))
    context = config["cross_attention_dim"]
    in_kernel, out_kernel = config.get("conv_in_kernel", 3), config.get("conv_out_kernel", 3)
    temb = config.get("time_embedding_dim") or 4 * channels[0]
    total = _conv(config.get("in_channels", 4), channels[0], in_kernel)
    total += _linear(channels[0], temb) + _linear(temb, temb)
    if config.get("time_cond_proj_dim"):
        total += _linear(config["time_cond_proj_dim"], channels[0], bias=False)
    if config.get("addition_embed_type") == "text_time":
        total += _linear(config["projection_class_embeddings_input_dim"], temb) + _linear(temb, temb)
    out = channels[0]
    for level, block in enumerate(config["down_block_types"]):
        n_in, out = out, channels[level]
        level_depths = _layer_depths(depths[level], layers[level])
        for j in range(layers[level]):
            total += _resnet(n_in if j == 0 else out, out, temb)
            if block.startswith("CrossAttn"):
                total += _transformer(out, level_depths[j], context)
        if level < levels - 1:
            total += _conv(out, out, 3)   # Downsample2D
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        mid_depth = depths[-1] if _is_int(depths[-1]) else depths[-1][0]
        total += 2 * _resnet(channels[-1], channels[-1], temb) + _transformer(channels[-1], mid_depth, context)
    up_channels = list(reversed(channels))
    up_layers = list(reversed(layers))
    out = up_channels[0]
    for level, block in enumerate(config["up_block_types"]):
        prev, out = out, up_channels[level]
        skip_in = up_channels[min(level + 1, levels - 1)]
        count = up_layers[level] + 1
        level_depths = _layer_depths(reverse[level], count)
        for j in range(count):
            skip = skip_in if j == count - 1 else out
            total += _resnet((prev if j == 0 else out) + skip, out, temb)
            if block.startswith("CrossAttn"):
                total += _transformer(out, level_depths[j], context)
        if level < levels - 1:
            total += _conv(out, out, 3)   # Upsample2D
    return total + 2 * channels[0] + _conv(channels[0], config.get("out_channels", 4), out_kernel)
