"""What drives every method's training on the shared loop (``loop.training_loop``): the fit itself with a method
config's optimiser options, the export on the main process only, the provenance written into each file, and the
student LoRA (PEFT) most methods train."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..core.lora import read_lora, write_lora
from .options import RunOptions
from .teacher_data import TeacherData


def provenance(method: str, teacher: str | Path, train_steps: int, data: TeacherData, config, fields: Sequence[str]) -> dict:
    """How an adapter was made, for its metadata: ``images`` in the dataset (and the settings it was synthesized with,
    for a ``fewstep synth`` set), ``batch_size`` per step."""
    from .. import __version__

    options = dataclasses.asdict(config)
    made = {"method": method, "teacher": str(teacher), "train_steps": train_steps, "images": len(data.captions),
            "batch_size": config.batch_size, "fewstep_version": __version__, "config": {k: options[k] for k in fields}}
    if data.synth is not None:
        made["synthesized"] = data.synth
    return made


def fit(model: torch.nn.Module, run_dir: Path, batch_fn, config, desc: str, run: RunOptions, total_steps: Optional[int] = None,
        sample_fn=None, lr_scales: Optional[dict[str, float]] = None) -> torch.nn.Module:
    """The shared loop on ``model(batch, gen)`` with a method config's optimiser options (steps, lr, warmup_steps,
    grad_clip, ema_decay) and the run's mechanics."""
    from .loop import training_loop

    return training_loop(run_dir, model, lambda m, b, g: m(b, g), batch_fn, total_steps or config.steps, lr=config.lr,
                         lr_scales=lr_scales, warmup_steps=config.warmup_steps, grad_clip=config.grad_clip,
                         ema_decay=config.ema_decay, sample_fn=sample_fn, desc=desc, **dataclasses.asdict(run))


def on_main_process(export: Callable[[], object]) -> None:
    """Run ``export`` on the main process only, and let every process wait for it (``accelerate launch``)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        export()
    PartialState().wait_for_everyone()


def add_student_lora(unet, config, init: Optional[dict] = None):
    """Attach the trainable LoRA (PEFT) to a copy of the teacher UNet; ``init``: LoRA modules to start from. ``config``
    is a method's config with ``lora_rank``, ``alpha`` and ``lora_targets``."""
    from peft import LoraConfig, set_peft_model_state_dict

    unet.requires_grad_(False)
    if init is None:
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                    target_modules=list(config.lora_targets)))
        return unet
    ranks = {m: lora.rank for m, lora in init.items()}
    unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, target_modules=sorted(init),
                                rank_pattern=ranks, alpha_pattern={m: lora.alpha for m, lora in init.items()}))
    result = set_peft_model_state_dict(unet, write_lora(init, "peft"))
    if result.unexpected_keys:
        raise ValueError(f"the initial LoRA does not fit the teacher UNet: {result.unexpected_keys[:3]}")
    return unet


def student_lora_modules(student, config) -> dict:
    """The student's LoRA as core ``LoraModules`` (module path -> down, up, alpha)."""
    from peft import get_peft_model_state_dict

    alphas = {name: float(module.lora_alpha["default"]) for name, module in student.named_modules()
              if "default" in getattr(module, "lora_alpha", {})}
    modules, _ = read_lora(get_peft_model_state_dict(student), alpha=alphas or config.alpha)
    return modules
