"""The state of one fewstep run in A1111 or Forge: what it applies (``ActiveRun``), the error that stops it, and the
list of changes to undo when it ends."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..core.adapter_file import Adapter
from ..core.sun import SunAdapter
from .run_config import A1111Run

logger = logging.getLogger("fewstep")

RUN_ATTR = "fewstep_run"   # on the processing object: the ActiveRun, or the RunError that stops the run


class RunError(RuntimeError):
    """A fewstep setting that cannot be run; raised when sampling starts, so that the UI shows it (A1111 only logs
    errors raised in script hooks and would go on without fewstep)."""


@dataclass
class ActiveRun:
    run: A1111Run
    adapter: Adapter
    negative: Optional[torch.Tensor] = None   # the negative prompt's text features, for SUN
    sun_layers_fired: set = field(default_factory=set)
    sun: Optional[tuple[SunAdapter, dict[str, str]]] = None   # Forge: the adapter's layers, their LDM names
    sun_patches: list = field(default_factory=list)           # Forge: the attn2 patches put on the UNet
    student_keys: dict[str, str] = field(default_factory=dict)   # a guided student's {file key: LDM parameter}
    student_applied: bool = False
    sampling_options: dict[str, Any] = field(default_factory=dict)   # A1111 options overridden while our sampler runs


class Undo:
    """Changes to shared state, undone in reverse order."""

    def __init__(self):
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, undo: Callable[[], None]) -> None:
        self._steps.append((what, undo))

    def run(self) -> None:
        while self._steps:
            what, undo = self._steps.pop()
            try:
                undo()
            except Exception:  # one failed undo must not keep the others from running
                logger.exception("fewstep: could not undo %s", what)


pending_undo = Undo()   # every change the current run made to shared state (modules, options, weights)


def active_run(p) -> Optional[ActiveRun]:
    active = getattr(p, RUN_ATTR, None)
    return active if isinstance(active, ActiveRun) else None


def stop_run(p, reason: str) -> None:
    """Stop the request with ``reason`` when sampling starts: fewstep's sampler raises it (A1111 only logs errors raised
    in script hooks and would go on without fewstep)."""
    error = RunError(f"fewstep: {reason}")
    logger.error("%s", error)
    setattr(p, RUN_ATTR, error)
