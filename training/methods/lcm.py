"""Latent consistency distillation into a LoRA (Luo et al. 2023, LCM-LoRA): the baseline users know.

The recipe of diffusers' ``train_lcm_distill_lora_sd_wds.py``, step for step. Each batch:

1. a start index n per sample on the solver's grid, every k = T // N-th timestep (19, 39, ..., 999 for N = 50);
   t_{n+k} is the grid timestep, t_n the one below it (0 below the first);
2. the student's boundary output f(x_{t_{n+k}}) = c_skip x + c_out x0 (LCM's discrete boundary condition);
3. the teacher's CFG prediction at x_{t_{n+k}}, CFG scale drawn per sample, and one DDIM step to t_n;
4. the target: the student itself, without gradient (no separate target network in the LoRA recipe), at t_n;
5. loss: pseudo-Huber (the paper's; l2 is the script's default) between the two boundary outputs.

The file it writes is a consistency LoRA like Flash's (kind ``flash_lora``, LCM sampler, LCM's timesteps), so every
host samples it already. CFG scales follow the diffusers/UI convention: the recipe's w is scale - 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...core.adapter_file import AdapterMetadata
from ...core.parameterization import ddim_step, diffuse, start_noise_scaling
from ...core.schedule import NUM_TRAIN_TIMESTEPS, DiscreteSchedule, timesteps_lcm
from ..diffusers_sampling import CFGDenoiser, UNetDenoiser
from ..driver import add_student_lora, consistency_lora_metadata, export_consistency_lora, start_run, train_and_export
from ..options import (CheckpointingOption, LoraOptions, OptimiserOptions, fraction, load_options, option, positive_float,
                       replace_options)
from ..pipelines import PromptEncoder, base_of
from ..students import sample_student
from ..teacher_data import schedule_of, teacher_dtype

log = logging.getLogger("fewstep")

LCM_LOSSES = ("huber", "l2")
# diffusers' LCM-LoRA script: a LoRA on every linear and convolution of the UNet.
ALL_UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                   "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass
class LCMConfig(OptimiserOptions, CheckpointingOption, LoraOptions):
    """LCM-LoRA's options; defaults are diffusers' SD1.5 LCM-LoRA script's (the paper's Huber loss)."""

    steps: int = option(1000, "optimiser steps")
    lr: float = option(1e-4, "LoRA learning rate", parse=positive_float)
    batch_size: int = option(16, "images per step per GPU")
    ema_decay: Optional[float] = None               # the LoRA recipe keeps no EMA: its target is the student itself
    weight_decay: float = option(1e-2, "AdamW weight decay", parse=fraction)
    lora_rank: int = 64
    lora_targets: tuple[str, ...] = option(ALL_UNET_LAYERS, "comma-separated module names")
    solver_steps: int = option(50, "N: steps of the teacher's DDIM solver grid (every T // N-th timestep)")
    guidance_min: float = option(6.0, "lowest teacher CFG scale (the recipe's w_min + 1)")
    guidance_max: float = option(16.0, "highest teacher CFG scale (the recipe's w_max + 1)")
    loss: str = option("huber", "consistency loss", choices=LCM_LOSSES)
    huber_c: float = 0.001
    sample_steps: int = 4                           # what the exported file proposes

    def validate(self) -> None:
        problems = []
        if self.loss not in LCM_LOSSES:
            problems.append(f"loss {self.loss!r} is not one of {', '.join(LCM_LOSSES)}")
        if not 1 <= self.solver_steps <= NUM_TRAIN_TIMESTEPS:
            problems.append(f"solver_steps must lie in [1, {NUM_TRAIN_TIMESTEPS}]")
        elif self.sample_steps > self.solver_steps:
            problems.append("sample_steps cannot exceed solver_steps (LCM samples on the solver's grid)")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            problems.append(f"need 1 <= guidance_min <= guidance_max; got {self.guidance_min}, {self.guidance_max}")
        if self.lora_rank < 1 or self.batch_size < 1 or self.steps < 1:
            problems.append("lora_rank, batch_size and steps must be positive")
        if problems:
            raise ValueError("invalid LCM configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "LCMConfig":
        return replace_options(self, "LCM", **changes)


PRESETS = {
    "paper": LCMConfig(),
    # The bundled proxy teacher on a CPU, set like Flash's proxy preset so the two compare at equal budget: the same
    # LoRA and guidance range around the proxy's best CFG, batch and rate.
    "proxy": LCMConfig(steps=600, lora_rank=32, lora_targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
                       guidance_min=2.0, guidance_max=6.0, lr=2e-4, batch_size=32),
}


def solver_timesteps(solver_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The DDIM solver's grid, ascending: (n + 1) k - 1 for k = T // N (diffusers' ``DDIMSolver``)."""
    k = num_train_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1) * k - 1


class LCMDistillation(torch.nn.Module):
    """Student (teacher copy + LoRA), frozen teacher and text encoders; ``forward(batch, gen)`` returns per-sample
    losses. One module so that ``accelerate`` moves, wraps and checkpoints it as a whole."""

    def __init__(self, pipe, student, teacher, config: LCMConfig, schedule: DiscreteSchedule):
        super().__init__()
        self.student, self.teacher, self.config, self.schedule = student, teacher, config, schedule
        self.text_encoders = torch.nn.ModuleList(
            [m.requires_grad_(False) for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None])
        self.prompts = PromptEncoder(pipe)
        self.grid = solver_timesteps(config.solver_steps, schedule.num_train_timesteps)

    def train(self, mode: bool = True) -> "LCMDistillation":
        super().train(mode)
        self.teacher.eval(), self.text_encoders.eval()
        return self

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        z, n = batch["latents"], batch["latents"].shape[0]
        index = torch.randint(0, self.config.solver_steps, (n,), generator=gen)
        noise = torch.randn(z.shape, generator=gen).to(z)
        low, high = self.config.guidance_min, self.config.guidance_max
        scale = low + (high - low) * torch.rand(n, generator=gen)
        return self.losses(z, *self.prompts.with_unconditional(batch["captions"]), index, noise, scale)

    def losses(self, z: torch.Tensor, cond: dict, uncond: dict, index: torch.Tensor, noise: torch.Tensor,
               scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The consistency loss per sample for given draws: solver indices, unit noise and CFG scales."""
        start = self.grid[index]
        end = (start - self.grid[0] - 1).clamp(min=0)     # t_n = t_{n+k} - k, 0 below the grid
        sigma_start, sigma_end = self.schedule.sigmas[start].to(z), self.schedule.sigmas[end].to(z)
        x = diffuse(self.schedule, z, noise, start) * start_noise_scaling(sigma_start).view(-1, 1, 1, 1)
        student = UNetDenoiser(self.student, self.schedule, consistency_boundary=True)
        prediction = student(x, sigma_start, **cond)
        with torch.no_grad():
            teacher = CFGDenoiser(UNetDenoiser(self.teacher, self.schedule), cond, uncond, scale.to(z))
            x_end = ddim_step(x, teacher(x, sigma_start), sigma_start, sigma_end)
            target = student(x_end, sigma_end, **cond)
        diff = (prediction.float() - target.float()).flatten(1)
        if self.config.loss == "huber":
            c = self.config.huber_c
            loss = ((diff.pow(2) + c * c).sqrt() - c).mean(1)
        else:
            loss = diff.pow(2).mean(1)
        return {"loss": loss}

    @torch.no_grad()
    def sample(self, captions: Sequence[str], seeds: Sequence[int], steps: int) -> torch.Tensor:
        """Student latents as the exported file samples them: LCM's timesteps and multistep consistency sampling."""
        return sample_student(self.student, self.schedule, self.prompts(captions), seeds,
                              timesteps_lcm(steps, self.schedule.num_train_timesteps, self.config.solver_steps))


def build_distillation(pipe, config: LCMConfig, teacher_dtype: torch.dtype = torch.float32, seed: int = 0) -> LCMDistillation:
    """Frozen teacher (in ``teacher_dtype``) + student (teacher copy + fp32 LoRA, drawn from ``seed``)."""
    import copy

    config.validate()
    teacher = pipe.unet.requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = add_student_lora(copy.deepcopy(teacher), config)
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    if teacher.dtype != teacher_dtype:
        teacher.to(teacher_dtype)
    return LCMDistillation(pipe, student, teacher, config, schedule_of(pipe))


def exported_metadata(config: LCMConfig, base: str, schedule: DiscreteSchedule, provenance: Optional[dict] = None) -> AdapterMetadata:
    """What an LCM-LoRA's file says: LCM's sampler on LCM's timesteps, as diffusers' LCMScheduler samples it."""
    timesteps = timesteps_lcm(config.sample_steps, schedule.num_train_timesteps, config.solver_steps)
    return consistency_lora_metadata(config, base, schedule.prediction_type, "consistency", timesteps, provenance)


def train_lcm(
    teacher: str | Path,                     # diffusers pipeline folder or single-file checkpoint
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,                     # checkpoints, logs, sample grids
    out: str | Path,                         # the exported adapter file
    config: LCMConfig = LCMConfig(),
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """Distil ``teacher`` into an LCM-LoRA and export it; returns ``out``, or None if stopped by ``stop_after``."""
    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    setup = method.setup
    distillation = build_distillation(setup.pipe, config, teacher_dtype(method.run.mixed_precision), method.run.seed)
    log.info("LCM student: %s trainable LoRA parameters",
             f"{sum(p.numel() for p in distillation.student.parameters() if p.requires_grad):,}")

    def sample_fn(model, step):
        for steps in (1, 2, config.sample_steps):
            method.preview(lambda captions, seeds: model.sample(captions, seeds, steps), f"step-{step:08d}-{steps}steps")

    def export(model):
        export_consistency_lora(model.student, config, method.out, exported_metadata(
            config, setup.base, model.schedule, method.provenance("lcm", config.steps, ("solver_steps", "guidance_min", "guidance_max", "loss"))))

    return train_and_export(method, "lcm", distillation, export, "LCM", sample_fn=sample_fn)


def load_config(preset: str = "paper", config_file: Optional[str | Path] = None, **overrides) -> LCMConfig:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored)."""
    return load_options(PRESETS, "LCM", preset, config_file, **overrides)
