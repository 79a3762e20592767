"""What to apply and how to sample with an adapter file: the file's metadata and the user's settings resolved into one
plan that every host switches on once.

The hosts are ComfyUI's nodes, the A1111 extension, Forge, and the diffusers students ``eval``/``bench``/``synth``
sample; they differ only in how they carry out a plan, never in what it says. A setting the user gives wins over the
file; a setting left at its "from the file" value (0 steps, no sampler, no w, no CFG scale) takes the file's.

The plan's ``weights`` says what form the file's weights take on the model:
- ``LORA``: low-rank differences added to the model's layers at ``strength`` (Flash and LCM-style LoRAs, guided and
  GDD students exported as a LoRA);
- ``UNET_BLEND``: a whole UNet of the model's architecture; each weight becomes (1 - strength) of the model's plus
  ``strength`` of the student's (guided and GDD students);
- ``OWN_UNET``: a UNet of its own architecture that replaces the model's (SnapFusion's slim UNet);
- ``SUN_LAYERS``: layers added beside the cross-attention modules that read the negative prompt (SUN).
A plan's ``w`` (guided students) adds ``w_offset`` to the time MLP's input; ``consistency_boundary`` puts the model's
x0 through LCM's boundary condition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .adapter_file import KINDS, W_EMBEDDING_KEY, AdapterFileError, AdapterMetadata
from .guidance import w_conditioning_offset
from .samplers import SAMPLERS

LORA = "lora"
UNET_BLEND = "unet_blend"
OWN_UNET = "own_unet"
SUN_LAYERS = "sun_layers"
# The forms a kind's file may take (a guided or GDD student: its whole UNet, or a LoRA); one entry per kind in KINDS.
WEIGHT_FORMS = {"flash_lora": (LORA,), "sun_adapter": (SUN_LAYERS,), "guided_student": (LORA, UNET_BLEND),
                "gdd_student": (LORA, UNET_BLEND), "snap_student": (OWN_UNET,)}


def weights_form(meta: AdapterMetadata) -> str:
    """The form of the file's weights on the model (one of WEIGHT_FORMS[meta.kind])."""
    if meta.kind == "sun_adapter":
        return SUN_LAYERS
    if meta.kind == "snap_student":
        return OWN_UNET
    return LORA if meta.lora_weights else UNET_BLEND


def kinds_applied(forms: Sequence[str]) -> tuple[str, ...]:
    """The kinds (in KINDS order) all of whose files a host that applies ``forms`` can run."""
    return tuple(kind for kind in KINDS if set(WEIGHT_FORMS[kind]) <= set(forms))


def check_kind(name: str, kind: str, supported: Sequence[str], host: str) -> None:
    """A one-line error when a host (``host``: "these nodes load", "the A1111 extension runs") cannot run ``kind``."""
    if kind not in supported:
        listed = f"{', '.join(supported[:-1])} and {supported[-1]}" if len(supported) > 1 else supported[0]
        raise AdapterFileError(f"{name}: is a {kind}; {host} {listed} files so far: update fewstep")


def unet_blend(weight: torch.Tensor, student: torch.Tensor, strength: float) -> torch.Tensor:
    """UNET_BLEND's weight: (1 - strength) of the model's plus ``strength`` of the student's (torch.lerp: at strength
    1 exactly the student's). Hosts that patch through a ModelPatcher express the same as "diff" patches
    (``model_patcher.unet_blend``)."""
    return weight.lerp(student.to(weight), strength)


@dataclass(frozen=True)
class RunPlan:
    kind: str
    weights: str                       # LORA, UNET_BLEND, OWN_UNET or SUN_LAYERS
    sampler: str                       # a name from core.samplers.SAMPLERS
    timesteps: tuple[int, ...]         # one per step at full denoise, highest first
    cfg_scale: float                   # the CFG scale to sample with (1: no CFG); the file's unless the user gave one
    consistency_boundary: bool         # the model's x0 goes through LCM's boundary condition
    strength: float                    # the adapter's weight
    w: Optional[float] = None          # a guided student's guidance weight: ``w_offset`` goes on the time MLP
    negative_strength: Optional[float] = None  # a SUN adapter's: the negative prompt goes through the adapter
    notes: tuple[str, ...] = ()        # what the user should know (w outside the trained range, ...)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def negative_in_adapter(self) -> bool:
        return self.weights == SUN_LAYERS

    @property
    def model_passes_per_step(self) -> int:
        return 1 if self.cfg_scale == 1 or self.negative_in_adapter else 2

    def w_offset(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the time MLP's input gains for this plan's w, from the file's w projection (guided students only)."""
        if self.w is None:
            raise ValueError(f"a {self.kind} plan has no guidance weight w")
        return w_conditioning_offset(tensors[W_EMBEDDING_KEY].float(), self.w)


def plan_run(meta: AdapterMetadata, strength: float = 1.0, steps: int = 0, sampler: Optional[str] = None,
             w: Optional[float] = None, negative_strength: float = 1.0, cfg_scale: Optional[float] = None) -> RunPlan:
    """The plan for an adapter whose metadata is ``meta``; 0 steps, sampler None or "", w None and cfg_scale None mean
    "as the file says". A guided student's w outside its trained range is allowed, with a note."""
    steps = steps or meta.steps
    if steps < 1:
        raise ValueError(f"steps must be 1 or more (0: the file's {meta.steps}); got {steps}")
    sampler = sampler or meta.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    notes = []
    if meta.kind == "guided_student":
        guidance = meta.guidance or {}
        w = float(guidance["default_w"]) if w is None else float(w)
        lo, hi = guidance["w_min"], guidance["w_max"]
        if not lo <= w <= hi:
            notes.append(f"w = {w:g} lies outside the trained range [{lo:g}, {hi:g}]: expect weaker control")
    else:
        w = None
    return RunPlan(kind=meta.kind, weights=weights_form(meta), sampler=sampler, timesteps=tuple(meta.timesteps_for(steps)),
                   cfg_scale=float(meta.extra.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale),
                   consistency_boundary=meta.consistency_boundary, strength=float(strength), w=w,
                   negative_strength=float(negative_strength) if meta.kind == "sun_adapter" else None, notes=tuple(notes))
