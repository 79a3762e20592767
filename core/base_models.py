"""Which base model a set of weights belongs to, told from key names and shapes.

Architecture facts live here as data. Shapes decide first (the cross-attention input width is the text
encoder's width: 768 for SD1.5, 2048 for SDXL), then structure (SDXL has no attention at the first level,
deeper transformers and an extra embedding), so that tiny test models with narrow widths are told apart too.
Key names may use dots (diffusers/PEFT) or underscores (kohya), and diffusers or LDM block names.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

BASES: tuple[str, ...] = ("sd15", "sdxl", "pixart")

# Input width of cross-attention key/value projections, by base model.
CONTEXT_DIMS: dict[int, str] = {768: "sd15", 2048: "sdxl", 1152: "pixart"}
UNSUPPORTED_CONTEXT_DIMS: dict[int, str] = {1024: "SD2.x (OpenCLIP-H text encoder)"}

# Size bounds for an adapter file, by base model: no tensor holds more numbers than the model's largest layer (SD's
# 2560 -> 1280 3x3 up-block convolution; PixArt-alpha's 1152 -> 6912 adaLN projection), and no file more than its
# denoiser, text encoders and VAE decoder together (SD1.5 860M + 123M + 49M; SDXL 2.57B + 818M + 49M; PixArt 611M + 49M).
LARGEST_LAYER_NUMEL: dict[str, int] = {"sd15": 2560 * 1280 * 9, "sdxl": 2560 * 1280 * 9, "pixart": 1152 * 6912}
MAX_ADAPTER_PARAMS: dict[str, int] = {"sd15": 1_040_000_000, "sdxl": 3_440_000_000, "pixart": 670_000_000}

_S = r"[._]"  # separator: "." in diffusers/PEFT keys, "_" in kohya keys
# Cross-attention K/V projections (and SUN's negative-branch copies of them).
_CROSS_ATTN_KV = re.compile(rf"attn2{_S}(processor{_S})?to_[kv](_lora)?{_S}|(^|{_S})to_[kv]_neg{_S}weight$")
_SIGNALS: tuple[tuple[str, re.Pattern, str], ...] = (
    ("pixart", re.compile(rf"(^|{_S})(adaln_single|caption_projection|pos_embed){_S}|^(lora_transformer_|transformer\.)?transformer_blocks{_S}\d+"),
     "DiT transformer blocks with no UNet levels"),
    ("sdxl", re.compile(rf"(add_embedding|label_emb){_S}"), "the SDXL size/crop conditioning embedding"),
    ("sdxl", re.compile(rf"(attentions{_S}\d+|(input|middle|output)_blocks?{_S}\d+{_S}1){_S}transformer_blocks{_S}[1-9]"),
     "transformer depth above 1 inside UNet blocks"),
    ("sd15", re.compile(rf"down_blocks{_S}0{_S}attentions|input_blocks{_S}[12]{_S}1{_S}|up_blocks{_S}3{_S}attentions|output_blocks{_S}(9|10|11){_S}1{_S}"),
     "cross-attention at the outermost UNet level"),
)


def infer_base(keys: Sequence[str], shapes: Optional[Mapping[str, Sequence[int]]] = None) -> tuple[Optional[str], str]:
    """(base, reason) for a state dict's keys, or (None, reason) when nothing decides it.

    ``shapes`` maps keys to tensor shapes; cross-attention K/V down-projections reveal the text width.
    Raises ValueError for bases fewstep does not support (SD2.x).
    """
    if shapes:
        for key in keys:
            if _CROSS_ATTN_KV.search(key) and _is_input_side(key) and shapes[key]:
                width = int(shapes[key][-1])
                if width in UNSUPPORTED_CONTEXT_DIMS:
                    raise ValueError(
                        f"weights for {UNSUPPORTED_CONTEXT_DIMS[width]} (cross-attention takes {width}-dim text features); "
                        f"fewstep supports {', '.join(BASES)}"
                    )
                if width in CONTEXT_DIMS:
                    return CONTEXT_DIMS[width], f"cross-attention takes {width}-dim text features: {key}"
                break
    for base, pattern, why in _SIGNALS:
        hit = next((k for k in keys if pattern.search(k)), None)
        if hit is not None:
            return base, f"{why}: {hit}"
    return None, "no key or shape tells the base model apart"


def _is_input_side(key: str) -> bool:
    """True for tensors whose last dim is the layer's input: full weights, LoRA down / A projections."""
    return bool(re.search(r"(lora_down|lora_A|lora\.down|down)\.weight$|to_[kv](_neg)?\.weight$", key))
