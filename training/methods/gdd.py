"""GDD / GDD-I ("Diffusion Models Are Innate One-Step Generators", Zheng & Yang 2024) on SD-style latent teachers.

- Generator: a copy of the teacher UNet, one pass from pure noise at t = T (999) to x0, text-conditioned, no CFG.
  Parameterisation at t = T: the teacher's own (eps: x0 = (x_T - sqrt(1 - abar_T) eps) / sqrt(abar_T)). SD's schedule
  ends at abar_999 ~ 0.0047, not at zero SNR, so the conversion divides by sqrt(abar_T) ~ 0.068; we keep it because
  the generator then starts as exactly the teacher's one-step prediction (the paper's premise: the diffusion model is
  already the generator, the GAN loss only moves it), as the official code keeps the teacher's EDM preconditioning at
  sigma = 80. An x0 head would start somewhere else.
- Loss: GAN only, as published: non-saturating, lazy R1 on the discriminator (every ``r1_interval`` steps, times the
  interval), EMA of the generator. No instance-wise teacher targets; real samples are the training images (pass the
  teacher's own samples as the dataset to train on those).
- Discriminator: ``gan.Discriminator`` head on the frozen teacher UNet's features (``disc_feature_module``) at a few
  noise levels, with the prompt through the UNet's cross-attention and (``disc_text_projection``, ours) as a
  projection term in the head: without it the proxy's one-step samples grew sharp but followed the prompt less
  than the teacher. The official code reads frozen ImageNet networks
  on clean pixels; those weights are not here, do not fit latents, and the benchmark's FID network must never judge
  training. R1 is taken at the head's input (the frozen features), not through the teacher: ours.
- GDD-I: the convolution weights (ResNet convs, in/out convs, down/upsamplers) and the transformers' proj_in/proj_out
  frozen, as the paper freezes convolutions; ``lora``: only LoRA on the attention projections (a file UI users share).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...core.adapter_file import AdapterMetadata, write_adapter
from ...core.lora import write_lora
from ...core.parameterization import start_noise_scaling
from ..diffusers_sampling import UNetDenoiser
from ..students import sample_student
from ..driver import add_student_lora, start_run, student_lora_modules, train_and_export
from ..teacher_data import schedule_of, teacher_dtype
from ..options import (CheckpointingOption, LoraOptions, OptimiserOptions, count, load_options, option, positive_float,
                       replace_options)
from .gan import GAN_LOSSES, AdversarialDistillation, adversarial_terms, r1_penalty, teacher_features

log = logging.getLogger("fewstep")

VARIANTS = ("gdd_i", "full", "lora")
PROVENANCE_FIELDS = ("variant", "gan_loss", "r1_gamma", "r1_interval", "gan_timesteps", "disc_feature_module", "disc_text_projection")


@dataclass
class GDDConfig(OptimiserOptions, CheckpointingOption, LoraOptions):
    """GDD's options. The paper's values where it has them (CIFAR-10: lr 1e-4, R1 gamma 1e-4 every 16 steps); the
    rest, and everything about SD-sized models, are ours, named as such."""

    variant: str = option("gdd_i", "gdd_i: convolutions frozen; full: the whole UNet; lora: a LoRA on the attention "
                          "projections", choices=VARIANTS)
    start_timestep: int = 999                  # the one step starts here, from pure noise
    gan_loss: str = option("non-saturating", "GAN objective", choices=("non-saturating", "hinge", "lsgan"))
    r1_gamma: float = option(1e-4, "R1 penalty weight")
    r1_interval: int = option(16, "steps between lazy R1 penalties")
    gan_timesteps: tuple[int, ...] = option((10, 250, 500), "comma-separated noise levels at which the teacher's features "
                                            "feed the discriminator (ours)")
    disc_feature_module: str = "mid_block"
    disc_channels: int = 64
    disc_text_projection: bool = option(True, "the prompt also enters the discriminator head as a projection term (ours)")
    lora_rank: int = option(64, "the lora variant's rank", parse=count)
    steps: int = 20000
    lr: float = option(1e-5, "generator learning rate (ours for SD: 1e-4 is the paper's at CIFAR scale)", parse=positive_float)
    disc_lr: float = option(1e-4, "discriminator head learning rate", parse=positive_float)
    grad_clip: float = 0.0

    def validate(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.gan_loss not in GAN_LOSSES:
            problems.append(f"gan_loss {self.gan_loss!r} is not one of {', '.join(GAN_LOSSES)}")
        if not 0 < self.start_timestep < 1000 or any(not 0 <= t < 1000 for t in self.gan_timesteps) or not self.gan_timesteps:
            problems.append("start_timestep and gan_timesteps must lie in [0, 999]")
        if self.r1_gamma < 0 or self.r1_interval < 1:
            problems.append("r1_gamma must not be negative and r1_interval must be at least 1")
        if min(self.steps, self.batch_size, self.lora_rank, self.disc_channels) < 1 or self.lr <= 0 or self.disc_lr <= 0:
            problems.append("steps, batch_size, lora_rank, disc_channels, lr and disc_lr must be positive")
        if problems:
            raise ValueError("invalid GDD configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "GDDConfig":
        return replace_options(self, "GDD", **changes)


PRESETS = {
    "paper": GDDConfig(),
    # The bundled proxy teacher on a 2-core CPU (~15 min). lr from a sweep (200-sample FID after 600 steps): 1e-5 slow,
    # 3e-5 best, 1e-4 diverges; the eps parameterisation at t = 999 multiplies output changes by 1/sqrt(abar_999) ~ 15.
    "proxy": GDDConfig(steps=2000, lr=3e-5, disc_lr=2e-4, batch_size=32, lora_rank=16, gan_timesteps=(10, 250, 500)),
}


def frozen_in_gdd_i(name: str, module: torch.nn.Module) -> bool:
    """GDD-I's frozen layers: every convolution, and the transformers' in/out projections."""
    return isinstance(module, torch.nn.Conv2d) or name.rsplit(".", 1)[-1] in ("proj_in", "proj_out")


def make_generator(teacher, config: GDDConfig):
    """The trainable copy of the teacher for ``config.variant`` (a LoRA on a frozen copy for ``lora``)."""
    student = copy.deepcopy(teacher)
    if config.variant == "lora":
        return add_student_lora(student, config)
    student.requires_grad_(True)
    if config.variant == "gdd_i":
        for name, module in student.named_modules():
            if frozen_in_gdd_i(name, module):
                module.requires_grad_(False)
    return student


def trained_fraction(student: torch.nn.Module) -> float:
    total = sum(p.numel() for p in student.parameters())
    return sum(p.numel() for p in student.parameters() if p.requires_grad) / total


class GDDDistillation(AdversarialDistillation):
    """Generator, frozen teacher (the discriminator's features) and head; ``forward(batch, gen)`` returns per-sample
    losses."""

    def generate(self, noise: torch.Tensor, cond: dict) -> torch.Tensor:
        """The generator's x0 from unit ``noise`` in one pass at the start timestep."""
        sigma = self.schedule.sigmas_for_timesteps([self.config.start_timestep])[0].to(noise.device)   # (then 0)
        return UNetDenoiser(self.student, self.schedule)(noise * start_noise_scaling(sigma), sigma.expand(len(noise)), **cond)

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        real = batch["latents"]
        cond = self.prompts(batch["captions"])
        fake = self.generate(torch.randn(real.shape, generator=gen).to(real), cond)
        fake_feats, real_feats = teacher_features(self.tap, self.teacher.dtype, self.schedule, fake, real, cond,
                                                  self.config.gan_timesteps, gen)
        text = cond["encoder_hidden_states"].mean(1) if self.config.disc_text_projection else None
        terms = dict(zip(("generator", "discriminator"),
                         adversarial_terms(self.discriminator, self.config.gan_loss, fake_feats, real_feats, text)))
        terms["loss"] = terms["generator"] + terms["discriminator"]
        if self.config.r1_gamma and batch["step"] % self.config.r1_interval == 0:
            # Lazy regularisation (StyleGAN2): every r1_interval steps, scaled up by the interval.
            terms["r1"] = r1_penalty(self.discriminator, real_feats, text)
            terms["loss"] = terms["loss"] + 0.5 * self.config.r1_gamma * self.config.r1_interval * terms["r1"]
        return terms

    @torch.no_grad()
    def sample(self, captions: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """One-step latents, one unit noise per seed (what the exported file's ``onestep`` sampler does)."""
        return sample_student(self.student, self.schedule, self.prompts(captions), seeds, [self.config.start_timestep],
                              sampler="onestep", consistency_boundary=False)


def build_distillation(pipe, config: GDDConfig, teacher_dtype: torch.dtype = torch.float32, seed: int = 0) -> GDDDistillation:
    """Frozen teacher (in ``teacher_dtype``) + generator + head from a loaded pipeline; initialisation draws from
    ``seed``, so that a resumed run is the run that never stopped."""
    config.validate()
    teacher = pipe.unet.requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = make_generator(teacher, config)
        if config.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        if teacher.dtype != teacher_dtype:
            teacher.to(teacher_dtype)
        return GDDDistillation(pipe, student, teacher, config, schedule_of(pipe))


def export_gdd_student(distillation: GDDDistillation, path: str | Path, base: str, provenance: dict) -> AdapterMetadata:
    """One adapter file: the generator's UNet (diffusers keys; full and gdd_i) or its LoRA (kohya keys; lora)."""
    config, student = distillation.config, distillation.student
    extra = {"variant": config.variant, "trained_fraction": round(trained_fraction(student), 4), "cfg_scale": 1.0,
             "consistency_boundary": False}
    if config.variant == "lora":
        tensors = write_lora(student_lora_modules(student, config), "kohya")
        extra.update(format="lora", rank=config.lora_rank, alpha=config.alpha, targets=list(config.lora_targets))
    else:
        tensors = student.state_dict()
        extra.update(format="unet")
    meta = AdapterMetadata(kind="gdd_student", base=base, prediction=distillation.schedule.prediction_type,
                           sampler="onestep", steps=1, timesteps=[config.start_timestep], provenance=provenance, extra=extra)
    write_adapter(path, {k: v.detach().to(torch.float16) if v.ndim else v.float() for k, v in tensors.items()}, meta)
    return meta


def train_gdd(
    teacher: str | Path,                     # diffusers pipeline folder or single-file checkpoint
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,
    out: str | Path,
    config: GDDConfig = GDDConfig(),
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """Train a one-step GDD generator from ``teacher`` and export it; returns ``out``, or None if stopped early."""
    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    setup = method.setup
    distillation = build_distillation(setup.pipe, config, teacher_dtype=teacher_dtype(method.run.mixed_precision),
                                      seed=method.run.seed)
    log.info("GDD generator (%s): %.1f%% of its parameters trained; discriminator head %s parameters", config.variant,
             100 * trained_fraction(distillation.student), f"{sum(p.numel() for p in distillation.discriminator.parameters()):,}")

    def sample_fn(model, step):
        method.preview(model.sample, f"step-{step:08d}-1step")

    def export(model):
        export_gdd_student(model, method.out, setup.base, method.provenance("gdd", config.steps, PROVENANCE_FIELDS))

    return train_and_export(method, "gdd", distillation, export, "gdd", sample_fn=sample_fn,
                            lr_scales={"discriminator.": config.disc_lr / config.lr})


def load_config(preset: str = "paper", config_file: Optional[str | Path] = None, **overrides) -> GDDConfig:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored)."""
    return load_options(PRESETS, "GDD", preset, config_file, **overrides)
