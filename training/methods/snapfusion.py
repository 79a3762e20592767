"""SnapFusion (Li et al. 2023), the trainings: robust training (the teacher fine-tuned with blocks skipped at random,
``snap_blocks``), the slim UNet (``snap_architecture``) distilled from the teacher, CFG-aware step distillation of
either, and the ``snap_student`` export. Which blocks to remove is ``snap_blocks.block_table``'s measurement.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ...core.adapter_file import AdapterMetadata, write_adapter
from ...core.guidance import cfg
from ...core.parameterization import append_dims, distillation_weight
from ...core.schedule import NUM_TRAIN_TIMESTEPS, PREDICTIONS, DiscreteSchedule, distillation_timesteps
from ..diffusers_sampling import CFGDenoiser, UNetDenoiser
from ..pipelines import PromptEncoder, cat_cond
from ..students import sample_student
from ..driver import progressive_rounds, start_run, train_and_export
from ..teacher_data import schedule_of
from ..options import (CheckpointingOption, OptimiserOptions, count, fraction, load_options, option,
                       positive_float, replace_options)
from .guided import RoundGrid, halving_problems, halving_rounds
from .snap_architecture import SlimArchitecture, build_slim_unet
from .snap_blocks import BlockSkipping, sample_skipped_blocks

log = logging.getLogger("fewstep")

@dataclass
class SnapConfig(OptimiserOptions, CheckpointingOption):
    """SnapFusion's options, for all its steps: robust and slim training (the ``finetune`` subcommands' options) and
    step distillation (``distill``'s). The paper gives no skip probability or robust-training loss weights: those are
    ours."""

    skip_probability: float = option(0.1, "chance that each block is skipped in a step of robust training (ours)",
                                     command="finetune")
    distill_weight: float = option(1.0, "weight of the full teacher's prediction as a second target, next to the data's "
                                   "(ours)", command="finetune")
    caption_dropout: float = option(0.1, "fraction of captions replaced by the empty prompt (keeps CFG trained)",
                                    parse=fraction, command="finetune")
    slim_prediction: str = "v_prediction"  # what the slim UNet learns to predict (SnapFusion fine-tunes to v before step distillation)
    steps: int = option(10000, "optimiser steps (robust and slim training)", command="finetune")
    lr: float = option(1e-5, "learning rate (whole UNet)", parse=positive_float)
    warmup_steps: int = option(100, "linear learning-rate warm-up (each distillation round has its own)", parse=count)
    # Step distillation: progressive rounds (two teacher DDIM steps -> one student step) from start_steps to target_steps.
    start_steps: int = option(32, "the first round's teacher steps", command="distill")
    target_steps: int = option(8, "the final student's steps", command="distill")
    round_steps: int = option(2000, "optimiser steps per round", command="distill")
    cfg_probability: float = option(0.1, "p: the share of batches distilled CFG-aware (0: plain progressive distillation)",
                                    command="distill")
    cfg_scale_min: float = option(2.0, "lowest CFG scale drawn for CFG-aware batches (diffusers' convention)", command="distill")
    cfg_scale_max: float = option(14.0, "highest CFG scale drawn for CFG-aware batches", command="distill")
    cfg_original_weight: float = option(0.2, "gamma: the plain loss's weight next to the CFG-aware one", command="distill")
    sample_cfg_scale: float = option(7.5, "the CFG scale the exported student proposes", command="distill")

    def validate(self) -> None:
        problems = []
        if not 0.0 <= self.skip_probability < 1.0:
            problems.append("skip_probability must lie in [0, 1)")
        if self.distill_weight < 0 or not 0.0 <= self.caption_dropout < 1.0:
            problems.append("distill_weight must not be negative and caption_dropout must lie in [0, 1)")
        if self.slim_prediction not in PREDICTIONS:
            problems.append(f"slim_prediction must be one of {', '.join(PREDICTIONS)}; got {self.slim_prediction!r}")
        if min(self.steps, self.batch_size, self.round_steps, self.target_steps) < 1 or self.lr <= 0:
            problems.append("steps, batch_size, round_steps, target_steps and lr must be positive")
        else:
            problems += halving_problems(self.start_steps, self.target_steps)
        if not 0.0 <= self.cfg_probability <= 1.0 or self.cfg_original_weight < 0:
            problems.append("cfg_probability must lie in [0, 1] and cfg_original_weight must not be negative")
        if not 1.0 <= self.cfg_scale_min <= self.cfg_scale_max or self.sample_cfg_scale < 1.0:
            problems.append("need 1 <= cfg_scale_min <= cfg_scale_max and sample_cfg_scale >= 1")
        if problems:
            raise ValueError("invalid SnapFusion configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "SnapConfig":
        return replace_options(self, "SnapFusion", **changes)

    @property
    def rounds(self) -> list[int]:
        return halving_rounds(self.start_steps, self.target_steps)


PRESETS = {
    "paper": SnapConfig(),
    # The bundled proxy teacher on a 2-core CPU; it samples with CFG 4.
    "proxy": SnapConfig(steps=1500, lr=5e-5, batch_size=32, warmup_steps=50, round_steps=500, sample_cfg_scale=4.0),
}


def load_config(preset: str = "paper", config_file: Optional[str | Path] = None, **overrides) -> SnapConfig:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored)."""
    return load_options(PRESETS, "SnapFusion", preset, config_file, **overrides)


def _drop_captions(cond, uncond, drop: torch.Tensor):
    """Per sample, the unconditional encoding where ``drop`` is set (nested dicts of batched tensors)."""
    if isinstance(cond, dict):
        return {k: _drop_captions(cond[k], uncond[k], drop) for k in cond}
    return torch.where(append_dims(drop.to(cond.device), cond.ndim), uncond, cond)


class RobustTraining(torch.nn.Module):
    """A student UNet (the teacher's copy, or a slim UNet built from it) trained with random blocks skipped (one draw
    per step, for the whole batch): the denoising loss on the data plus ``distill_weight`` times the same loss against
    the frozen, full teacher's prediction, both as the squared error of the implied noise. ``forward(batch, gen)``
    returns per-sample losses."""

    has_unused_parameters = True   # a skipped block gets no gradient (the training loop tells DDP)

    def __init__(self, pipe, config: SnapConfig, student: Optional[torch.nn.Module] = None,
                 student_prediction: Optional[str] = None):
        super().__init__()
        self.config = config
        self.teacher = pipe.unet.requires_grad_(False).eval()
        self.student = (copy.deepcopy(self.teacher) if student is None else student).requires_grad_(True)
        if config.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.skipping = BlockSkipping(self.student)
        self.schedule = schedule_of(pipe)
        # The student may predict otherwise (v for the slim UNet): both are compared as x0, through their own schedules.
        self.student_schedule = DiscreteSchedule.stable_diffusion(prediction_type=student_prediction or self.schedule.prediction_type)
        self.prompts = PromptEncoder(pipe)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        z = batch["latents"]
        n = len(z)
        cond = _drop_captions(*self.prompts.with_unconditional(batch["captions"]), torch.rand(n, generator=gen) < self.config.caption_dropout)
        sigma = self.schedule.sigmas[torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=gen)].to(z)
        x = z + append_dims(sigma, z.ndim) * torch.randn(z.shape, generator=gen).to(z)
        skipped = sample_skipped_blocks(self.skipping.blocks, self.config.skip_probability, gen)
        with self.skipping.skip(skipped):
            student = UNetDenoiser(self.student, self.student_schedule)(x, sigma, **cond).float()
        weight = distillation_weight(sigma, "eps")
        terms = {"data": weight * (student - z.float()).pow(2).flatten(1).mean(1),
                 "skipped_blocks": torch.full((n,), float(len(skipped)))}
        terms["loss"] = terms["data"]
        if self.config.distill_weight:
            with torch.no_grad():
                teacher = UNetDenoiser(self.teacher, self.schedule)(x, sigma, **cond).float()
            terms["teacher"] = weight * (student - teacher).pow(2).flatten(1).mean(1)
            terms["loss"] = terms["loss"] + self.config.distill_weight * terms["teacher"]
        return terms


def train_robust(
    teacher: str | Path,                     # diffusers pipeline folder or single-file checkpoint (SD1.5 / SDXL UNet)
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,                     # checkpoints, logs, sample grids
    out: str | Path,                         # the robust teacher: a diffusers pipeline folder
    config: SnapConfig = SnapConfig(),
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """SnapFusion's robust training; writes the fine-tuned pipeline (same architecture, same keys) to ``out``."""
    return _train_student(teacher, data, run_dir, out, config, resolution, teacher_config, None, "robust",
                          lambda unet: {"robust_training_of": str(teacher)}, **run_options)


def train_slim(
    teacher: str | Path,                     # the pipeline the plan was measured on (the robust teacher)
    architecture: SlimArchitecture,          # the plan's slim architecture (``propose_architecture``)
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,
    out: str | Path,                         # the slim pipeline folder (the teacher's with the slim UNet)
    config: SnapConfig = SnapConfig(),       # skip_probability applies to the slim UNet's own blocks (0: none skipped)
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    **run_options,
) -> Optional[Path]:
    """The slim UNet, initialised from the teacher's kept blocks, distilled from the full teacher (plus the data
    loss) while it learns to predict ``config.slim_prediction``; writes a pipeline folder whose UNet config is the slim
    one and whose scheduler says that prediction type."""
    def made(unet) -> dict:
        return {"slim_of": str(teacher), "architecture": architecture.to_dict(),
                "slim": architecture != SlimArchitecture.of_teacher(unet.config)}

    return _train_student(teacher, data, run_dir, out, config, resolution, teacher_config,
                          lambda unet: build_slim_unet(unet, architecture), "slim", made, config.slim_prediction, **run_options)


def _train_student(teacher, data, run_dir, out, config: SnapConfig, resolution, teacher_config, make_student, desc: str,
                   made, student_prediction: Optional[str] = None, **run_options) -> Optional[Path]:
    from ..teacher import write_pipeline

    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    setup = method.setup
    pipe = setup.pipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(method.run.seed)
        model = RobustTraining(pipe, config, None if make_student is None else make_student(pipe.unet), student_prediction)
    log.info("%s training: %s student parameters (the teacher's: %s), %d blocks each skipped with probability %g", desc,
             f"{_parameters(model.student):,}", f"{_parameters(model.teacher):,}", len(model.skipping.blocks),
             config.skip_probability)
    def sample_fn(m, step):   # the whole student, 25 DDIM steps without CFG
        method.preview(lambda captions, seeds: sample_student(m.student, m.student_schedule, m.prompts(captions), seeds,
                                                              distillation_timesteps(25), "ddim", consistency_boundary=False),
                       f"step-{step:08d}")

    def export(m):
        provenance = {**made(pipe.unet), "steps": config.steps, "batch_size": config.batch_size, "images": len(setup.captions),
                      "config": dataclasses.asdict(config)}
        scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=m.student_schedule.prediction_type)
        components = {**pipe.components, "unet": m.student.requires_grad_(False).eval(), "scheduler": scheduler}
        write_pipeline(pipe.__class__(**components), method.out, provenance)

    return train_and_export(method, "snapfusion", model, export, desc, sample_fn=sample_fn)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SnapRound(torch.nn.Module):
    """One round of SnapFusion's step distillation: the student's single DDIM step against the teacher's two
    (``guided.RoundGrid``), loss on x0 with the truncated-SNR weight max(SNR, 1). In a share ``cfg_probability`` of the
    batches it is CFG-aware: both take CFG at a scale drawn per sample, the student's guided x0 is matched to the guided
    teacher's two-step target, plus ``cfg_original_weight`` times the plain loss. Terms: ``original`` always, ``cfg``
    and ``cfg_aware`` = 1 in CFG-aware batches (so its logged mean is ``cfg`` times the share of such batches)."""

    def __init__(self, pipe, student, teacher, config: SnapConfig, schedule: DiscreteSchedule, steps: int):
        super().__init__()
        self.student, self.teacher, self.config, self.schedule = student, teacher, config, schedule
        self.text_encoders = torch.nn.ModuleList(
            [m.requires_grad_(False) for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None])
        self.prompts = PromptEncoder(pipe)
        self.grid = RoundGrid(schedule, steps)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval(), self.text_encoders.eval()
        return self

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.config
        z = batch["latents"]
        n = len(z)
        cond, uncond = self.prompts.with_unconditional(batch["captions"])
        x, sigma, sigma_mid, sigma_next = self.grid.draw(z, gen)
        weight = distillation_weight(sigma, "x")
        teacher, student = UNetDenoiser(self.teacher, self.schedule), UNetDenoiser(self.student, self.schedule)

        def error(x0, target):
            return weight * (x0.float() - target.float()).pow(2).flatten(1).mean(1)

        target = self.grid.target(lambda x_, s_: teacher(x_, s_, **cond), x, sigma, sigma_mid, sigma_next)
        if torch.rand((), generator=gen) >= c.cfg_probability:
            terms = {"original": error(student(x, sigma, **cond), target)}
            return {"loss": terms["original"], **terms}
        scale = (c.cfg_scale_min + (c.cfg_scale_max - c.cfg_scale_min) * torch.rand(n, generator=gen)).to(z)
        guided_target = self.grid.target(CFGDenoiser(teacher, cond, uncond, scale), x, sigma, sigma_mid, sigma_next)
        x0_cond, x0_uncond = student(torch.cat([x, x]), torch.cat([sigma, sigma]), **cat_cond(cond, uncond)).chunk(2)
        student_guided, student_cond = cfg(x0_cond, x0_uncond, scale), x0_cond
        terms = {"cfg": error(student_guided, guided_target), "original": error(student_cond, target),
                 "cfg_aware": torch.ones(n, device=z.device)}
        return {"loss": terms["cfg"] + c.cfg_original_weight * terms["original"], **terms}


def train_step_distillation(
    teacher: str | Path,                     # the slim pipeline (``fewstep snap slim``): its UNet is the first round's teacher
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,                     # one sub-folder per round: checkpoints, logs, previews, its student
    out: str | Path,                         # the final (target_steps) snap_student file
    config: SnapConfig = SnapConfig(),
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    decoder: Optional[str | Path] = None,    # a pruned decoder file (``fewstep snap decoder``) to ship in each student file
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """SnapFusion's step distillation, start_steps -> ... -> target_steps, exporting each round as a snap_student
    file (the last one to ``out``); None if stopped by ``stop_after``."""
    from ..students import load_student
    from ..teacher import pipeline_provenance
    from .snap_decoder import read_decoder

    pruned_decoder = read_decoder(decoder) if decoder is not None else None
    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    setup = method.setup
    schedule = schedule_of(setup.pipe)
    made_by = pipeline_provenance(teacher)
    architecture = made_by.get("architecture")
    preview = setup.preview_captions()

    def build_round(current, steps):
        return SnapRound(setup.pipe, copy.deepcopy(current).requires_grad_(True), current.requires_grad_(False).eval(),
                         config, schedule, steps)

    def sample(m, steps) -> torch.Tensor:
        cond, uncond = m.prompts.with_unconditional(preview)
        return sample_student(m.student, schedule, cond, list(range(len(preview))), distillation_timesteps(steps), "ddim",
                              consistency_boundary=False, uncond=uncond, cfg_scale=config.sample_cfg_scale)

    def export(m, path, steps):
        fields = ("cfg_probability", "cfg_scale_min", "cfg_scale_max", "cfg_original_weight", "start_steps", "target_steps")
        export_snap_student(m.student, path, setup.base, schedule.prediction_type, steps, config.sample_cfg_scale,
                            {**method.provenance("snapfusion", config.round_steps, fields),
                             "round": f"{2 * steps} -> {steps} steps", "made_from": made_by},
                            SlimArchitecture.from_dict(architecture) if architecture else None, slim=made_by.get("slim", False),
                            decoder=pruned_decoder)

    return progressive_rounds(method, setup.pipe.unet, lambda path: load_student(setup.pipe, path).unet, build_round, export,
                              sample, "snap_student.safetensors", "SnapFusion step distillation")


def export_snap_student(unet, path: str | Path, base: str, prediction: str, steps: int, cfg_scale: float, provenance: dict,
                        architecture: Optional[SlimArchitecture] = None, slim: bool = False, decoder=None) -> AdapterMetadata:
    """A SnapFusion student as one adapter file: its UNet's weights (diffusers keys, fp16) and, in the metadata, the
    diffusers config that builds it (hosts construct the slim UNet from it), DDIM at ``steps`` trailing steps with
    CFG ``cfg_scale`` (atomic write). ``slim``: blocks of the teacher were removed. ``decoder``: a pruned VAE decoder
    (``snap_decoder.PrunedDecoder``), stored under ``vae.`` with its config."""
    from ...core.adapter_file import SNAP_DECODER_PREFIX

    meta = AdapterMetadata(
        kind="snap_student", base=base, prediction=prediction, sampler="ddim", steps=steps,
        timesteps=distillation_timesteps(steps), provenance=provenance,
        extra={"unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")}, "layout": "diffusers_unet",
               "cfg_scale": cfg_scale, "slim": slim, **({"architecture": architecture.to_dict()} if architecture is not None else {}),
               **({"decoder_config": decoder.config} if decoder is not None else {})})
    tensors = dict(unet.state_dict())
    if decoder is not None:
        tensors.update({SNAP_DECODER_PREFIX + k: v for k, v in decoder.state_dict().items()})
    write_adapter(path, {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, meta)
    return meta


