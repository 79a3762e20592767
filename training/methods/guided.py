"""Guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models"): stage 1 and stage 2.

Stage 1 teaches a student, initialised from the teacher, to take the guidance weight w as an input and to give
the teacher's classifier-free-guided prediction in one pass:

    x_student(z_t, t, w)  ~  (1 + w) x_teacher(z_t, t, c) - w x_teacher(z_t, t, empty prompt)

This is Imagen's convention, which Meng et al. and fewstep's adapter files use: w = 0 is no guidance. diffusers and
every UI write CFG as uncond + s (cond - uncond), so s = 1 + w (``core.guidance``). One pass per step replaces CFG's two.

w enters as sinusoidal features (``core.guidance.guidance_scale_embedding``, 256 wide) through a projection added to
the timestep features: diffusers' ``time_cond_proj_dim``, as in LCM's full-UNet students. The projection starts at
zero, so at step 0 the student is the teacher. Each sample draws t uniformly over the training timesteps and
w uniformly in [w_min, w_max]. The loss is in x-space with the truncated-SNR weight max(SNR, 1) of progressive
distillation (the paper's), or the plain MSE of the implied noise (``loss_space="eps"``).

Stage 2 is progressive distillation (Salimans & Ho 2022) with w kept as an input: in each round a student,
initialised from its teacher (the previous round's student, the stage-1 student at first), learns to take in one
DDIM step what its teacher takes in two, so N halves per round (16 -> 8 -> 4 -> 2 -> 1 by default). The target is
the x0 whose single DDIM step lands where the teacher's two steps landed (``core.parameterization``), with the
same truncated-SNR weighting. Every round writes its own student file and resumes by itself.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...core.adapter_file import W_EMBEDDING_KEY, AdapterMetadata, without_w_embedding, write_adapter
from ...core.lora import write_lora
from ...core.guidance import cfg_scale_from_imagen_w
from ...core.parameterization import append_dims, ddim_step, distillation_weight, progressive_distillation_target
from ...core.schedule import NUM_TRAIN_TIMESTEPS, DiscreteSchedule, distillation_timesteps
from ..diffusers_sampling import CFGDenoiser, UNetDenoiser, w_condition
from ..pipelines import PromptEncoder
from ..students import sample_student
from ..driver import add_student_lora, progressive_rounds, start_run, student_lora_modules, train_and_export
from ..teacher_data import schedule_of
from ..options import CheckpointingOption, LoraOptions, OptimiserOptions, count, load_options, option, replace_options

log = logging.getLogger("fewstep")

LOSS_SPACES = ("x", "eps")
PROVENANCE_FIELDS = ("w_min", "w_max", "loss_space", "embedding_dim")
GUIDED_SAMPLERS = ("ddim", "stochastic")


@dataclass
class GuidedConfig(OptimiserOptions, CheckpointingOption, LoraOptions):
    """Guided distillation's options; defaults follow the paper's latent text-to-image setup."""

    # The guidance weight w (Imagen's convention; CFG scale s = 1 + w), drawn uniformly per sample.
    w_min: float = option(2.0, "lowest guidance weight w trained (CFG scale = 1 + w)")
    w_max: float = option(14.0, "highest guidance weight w trained")
    default_w: float = option(6.5, "the w the exported file proposes (6.5: CFG scale 7.5)")
    embedding_dim: int = 256                        # width of w's sinusoidal features (time_cond_proj_dim)
    loss_space: str = option("x", "x: x0 error weighted by max(SNR, 1), the paper's; eps: the implied noise's MSE",
                             choices=LOSS_SPACES)
    # The student: the whole UNet (lora_rank 0), or a LoRA on the teacher plus the w projection: a file of a few MB
    # that loads onto the base model. Stage 2 continues the student file's own LoRA.
    lora_rank: int = option(0, "stage 1: train a LoRA of this rank plus the w projection instead of the whole UNet (0: the "
                            "whole UNet); the file is a few MB and loads onto the base model. Stage 2 keeps the student "
                            "file's own form", parse=count)
    # Stage 1 optimisation (each stage-2 round starts its own warm-up near its optimum).
    warmup_steps: int = option(0, "linear learning-rate warm-up (per stage-2 round)", parse=count)
    ema_decay: Optional[float] = 0.9999
    # Stage 2: progressive halving from start_steps (the stage-1 student's) down to target_steps.
    start_steps: int = option(16, "stage 2: the step count the first round halves")
    target_steps: int = option(1, "stage 2: the last round's step count")
    round_steps: int = option(2000, "stage 2: optimiser steps per round")
    # What the exported file says: sampler and default step count (stage 1 keeps the teacher's steps).
    sampler: str = option("ddim", "the sampler the file names (stochastic: Meng's, one double step re-noised one back)",
                          choices=GUIDED_SAMPLERS)
    sample_steps: int = option(50, "the step count the file names (stage 1: the teacher's)")

    def validate(self) -> None:
        problems = []
        if not 0.0 <= self.w_min <= self.w_max:
            problems.append(f"need 0 <= w_min <= w_max; got {self.w_min}, {self.w_max}")
        if not self.w_min <= self.default_w <= self.w_max:
            problems.append(f"default_w {self.default_w} lies outside [w_min, w_max] = [{self.w_min}, {self.w_max}]")
        if self.loss_space not in LOSS_SPACES:
            problems.append(f"loss_space {self.loss_space!r} is not one of {', '.join(LOSS_SPACES)}")
        if self.sampler not in GUIDED_SAMPLERS:
            problems.append(f"sampler {self.sampler!r} is not one of {', '.join(GUIDED_SAMPLERS)}")
        if self.warmup_steps < 0:
            problems.append("warmup_steps must not be negative")
        if self.lora_rank < 0:
            problems.append("lora_rank must be 0 (the whole UNet) or positive")
        if min(self.steps, self.batch_size, self.embedding_dim, self.sample_steps, self.round_steps, self.target_steps) < 1:
            problems.append("steps, batch_size, embedding_dim, sample_steps, round_steps and target_steps must be positive")
        else:
            problems += halving_problems(self.start_steps, self.target_steps)
        if problems:
            raise ValueError("invalid guided-distillation configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "GuidedConfig":
        return replace_options(self, "guided", **changes)

    @property
    def rounds(self) -> list[int]:
        return halving_rounds(self.start_steps, self.target_steps)

def halving_problems(start_steps: int, target_steps: int) -> list[str]:
    """What is wrong with progressive rounds from ``start_steps`` to ``target_steps`` (halving per round), if anything."""
    ratio = start_steps // target_steps
    if start_steps <= target_steps or start_steps % target_steps or ratio & (ratio - 1):
        return [f"start_steps must be target_steps times a power of two (halving per round); got {start_steps} and {target_steps}"]
    return []


def halving_rounds(start_steps: int, target_steps: int) -> list[int]:
    """The student step count of each round: start_steps / 2, / 4, ... down to target_steps."""
    steps, out = start_steps, []
    while steps > target_steps:
        steps //= 2
        out.append(steps)
    return out


PRESETS = {
    "paper": GuidedConfig(),
    # The bundled proxy teacher samples at CFG 4 (w = 3): w in [0, 8] covers it; sized for a 2-core CPU.
    "proxy": GuidedConfig(w_min=0.0, w_max=8.0, default_w=3.0, steps=2000, lr=1e-4, batch_size=32, ema_decay=0.999,
                          round_steps=500, warmup_steps=50),
}


def load_config(preset: str = "paper", config_file: Optional[str | Path] = None, **overrides) -> GuidedConfig:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored)."""
    return load_options(PRESETS, "guided", preset, config_file, **overrides)


def add_w_embedding(unet, embedding_dim: int):
    """A copy of ``unet`` that also takes w's features (``timestep_cond``) through a zero-initialised projection."""
    from diffusers import UNet2DConditionModel

    if unet.config.get("time_cond_proj_dim") == embedding_dim:
        return copy.deepcopy(unet)
    student = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=embedding_dim)
    result = student.load_state_dict(unet.state_dict(), strict=False)
    if result.unexpected_keys or result.missing_keys != ["time_embedding.cond_proj.weight"]:
        raise ValueError(f"cannot extend this UNet with a w-embedding: missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(unet.device, unet.dtype)


def trainable(student, lora: bool):
    """The student with ``requires_grad`` where it learns: everywhere, or (a LoRA student) the LoRA and the w projection."""
    if not lora:
        return student.requires_grad_(True).train()
    student.requires_grad_(False)
    for name, param in student.named_parameters():
        if ".lora_" in name or name == W_EMBEDDING_KEY:
            param.requires_grad_(True)
    return student.train()


class _GuidedModule(torch.nn.Module):
    """A trainable w-conditioned student, its frozen teacher and the text encoders, as one module for accelerate."""

    def __init__(self, pipe, student, teacher, config: GuidedConfig, schedule: DiscreteSchedule):
        super().__init__()
        self.student, self.teacher, self.config, self.schedule = student, teacher, config, schedule
        self.text_encoders = torch.nn.ModuleList(
            [m.requires_grad_(False) for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None])
        self.prompts = PromptEncoder(pipe)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval(), self.text_encoders.eval()
        return self

    def _draw_w(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.config.w_min + (self.config.w_max - self.config.w_min) * torch.rand(n, generator=gen)

    def _loss(self, student_x0, target, sigma) -> dict[str, torch.Tensor]:
        error = (student_x0.float() - target.float()).pow(2).flatten(1).mean(1)
        return {"loss": distillation_weight(sigma, self.config.loss_space) * error, "x0_mse": error.detach()}

    @torch.no_grad()
    def sample(self, captions: Sequence[str], seeds: Sequence[int], steps: int, w: float) -> torch.Tensor:
        """Student latents at ``steps`` trailing steps with guidance weight ``w``, one pass per step."""
        cond = self.prompts(captions)
        cond.update(w_condition(w, self.config.embedding_dim, cond["encoder_hidden_states"], len(captions)))
        return sample_student(self.student, self.schedule, cond, seeds, distillation_timesteps(steps),
                              self.config.sampler, consistency_boundary=False)


class GuidedStage1(_GuidedModule):
    """Stage 1: ``forward(batch, gen)`` returns the per-sample loss against the teacher's CFG prediction."""

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg_, z = self.config, batch["latents"]
        n = z.shape[0]
        cond, uncond = self.prompts.with_unconditional(batch["captions"])
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=gen)
        sigma = self.schedule.sigmas[t].to(z)
        x = z + append_dims(sigma, z.ndim) * torch.randn(z.shape, generator=gen).to(z)   # sigma space: x0 + sigma eps
        w = self._draw_w(n, gen)
        with torch.no_grad():
            target = CFGDenoiser(UNetDenoiser(self.teacher, self.schedule), cond, uncond, cfg_scale_from_imagen_w(w).to(z))(x, sigma)
        student = UNetDenoiser(self.student, self.schedule)(x, sigma, **cond, **w_condition(w, cfg_.embedding_dim, z, n))
        return self._loss(student, target, sigma)


class RoundGrid(torch.nn.Module):
    """One progressive-distillation round's grid, shared by guided distillation and SnapFusion: the teacher's 2N-step
    trailing grid, of which the student's N steps take every other point."""

    def __init__(self, schedule: DiscreteSchedule, steps: int):
        super().__init__()
        self.steps = steps
        self.register_buffer("sigmas", schedule.sigmas_for_timesteps(distillation_timesteps(2 * steps)), persistent=False)

    def draw(self, z: torch.Tensor, gen: torch.Generator):
        """Per sample a student step [sigma, sigma_next] with the teacher's midpoint, and x noised to sigma from z."""
        i = 2 * torch.randint(0, self.steps, (len(z),), generator=gen)
        sig = self.sigmas.to(z)
        sigma = sig[i]
        x = z + append_dims(sigma, z.ndim) * torch.randn(z.shape, generator=gen).to(z)
        return x, sigma, sig[i + 1], sig[i + 2]

    @staticmethod
    @torch.no_grad()
    def target(teacher, x, sigma, sigma_mid, sigma_next) -> torch.Tensor:
        """The x0 whose one DDIM step lands where ``teacher``'s (an x0 predictor ``teacher(x, sigma)``) two land."""
        x_mid = ddim_step(x, teacher(x, sigma), sigma, sigma_mid)
        x_next = ddim_step(x_mid, teacher(x_mid, sigma_mid), sigma_mid, sigma_next)
        return progressive_distillation_target(x, x_next, sigma, sigma_next)


class ProgressiveRound(_GuidedModule):
    """Stage 2, one round: the student's single DDIM step over [t, t''] against the teacher's two over [t, t', t'']."""

    def __init__(self, pipe, student, teacher, config: GuidedConfig, schedule: DiscreteSchedule, steps: int):
        super().__init__(pipe, student, teacher, config, schedule)
        self.grid = RoundGrid(schedule, steps)

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        z = batch["latents"]
        n = z.shape[0]
        cond = self.prompts(batch["captions"])
        x, sigma, sigma_mid, sigma_next = self.grid.draw(z, gen)
        cond = {**cond, **w_condition(self._draw_w(n, gen), self.config.embedding_dim, z, n)}
        teacher = UNetDenoiser(self.teacher, self.schedule)
        target = self.grid.target(lambda x_, s_: teacher(x_, s_, **cond), x, sigma, sigma_mid, sigma_next)
        student = UNetDenoiser(self.student, self.schedule)(x, sigma, **cond)
        return self._loss(student, target, sigma)


def build_stage1(pipe, config: GuidedConfig, seed: int = 0) -> GuidedStage1:
    config.validate()
    teacher = pipe.unet.requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = add_w_embedding(teacher, config.embedding_dim)
        if config.lora_rank:
            student = add_student_lora(student, config)
        student = trainable(student, bool(config.lora_rank))
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return GuidedStage1(pipe, student, teacher, config, schedule_of(pipe))


def export_guided_student(student, schedule: DiscreteSchedule, config: GuidedConfig, path: str | Path, base: str,
                          steps: int, stage: int, provenance: dict) -> AdapterMetadata:
    """A w-conditioned student as one fewstep adapter file (atomic write): its whole UNet (diffusers keys, fp16), or
    for a LoRA student its LoRA (kohya keys, which the UIs' LoRA loaders map) and the w projection."""
    extra = {"embedding_dim": config.embedding_dim, "stage": stage, "cfg_scale": 1.0}
    if is_lora_student(student):
        modules = student_lora_modules(student, config)
        tensors = {**write_lora(modules, "kohya"), W_EMBEDDING_KEY: student.get_parameter(W_EMBEDDING_KEY).detach()}
        extra.update(format="lora", rank=max(m.rank for m in modules.values()), alpha=next(iter(modules.values())).alpha,
                     targets=sorted({"to_out.0" if name.endswith(".to_out.0") else name.rsplit(".", 1)[-1] for name in modules}))
    else:
        tensors = student.state_dict()
        extra.update(format="unet", layout="diffusers_unet")
    meta = AdapterMetadata(
        kind="guided_student", base=base, prediction=schedule.prediction_type, sampler=config.sampler,
        steps=steps, timesteps=distillation_timesteps(steps), provenance=provenance,
        guidance={"convention": "imagen", "w_min": config.w_min, "w_max": config.w_max, "default_w": config.default_w},
        extra=extra,
    )
    write_adapter(path, {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, meta)
    return meta


def is_lora_student(unet) -> bool:
    return any(".lora_" in name for name, _ in unet.named_parameters())


def load_guided_unet(pipe, path: str | Path, config: GuidedConfig):
    """The w-conditioned UNet of a guided_student file, to train further: its whole weights, or the teacher's UNet
    with the file's LoRA as a live (PEFT) adapter, so that a round continues the same LoRA."""
    from ...core.adapter_file import read_adapter
    from ...core.lora import read_lora
    from ..pipelines import base_of
    from ..students import load_student

    adapter = read_adapter(path, expected_base=base_of(pipe), expected_kinds=["guided_student"])
    if not adapter.metadata.lora_weights:
        return load_student(pipe, path).unet
    extra = adapter.metadata.extra
    unet = add_w_embedding(pipe.unet, int(extra["embedding_dim"]))
    modules, _ = read_lora(without_w_embedding(adapter.tensors))
    unet = add_student_lora(unet, config.replace(lora_rank=int(extra["rank"]), lora_alpha=float(extra["alpha"])), init=modules)
    with torch.no_grad():
        unet.get_parameter(W_EMBEDDING_KEY).copy_(adapter.tensors[W_EMBEDDING_KEY])
    return unet


def train_guided(
    teacher: str | Path,                     # diffusers pipeline folder or single-file checkpoint
    data,                                    # CaptionedImages, or a dataset spec for load_dataset ("proxy", a folder, shards)
    run_dir: str | Path,                     # checkpoints, logs, sample grids
    out: str | Path,                         # the exported adapter file
    config: GuidedConfig = GuidedConfig(),
    resolution: Optional[int] = None,        # image size for a dataset spec (default: the teacher's native size)
    teacher_config: Optional[str | Path] = None,  # diffusers folder with configs, for single-file teachers
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """Stage 1: distil ``teacher`` into a w-conditioned student and export it; None if stopped by ``stop_after``."""
    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    setup = method.setup
    model = build_stage1(setup.pipe, config, seed=method.run.seed)
    log.info("guided student: %s trainable parameters", f"{sum(p.numel() for p in model.student.parameters()):,}")

    def sample_fn(m, step):
        for w in (0.0, config.default_w):
            method.preview(lambda captions, seeds: m.sample(captions, seeds, min(config.sample_steps, 8), w),
                           f"step-{step:08d}-w{w:g}")

    def export(m):
        export_guided_student(m.student, m.schedule, config, method.out, setup.base, config.sample_steps, 1,
                              method.provenance("guided", config.steps, PROVENANCE_FIELDS))

    return train_and_export(method, "guided", model, export, "guided stage 1", sample_fn=sample_fn)


def train_progressive(
    teacher: str | Path,                     # the pipeline the students were distilled from (text encoders, VAE, data)
    student: str | Path,                     # a guided_student file: the stage-1 student or a later round's
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,                     # one sub-folder per round: checkpoints, logs, previews, its student
    out: str | Path,                         # the final (target_steps) student file
    config: GuidedConfig = GuidedConfig(),
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """Stage 2: halve the student's steps round by round down to ``target_steps``; None if stopped by ``stop_after``.
    A LoRA student stays one: each round trains the same LoRA further.

    A round whose student file exists is done; a resumed run continues the unfinished round from its checkpoint."""
    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    setup = method.setup
    schedule = schedule_of(setup.pipe)
    preview = setup.preview_captions()

    def build_round(current, steps):
        return ProgressiveRound(setup.pipe, trainable(copy.deepcopy(current), is_lora_student(current)),
                                current.requires_grad_(False).eval(), config, schedule, steps)

    def sample(m, steps) -> torch.Tensor:
        return m.sample(preview, list(range(len(preview))), steps, config.default_w)

    def export(m, path, steps):
        export_guided_student(m.student, schedule, config, path, setup.base, steps, 2,
                              {**method.provenance("guided", config.round_steps, PROVENANCE_FIELDS),
                               "from_student": str(student), "round": f"{2 * steps} -> {steps} steps"})

    def load(path):
        return load_guided_unet(setup.pipe, path, config)

    return progressive_rounds(method, load(student), load, build_round, export, sample, "guided_student.safetensors",
                              "guided stage 2")


