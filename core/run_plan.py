"""How to sample with an adapter file: the file's metadata and the user's settings resolved into one plan.

ComfyUI's nodes and the A1111/Forge extension both call ``plan_run`` and differ only in how they apply the plan.
A setting the user gives wins over the file; a setting left at its "from the file" value (0 steps, no sampler,
no w) takes the file's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .adapter_file import AdapterMetadata
from .samplers import SAMPLERS


@dataclass(frozen=True)
class RunPlan:
    kind: str
    sampler: str                       # a name from core.samplers.SAMPLERS
    timesteps: tuple[int, ...]         # one per step at full denoise, highest first
    cfg_scale: float                   # the CFG scale the adapter was trained for (1: no CFG)
    consistency_boundary: bool         # the model's x0 goes through LCM's boundary condition
    strength: float                    # the adapter's weight
    w: Optional[float] = None          # a guided student's guidance weight
    negative_strength: Optional[float] = None  # a SUN adapter's: the negative prompt goes through the adapter
    notes: tuple[str, ...] = ()        # what the user should know (w outside the trained range, ...)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def negative_in_adapter(self) -> bool:
        return self.kind == "sun_adapter"

    @property
    def model_passes_per_step(self) -> int:
        return 1 if self.cfg_scale == 1 or self.negative_in_adapter else 2


def plan_run(meta: AdapterMetadata, strength: float = 1.0, steps: int = 0, sampler: Optional[str] = None,
             w: Optional[float] = None, negative_strength: float = 1.0) -> RunPlan:
    """The plan for sampling with an adapter whose metadata is ``meta``; 0 steps, sampler None or "" and w None mean
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
    return RunPlan(kind=meta.kind, sampler=sampler, timesteps=tuple(meta.timesteps_for(steps)),
                   cfg_scale=float(meta.extra.get("cfg_scale", 1.0)), consistency_boundary=meta.consistency_boundary,
                   strength=float(strength), w=w,
                   negative_strength=float(negative_strength) if meta.kind == "sun_adapter" else None, notes=tuple(notes))
