"""What drives every method's training on the shared loop (``loop.training_loop``): a run started the same way
(``start_run``: options checked, teacher and data loaded), trained and exported the same way (``train_and_export``;
progressive distillation's rounds: ``progressive_rounds``), the provenance written into each file, and the student
LoRA (PEFT) most methods train. A method keeps only its objective, its student and its export."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..core.adapter_file import AdapterMetadata, write_adapter
from ..core.lora import read_lora, write_lora
from .options import RunOptions
from .teacher_data import TeacherData, load_teacher_data

log = logging.getLogger("fewstep")


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
    grad_clip, ema_decay, weight_decay where it has one) and the run's mechanics."""
    from .loop import training_loop

    return training_loop(run_dir, model, lambda m, b, g: m(b, g), batch_fn, total_steps or config.steps, lr=config.lr,
                         lr_scales=lr_scales, warmup_steps=getattr(config, "warmup_steps", 0), grad_clip=config.grad_clip,
                         weight_decay=getattr(config, "weight_decay", 0.0),
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


def consistency_lora_metadata(config, base: str, prediction: str, sampler: str, timesteps: Sequence[int],
                              provenance: Optional[dict] = None) -> AdapterMetadata:
    """What a consistency LoRA's file says (Flash's, LCM's: kind ``flash_lora``, the LCM boundary, no CFG): how the
    hosts will sample it. ``config`` has ``sample_steps`` and the LoRA options."""
    return AdapterMetadata(
        kind="flash_lora", base=base, prediction=prediction, sampler=sampler, steps=config.sample_steps,
        timesteps=list(timesteps), provenance=provenance or {},
        extra={"consistency_boundary": True, "rank": config.lora_rank, "alpha": config.alpha,
               "targets": list(config.lora_targets), "cfg_scale": 1.0},
    )


def export_consistency_lora(student, config, path: str | Path, meta: AdapterMetadata) -> None:
    """The student's LoRA as one fewstep adapter file: kohya keys in fp16 + ``meta`` (atomic write)."""
    modules = student_lora_modules(student, config)
    write_adapter(path, {k: v.to(torch.float16) if v.ndim else v.float() for k, v in write_lora(modules, "kohya").items()}, meta)


def student_lora_modules(student, config) -> dict:
    """The student's LoRA as core ``LoraModules`` (module path -> down, up, alpha)."""
    from peft import get_peft_model_state_dict

    alphas = {name: float(module.lora_alpha["default"]) for name, module in student.named_modules()
              if "default" in getattr(module, "lora_alpha", {})}
    modules, _ = read_lora(get_peft_model_state_dict(student), alpha=alphas or config.alpha)
    return modules


@dataclass
class MethodRun:
    """One run of a method, as every ``train_*`` starts it: its options checked, its folders, the teacher with its
    data as latents, and the run's mechanics."""

    teacher: str | Path
    config: object
    run_dir: Path
    out: Path
    setup: TeacherData
    run: RunOptions

    def save_config(self, name: str) -> None:
        """RUN_DIR/<name>_config.json: the method's resolved options."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / f"{name}_config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")

    def provenance(self, method: str, train_steps: int, fields: Sequence[str]) -> dict:
        return provenance(method, self.teacher, train_steps, self.setup, self.config, fields)

    def preview(self, sample: Callable[[list[str], list[int]], torch.Tensor], name: str) -> None:
        """One row of preview images (the preview captions, seeds 0, 1, ...) as RUN_DIR/samples/<name>.png."""
        captions = self.setup.preview_captions()
        self.setup.save_grid(sample(captions, list(range(len(captions)))), self.run_dir / "samples" / f"{name}.png")


def start_run(teacher: str | Path, data, run_dir: str | Path, out: str | Path, config, resolution: Optional[int] = None,
              teacher_config: Optional[str | Path] = None, **run_options) -> MethodRun:
    """The start every method shares: ``config`` validated, the teacher and its data loaded, ``run_options``
    (``RunOptions``) read."""
    config.validate()
    setup = load_teacher_data(teacher, data, resolution, teacher_config)
    return MethodRun(teacher, config, Path(run_dir), Path(out), setup, RunOptions(**run_options))


def train_and_export(method: MethodRun, name: str, model: torch.nn.Module, export: Callable[[torch.nn.Module], object],
                     desc: str, batch_fn=None, total_steps: Optional[int] = None, sample_fn=None,
                     lr_scales: Optional[dict[str, float]] = None) -> Optional[Path]:
    """The rest every method shares: RUN_DIR/<name>_config.json, ``model`` trained on the shared loop (batches of
    the teacher data unless ``batch_fn``), ``export(model)`` on the main process; returns ``out``, or None when
    ``stop_after`` ended the run first."""
    config, run = method.config, method.run
    total_steps = total_steps or config.steps
    method.save_config(name)
    model = fit(model, method.run_dir, batch_fn or method.setup.batch_fn(config.batch_size), config, desc, run,
                total_steps=total_steps, sample_fn=sample_fn, lr_scales=lr_scales)
    if run.stops_before(total_steps):
        return None
    on_main_process(lambda: export(model))
    return method.out


def progressive_rounds(method: MethodRun, current, load, build_round, export, sample, file_name: str,
                       desc: str) -> Optional[Path]:
    """The rounds of progressive distillation (``config.rounds``, ``config.round_steps`` each), shared by guided
    distillation and SnapFusion: round N trains ``build_round(current, N)`` (its student starts as, and its teacher is,
    the previous round's student) and ``export``s it to ``RUN_DIR/round-NNsteps/file_name``; ``load`` reads such a
    file back; ``sample(model, N)`` draws its previews. A round whose file exists is done; a resumed run continues the
    unfinished round from its checkpoint; ``run.stop_after`` counts steps over all rounds. The last round's file is
    copied to ``out``."""
    config, run, run_dir, setup = method.config, method.run, method.run_dir, method.setup
    if not run.resume:
        for finished in sorted(run_dir.glob("round-*steps")):
            log.warning("starting over: removing %s", finished)
            shutil.rmtree(finished)
    for index, steps in enumerate(config.rounds):
        done_before = index * config.round_steps
        round_run = run if run.stop_after is None else dataclasses.replace(run, stop_after=run.stop_after - done_before)
        round_dir = run_dir / f"round-{steps:02d}steps"
        round_file = round_dir / file_name
        if round_file.exists():
            current = load(round_file)
            continue
        if round_run.stops_before(1):
            return None
        model = build_round(current, steps)
        if config.gradient_checkpointing:
            model.student.enable_gradient_checkpointing()

        def sample_fn(m, step, steps=steps, round_dir=round_dir):
            setup.save_grid(sample(m, steps), round_dir / "samples" / f"step-{step:08d}.png")

        model = fit(model, round_dir, setup.batch_fn(config.batch_size), config, f"{desc}: {2 * steps} -> {steps} steps",
                    round_run, total_steps=config.round_steps, sample_fn=sample_fn)
        if round_run.stops_before(config.round_steps):
            return None
        on_main_process(lambda: export(model, round_file, steps))
        current = load(round_file)
    on_main_process(lambda: shutil.copyfile(run_dir / f"round-{config.target_steps:02d}steps" / file_name, method.out))
    return method.out
