"""UNet LoRA weights in the key layouts the field uses, converted without losing alpha.

Layouts (module paths are diffusers UNet names, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``):

- ``peft``: ``<path>.lora_A.weight`` / ``.lora_B.weight``; alpha lives in the LoraConfig, not the file.
- ``diffusers``: PEFT keys behind ``unet.`` (what ``save_lora_weights`` writes today); also read in the
  ``unet.<path>.lora.down.weight`` / ``.lora.up.weight`` spelling of diffusers' own conversion, which many
  released LoRAs use.
- ``diffusers_old``: ``unet.<block>.attn1.processor.to_q_lora.down.weight`` / ``.up.weight`` (LoRAAttnProcessor era).
- ``kohya``: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, which ComfyUI's and
  A1111's stock LoRA loaders map. The delta is up @ down * alpha / rank in every layout.

diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank, silently rescaling LoRAs trained with
alpha != rank; here alpha always travels with the weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch

LoraLayout = Literal["peft", "diffusers", "diffusers_old", "kohya"]
LAYOUTS: tuple[str, ...] = ("peft", "diffusers", "diffusers_old", "kohya")

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
DIFFUSERS_UNET_PREFIX = "unet."
# alpha / rank of a trained LoRA is about 1 (a few at most); far larger scales only make the model's outputs overflow.
MAX_LORA_SCALE = 64.0

# Segments of diffusers UNet module names that contain an underscore. kohya flattens "." to "_";
# rejoining these (longest first) inverts that unambiguously for SD1.5/SDXL UNets.
COMPOUND_SEGMENTS: tuple[str, ...] = tuple(sorted((
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "add_k_proj", "add_v_proj",
), key=lambda s: -s.count("_")))

_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# PEFT keys, with the adapter name that a module's own state_dict() keeps ("lora_A.default.weight").
_PEFT_KEY = re.compile(r"\.lora_([AB])(\.[^.]+)?\.weight$|\.lora\.(down|up)\.weight$")


@dataclass
class LoraModule:
    """One adapted layer: delta W = up @ down * alpha / rank (convolutions: over the flattened kernel)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change this module applies, shaped like the base layer's weight."""
        down = self.down.flatten(1).float()
        up = self.up.flatten(1).float()
        out = (up @ down) * self.scale
        return out.reshape(self.up.shape[:1] + self.down.shape[1:])


LoraModules = dict[str, LoraModule]


class LoraKeyError(ValueError):
    """A LoRA state dict whose keys do not form complete, recognisable modules."""


def detect_layout(keys) -> Optional[LoraLayout]:
    """The LoRA layout of a state dict's keys, or None if it holds no LoRA weights."""
    keys = list(keys)
    if any(k.startswith(KOHYA_UNET_PREFIX) or k.startswith(KOHYA_TEXT_PREFIXES) for k in keys):
        return "kohya"
    if any(_OLD_PROCESSOR.search(k) for k in keys):
        return "diffusers_old"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k for k in keys):
        return "diffusers" if any(k.startswith(DIFFUSERS_UNET_PREFIX) for k in keys) else "peft"
    return None


def kohya_name_to_module(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    parts = name.split("_")
    out, i = [], 0
    while i < len(parts):
        for compound in COMPOUND_SEGMENTS:
            n = compound.count("_") + 1
            if "_".join(parts[i:i + n]) == compound:
                out.append(compound)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def module_to_kohya_name(module: str) -> str:
    return KOHYA_UNET_PREFIX + module.replace(".", "_")


def read_lora(
    state_dict: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float] | None = None,
    layout: Optional[LoraLayout] = None,
) -> tuple[LoraModules, list[str]]:
    """Parse UNet LoRA weights in any layout into ``{module path: LoraModule}``.

    Args:
        alpha: for layouts that do not store it (PEFT/diffusers): one value, or per-module values;
            defaults to the rank (PEFT's default lora_alpha is 8 regardless of rank, so pass it when known).
    Returns:
        (modules, ignored keys): text-encoder weights are returned as ignored, not dropped silently.
    Raises:
        LoraKeyError on half modules (a down without its up) or keys of no known layout.
    """
    layout = layout or detect_layout(state_dict)
    if layout is None:
        raise LoraKeyError("no LoRA weights found: expected lora_down/lora_up, lora_A/lora_B or *_lora.down/up keys")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    stored_alpha: dict[str, float] = {}
    ignored: list[str] = []
    for key, tensor in state_dict.items():
        parsed = _parse_key(key, layout)
        if parsed is None:
            ignored.append(key)
            continue
        module, part = parsed
        if not tensor.dtype.is_floating_point:
            raise LoraKeyError(f"{key!r} is a {tensor.dtype} tensor; LoRA weights and alphas are floating point")
        if part == "alpha":
            if tensor.numel() != 1:
                raise LoraKeyError(f"{key!r} has shape {list(tensor.shape)}; an alpha is one number")
            # Tensors on the meta device (a header's shapes, checked before loading) have no value yet.
            stored_alpha[module] = math.nan if tensor.is_meta else float(tensor)
        else:
            pairs.setdefault(module, {})[part] = tensor
    modules: LoraModules = {}
    for module, parts in pairs.items():
        if set(parts) != {"down", "up"}:
            raise LoraKeyError(f"LoRA module {module!r} has {sorted(parts)} but needs both down and up weights")
        rank = _checked_rank(module, parts["down"], parts["up"])
        if module in stored_alpha:
            a = stored_alpha[module]
        elif layout == "kohya":
            raise LoraKeyError(f"kohya LoRA module {module!r} has no .alpha; kohya files store one per module")
        elif isinstance(alpha, Mapping):
            a = float(alpha.get(module, rank))
        else:
            a = float(alpha) if alpha is not None else float(rank)
        if not math.isnan(a) or not parts["down"].is_meta:
            _check_alpha(module, a, rank)
        modules[module] = LoraModule(parts["down"], parts["up"], a)
    unexpected = sorted(set(stored_alpha) - set(modules))
    if unexpected:
        raise LoraKeyError(f"alpha without weights for {unexpected[:3]}")
    return modules, ignored


def _checked_rank(module: str, down: torch.Tensor, up: torch.Tensor) -> int:
    """The rank of a down/up pair whose shapes form a LoRA: (r, in) and (out, r), or (r, in, kh, kw) and (out, r, 1, 1)."""
    shapes = f"down {list(down.shape)}, up {list(up.shape)}"
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraKeyError(f"LoRA module {module!r} has {shapes}; expected 2-D (linear) or 4-D (convolution) weights")
    rank = down.shape[0]
    if rank < 1 or up.shape[1] != rank or down.shape[1] < 1 or up.shape[0] < 1 or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LoraKeyError(f"LoRA module {module!r} has {shapes}; its ranks must match (down's first dim is up's second)")
    return rank


def _check_alpha(module: str, alpha: float, rank: int) -> None:
    if not math.isfinite(alpha) or alpha <= 0 or alpha / rank > MAX_LORA_SCALE:
        raise LoraKeyError(f"LoRA module {module!r} has alpha {alpha:g} at rank {rank}; expected a finite alpha above 0 "
                           f"and at most {MAX_LORA_SCALE:g} x the rank")


def _parse_key(key: str, layout: LoraLayout) -> Optional[tuple[str, str]]:
    """(module path, "down" | "up" | "alpha") for a UNet LoRA key, None for keys outside the UNet."""
    if layout == "kohya":
        if not key.startswith(KOHYA_UNET_PREFIX):
            if key.startswith(KOHYA_TEXT_PREFIXES):
                return None
            raise LoraKeyError(f"unexpected key {key!r} in a kohya LoRA (expected lora_unet_…/lora_te…)")
        name, _, suffix = key[len(KOHYA_UNET_PREFIX):].partition(".")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        if part is None:
            raise LoraKeyError(f"unexpected kohya key {key!r}: expected .lora_down.weight, .lora_up.weight or .alpha")
        return kohya_name_to_module(name), part
    elif layout == "diffusers_old":
        if not key.startswith(DIFFUSERS_UNET_PREFIX):
            return None
        m = _OLD_PROCESSOR.search(key)
        if m is None:
            raise LoraKeyError(f"unexpected key {key!r} in an old-style diffusers LoRA")
        proj = m.group(1) + (".0" if m.group(1) == "to_out" else "")
        return key[len(DIFFUSERS_UNET_PREFIX):m.start()] + "." + proj, m.group(2)
    elif layout in ("peft", "diffusers"):
        if layout == "diffusers":
            if not key.startswith(DIFFUSERS_UNET_PREFIX):
                return None
            key = key[len(DIFFUSERS_UNET_PREFIX):]
        key = key.removeprefix("base_model.model.")
        m = _PEFT_KEY.search(key)
        if m is not None:
            return key[: m.start()], "down" if m.group(1) == "A" or m.group(3) == "down" else "up"
        if key.endswith(".alpha"):
            return key[: -len(".alpha")], "alpha"
        raise LoraKeyError(f"unexpected key {key!r} in a PEFT LoRA: expected .lora_A.weight / .lora_B.weight")
    else:
        raise ValueError(f"unknown LoRA layout {layout!r}; expected one of {LAYOUTS}")


def write_lora(modules: LoraModules, layout: LoraLayout = "kohya") -> dict[str, torch.Tensor]:
    """A state dict in the given layout. Only kohya stores alpha in the file; for the others use ``alphas_of``."""
    out: dict[str, torch.Tensor] = {}
    for module, lora in sorted(modules.items()):
        if layout == "kohya":
            name = module_to_kohya_name(module)
            out[f"{name}.lora_down.weight"] = lora.down.contiguous()
            out[f"{name}.lora_up.weight"] = lora.up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(lora.alpha))
        elif layout in ("peft", "diffusers"):
            prefix = DIFFUSERS_UNET_PREFIX if layout == "diffusers" else ""
            out[f"{prefix}{module}.lora_A.weight"] = lora.down.contiguous()
            out[f"{prefix}{module}.lora_B.weight"] = lora.up.contiguous()
        elif layout == "diffusers_old":
            block, _, proj = module.rpartition(".")
            if proj == "0" and block.endswith(".to_out"):
                block, proj = block[: -len(".to_out")], "to_out"
            if proj not in ("to_q", "to_k", "to_v", "to_out"):
                raise LoraKeyError(f"the old diffusers layout only holds attention projections; cannot write {module!r}")
            out[f"{DIFFUSERS_UNET_PREFIX}{block}.processor.{proj}_lora.down.weight"] = lora.down.contiguous()
            out[f"{DIFFUSERS_UNET_PREFIX}{block}.processor.{proj}_lora.up.weight"] = lora.up.contiguous()
        else:
            raise ValueError(f"unknown LoRA layout {layout!r}; expected one of {LAYOUTS}")
    return out


def alphas_of(modules: LoraModules) -> dict[str, float]:
    """Per-module alpha, for PEFT's ``LoraConfig(alpha_pattern=...)`` when the layout does not store it."""
    return {module: lora.alpha for module, lora in modules.items()}


def convert_lora(
    state_dict: Mapping[str, torch.Tensor],
    to: LoraLayout,
    alpha: float | Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Convert UNet LoRA weights between layouts (text-encoder keys are left out)."""
    modules, _ = read_lora(state_dict, alpha=alpha)
    return write_lora(modules, to)


@torch.no_grad()
def merge_lora(model: torch.nn.Module, modules: LoraModules, strength: float = 1.0) -> None:
    """Add each module's delta (times ``strength``) into the weights of ``model``'s layers, in place.

    Module paths are the model's own names (diffusers UNet names for UNet LoRAs). Raises LoraKeyError
    naming the paths the model lacks or whose weight shape differs, before changing anything.
    """
    layers = dict(model.named_modules())
    missing = sorted(m for m in modules if m not in layers or not hasattr(layers[m], "weight"))
    if missing:
        raise LoraKeyError(f"{len(missing)} LoRA modules have no matching layer in the model, e.g. {missing[:3]}")
    mismatched = [m for m, lora in modules.items() if tuple(lora.delta().shape) != tuple(layers[m].weight.shape)]
    if mismatched:
        m = mismatched[0]
        raise LoraKeyError(f"LoRA for {m!r} changes a {tuple(modules[m].delta().shape)} weight but the model's is "
                           f"{tuple(layers[m].weight.shape)}: the LoRA was made for another base model")
    def delta_of(m: str) -> torch.Tensor:
        weight = layers[m].weight
        return (modules[m].delta() * strength).to(device=weight.device, dtype=weight.dtype)

    # Two passes, one delta in memory at a time: nothing changes unless every merged weight stays finite.
    for m in modules:
        if not torch.isfinite(layers[m].weight + delta_of(m)).all():
            raise LoraKeyError(f"LoRA for {m!r} makes the layer's weights overflow {layers[m].weight.dtype}: "
                               "its values or alpha are far too large")
    for m in modules:
        layers[m].weight.add_(delta_of(m))
