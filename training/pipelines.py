"""Teachers given as local paths, and their prompt conditioning as UNet keyword arguments.

A teacher is a diffusers pipeline folder or a single-file checkpoint (what A1111 and ComfyUI users have),
SD1.5 or SDXL. Trainers never branch on the base model: they get ``PromptEncoder(pipe)(captions)``, a
dict of what the denoiser's forward takes besides sample and timestep (``encoder_hidden_states``, and
for SDXL ``added_cond_kwargs`` with pooled text and size/crop ids), and combine such dicts with
``cat_cond``. A DiT teacher would slot in as another encoder with the same contract.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


class TeacherError(ValueError):
    """A teacher path that cannot be loaded; the message says what was found and what to pass instead."""


def load_teacher(path: str | Path, device: str = "cpu", config: Optional[str | Path] = None):
    """A diffusers pipeline in float32 from a folder (``model_index.json``) or a single ``.safetensors``/``.ckpt`` file.

    ``config``: for single files, a diffusers folder of the same base whose component configs and tokenizers
    are used (offline machines cannot fetch them from the hub).
    """
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"teacher {path} does not exist: pass a diffusers pipeline folder (with model_index.json) "
                           "or a single-file .safetensors checkpoint")
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise TeacherError(f"teacher folder {path} has no model_index.json: it is not a diffusers pipeline folder")
        class_name = json.loads(index.read_text()).get("_class_name")
        if class_name not in SUPPORTED_PIPELINES:
            raise TeacherError(f"teacher {path} is a {class_name}; fewstep trains from {', '.join(SUPPORTED_PIPELINES)} teachers")
        pipe = _pipeline_class(class_name).from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True,
                                                           **_no_safety_checker(class_name))
    else:
        pipe = _load_single_file(path, config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _pipeline_class(class_name: str):
    import diffusers

    return getattr(diffusers, class_name)


def _no_safety_checker(class_name: str) -> dict:
    return {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}


def _load_single_file(path: Path, config: Optional[str | Path]):
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as fh:
            keys = list(fh.keys())
    else:
        keys = list(torch.load(path, map_location="meta", weights_only=True).get("state_dict", {}))
    class_name = "StableDiffusionXLPipeline" if any(k.startswith("conditioner.") for k in keys) else "StableDiffusionPipeline"
    try:
        return _pipeline_class(class_name).from_single_file(
            str(path), config=str(config) if config else None, local_files_only=True, torch_dtype=torch.float32,
            **_no_safety_checker(class_name))
    except Exception as exc:
        hint = ("" if config else " Pass --teacher-config with a diffusers folder of the same base model "
                "(its configs and tokenizer are used; single files do not carry them).")
        raise TeacherError(f"could not load single-file teacher {path} as {class_name}: {exc}.{hint}") from None


def base_of(pipe) -> str:
    """'sd15' or 'sdxl' for a loaded pipeline (adapter files record it)."""
    return SUPPORTED_PIPELINES[type(pipe).__name__]


class PromptEncoder:
    """Captions -> UNet conditioning kwargs, the pipeline's own way (``encode_prompt``), frozen and batched.

    ``unconditional(n)`` is what the pipeline itself uses for CFG without a negative prompt: the empty
    prompt's encoding, or zeros for SDXL models with ``force_zeros_for_empty_prompt``.
    """

    def __init__(self, pipe, image_size: Optional[tuple[int, int]] = None):
        self.pipe = pipe
        self.is_sdxl = base_of(pipe) == "sdxl"
        scale = getattr(pipe, "vae_scale_factor", 8)
        size = image_size or (pipe.unet.config.sample_size * scale,) * 2
        self.time_ids = torch.tensor([[size[0], size[1], 0, 0, size[0], size[1]]], dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> dict:
        return self._encode(list(captions), guidance=False)[0]

    @torch.no_grad()
    def with_unconditional(self, captions: Sequence[str]) -> tuple[dict, dict]:
        return self._encode(list(captions), guidance=True)

    def _encode(self, captions: list[str], guidance: bool) -> tuple[dict, Optional[dict]]:
        device = self.pipe.unet.device
        if not self.is_sdxl:
            cond, uncond = self.pipe.encode_prompt(captions, device, 1, guidance)
            return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond} if guidance else None
        cond, uncond, pooled, pooled_uncond = self.pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=guidance)
        ids = self.time_ids.to(device).expand(len(captions), -1)
        return ({"encoder_hidden_states": cond, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}},
                {"encoder_hidden_states": uncond, "added_cond_kwargs": {"text_embeds": pooled_uncond, "time_ids": ids}}
                if guidance else None)


def cat_cond(*conds: dict) -> dict:
    """Concatenate conditioning dicts along the batch (nested dicts such as ``added_cond_kwargs`` too)."""
    first = conds[0]
    return {k: cat_cond(*(c[k] for c in conds)) if isinstance(first[k], dict) else torch.cat([c[k] for c in conds]) for k in first}


def cast_cond(cond: dict, dtype: torch.dtype) -> dict:
    """A conditioning dict (nested dicts such as ``added_cond_kwargs`` too) in ``dtype``: a UNet in half precision
    rejects float32 text embeddings."""
    return {k: cast_cond(v, dtype) if isinstance(v, dict) else v.to(dtype) for k, v in cond.items()}
