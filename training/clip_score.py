"""CLIP score (Hessel et al. 2021) for real checkpoints, with a CLIP model from a local folder (``fewstep eval
--images ... --clip-model DIR``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .images import default_device, unit_nchw

# OpenAI CLIP's input normalisation, used when the model folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def clip_score(images, captions: Sequence[str], clip_model_path: str | Path, batch_size: int = 32,
               device: str | torch.device | None = None) -> float:
    """Mean CLIP score, 100 * max(cos(image, text), 0) (Hessel et al. 2021, as torchmetrics' CLIPScore), with a CLIP
    model from a local folder. Images are resized (bicubic) to the model's input size; no torchvision involved."""
    from transformers import CLIPModel, CLIPTokenizer

    device = torch.device(device) if device is not None else default_device()
    folder = Path(clip_model_path)
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    config_file = folder / "preprocessor_config.json"
    pre = json.loads(config_file.read_text()) if config_file.is_file() else {}
    mean = torch.tensor(pre.get("image_mean", CLIP_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.get("image_std", CLIP_STD), device=device).view(1, 3, 1, 1)
    size = model.config.vision_config.image_size
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    scores = []
    for start in range(0, len(captions), batch_size):
        pixels = unit_nchw(images[start:start + batch_size], device)
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        image_emb = model.get_image_features(pixel_values=(pixels - mean) / std)
        ids = tokenizer(list(captions[start:start + batch_size]), padding=True, truncation=True, return_tensors="pt").to(device)
        text_emb = model.get_text_features(**ids)
        cos = F.cosine_similarity(_as_tensor(image_emb), _as_tensor(text_emb), dim=-1)
        scores.append((100 * cos).clamp(min=0).cpu())
    return float(torch.cat(scores).mean())


def _as_tensor(output) -> torch.Tensor:
    """transformers 5 may return a model output object where 4.x returned the tensor."""
    return output if torch.is_tensor(output) else output.pooler_output
