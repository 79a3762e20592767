"""A whole-UNet student on a ModelPatcher (ComfyUI, Forge): ``core.run_plan.unet_blend`` as the patcher's "diff"
patches."""

from __future__ import annotations

import torch


def add_unet_blend(patcher, weights: dict[str, torch.Tensor], strength: float, **options) -> None:
    """Each named weight of ``patcher``'s model becomes (1 - strength) of its own plus ``strength`` of ``weights``'s:
    "diff" patches (they replace the weight) at ``strength``, the model's weight kept at 1 - strength. The student's
    weights go in as they are, never as differences: a patcher patches a loaded model's weights in place, so the
    weights it holds may already carry an earlier run's patches. ``options``: the host's own (Forge's patch-set name)."""
    patcher.add_patches(patches={name: ("diff", (weight,)) for name, weight in weights.items()}, strength_patch=strength,
                        strength_model=1.0 - strength, **options)
