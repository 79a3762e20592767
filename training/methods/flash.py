"""Flash Diffusion (Chadebec et al. 2024): a LoRA that makes the teacher sample in 1-4 steps without CFG.

The student is the teacher UNet plus a LoRA, read through LCM's boundary condition. Each batch:

1. a start index on the teacher's K-step trailing grid is drawn from a Gaussian mixture whose mode
   probabilities change by phase (early phases favour low noise, later ones pure noise); with
   ``pairs_per_rollout`` h > 1, h indices, and one rollout serves them all (its states at each, or, with
   ``student_inputs``, the state the student's own sampler step from the rollout's start reaches);
2. the student predicts x0 from the noised latent in one pass;
3. the teacher's target is its own no-grad DPM-Solver++(2M) rollout with CFG (scale drawn per batch)
   from the same noisy latent to the end of the grid;
4. loss = distillation (L2 / L1 / pseudo-Huber) + DMD term (Yin et al. 2024; the student, without
   gradient, as fake score) + adversarial term, with per-phase weights; the discriminator is a small head
   on the frozen teacher's mid-block features of noised student outputs and noised real latents.

The DMD2 variant (Yin et al. 2024b; ``fake_score="separate"``) replaces the student-as-fake-score with a separate
LoRA on the teacher, trained every step by denoising the student's outputs, while the student steps only every
``generator_interval`` steps (the two time-scale rule); with zero distillation weights no teacher rollout is run.

Unlike the reference implementation, the teacher rollout and the teacher features are computed once
per batch and shared by the generator and discriminator updates: one backward pass trains both,
because the generator's adversarial term reads the head through detached parameters and the head's
own loss reads detached features. Every option of the paper's SD setup is a ``FlashConfig`` field with
the paper's value as default.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...core.adapter_file import AdapterMetadata, read_adapter
from ...core.lora import read_lora
from ...core.parameterization import diffuse, start_noise_scaling
from ...core.samplers import get_sampler, sample_dpmpp_2m
from ...core.schedule import NUM_TRAIN_TIMESTEPS, DiscreteSchedule, distillation_timesteps
from ..diffusers_sampling import CFGDenoiser, UNetDenoiser
from ..pipelines import base_of, cat_cond
from ..students import sample_student
from ..driver import add_student_lora, consistency_lora_metadata, export_consistency_lora, start_run, train_and_export
from ..teacher_data import schedule_of, teacher_dtype
from ..options import CheckpointingOption, LoraOptions, load_options, option, positive_float, replace_options, str_list
from .gan import GAN_LOSSES, AdversarialDistillation, adversarial_terms, teacher_features

log = logging.getLogger("fewstep")

DISTILL_LOSSES = ("l2", "l1", "huber", "lpips")
REAL_SOURCES = ("data", "teacher")
FAKE_SCORES = ("student", "separate")
# How the exported student steps: the paper's LCM re-noising, or DDIM, which keeps the step on one deterministic
# trajectory (the student learnt where the teacher's DPM-Solver++ trajectory ends from points on it).
FLASH_SAMPLERS = ("consistency", "ddim")


@dataclass
class FlashConfig(LoraOptions, CheckpointingOption):
    """Flash Diffusion's options; defaults are the paper's SD1.5 setup (``examples/configs/flash_sd.yaml``)."""

    # Student: LoRA on the teacher UNet (SD1.5: rank 128 on the attention projections; SDXL: 64); alpha = rank.
    lora_rank: int = 128
    # Start timesteps: Gaussian mixture over the teacher's K-step grid, mode probabilities per phase.
    teacher_steps: int = option(32, "K: steps of the teacher's DPM-Solver++ grid (trailing)")
    mixture_var: float = 0.5
    # Start points taken from one teacher rollout (1: the paper's one per rollout). h > 1 rolls out batch/h samples from
    # the noisiest of h start indices drawn from the phase's mixture and trains on their states at all h: every pair's
    # start index still follows the mixture, at 1/h of the teacher's rollout cost.
    pairs_per_rollout: int = option(1, "start points per teacher rollout (1 = the paper; must divide batch_size)")
    # A few-step sampler feeds its second step the student's own state, not the teacher's: with this probability a
    # start point past the rollout's first takes the state the exported sampler reaches in one student step from the
    # rollout's start (exactly 2-step sampling's second input), with the same teacher target.
    student_inputs: float = option(0.0, "share of shared-rollout start points whose input is the student's own one-step "
                                   "state (0 = the teacher's state, the paper; needs pairs_per_rollout > 1)")
    phase_steps: tuple[int, ...] = option((5000, 5000, 5000, 5000), "optimiser steps per phase, e.g. 5000,5000,5000,5000")
    mode_probs: tuple[tuple[float, ...], ...] = ((0.0, 0.0, 0.5, 0.5), (0.1, 0.3, 0.3, 0.3),
                                                  (0.25, 0.25, 0.25, 0.25), (0.4, 0.2, 0.2, 0.2))
    # Teacher target: CFG scale (diffusers convention) drawn uniformly per batch.
    guidance_min: float = option(3.0, "lowest teacher CFG scale")
    guidance_max: float = option(13.0, "highest teacher CFG scale")
    # Losses and their per-phase weights.
    distill_loss: str = option("l2", "distillation loss (the paper's lpips needs --lpips-weights)", choices=DISTILL_LOSSES)
    huber_c: float = 0.001                           # pseudo-Huber constant, as LCM
    lpips_weights: tuple[str, ...] = option((), "comma-separated local files: torchvision's VGG16 checkpoint and the lpips "
                                            "package's vgg.pth", parse=str_list)
    lpips_crop: int = 64                             # LPIPS on the decoded centre crop of this many latent pixels, as the reference
    distill_weights: tuple[float, ...] = option((1.0, 1.0, 1.0, 1.0), "per-phase distillation weights, e.g. 1,1,1,1")
    dmd_weights: tuple[float, ...] = option((0.0, 0.3, 0.5, 0.7), "per-phase DMD weights")
    # Lazy DMD, as StyleGAN2's lazy R1: the term (a teacher CFG pass and a student pass) every dmd_interval steps,
    # weighted by the interval. 1: every step, as the paper.
    dmd_interval: int = option(1, "steps between DMD terms (weighted by the interval; 1 = every step, the paper)")
    # DMD's fake score: the student read without its boundary (the paper), or DMD2's separate LoRA on another copy of
    # the teacher, trained on the student's outputs every step (one more UNet in memory).
    fake_score: str = option("student", "DMD's fake score: the student itself (the paper) or a separate LoRA trained on "
                             "the student's outputs (DMD2)", choices=FAKE_SCORES)
    generator_interval: int = option(1, "optimiser steps per student update; the separate fake score and the "
                                     "discriminator learn every step (DMD2's two time-scale rule: 5)")
    adversarial_weights: tuple[float, ...] = option((0.0, 0.1, 0.2, 0.3), "per-phase GAN weights")
    gan_loss: str = option("lsgan", "GAN objective", choices=GAN_LOSSES)
    gan_timesteps: tuple[int, ...] = (10, 250, 500, 750)
    disc_feature_module: str = "mid_block"           # teacher module whose output the discriminator head reads
    disc_channels: int = 64
    real_from: str = option("data", "the discriminator's real samples: data latents, or the teacher's targets",
                            choices=REAL_SOURCES)
    # Optimisation.
    lr: float = option(1e-5, "LoRA learning rate", parse=positive_float)
    disc_lr: float = option(1e-5, "discriminator head learning rate", parse=positive_float)
    batch_size: int = option(4, "images per step per GPU")
    grad_clip: float = 0.0                           # the paper clips nothing
    ema_decay: Optional[float] = None                # the paper keeps no EMA
    # What the exported file says.
    sample_steps: int = 4
    sampler: str = option("consistency", "the sampler the file names: consistency = LCM re-noising (the paper's), "
                          "ddim = deterministic", choices=FLASH_SAMPLERS)

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps)

    def phase(self, step: int) -> int:
        """The phase an optimiser step (0-based) belongs to; steps past the last phase stay in it."""
        ends = itertools.accumulate(self.phase_steps)
        return min(sum(end <= step for end in ends), len(self.phase_steps) - 1)

    def validate(self) -> None:
        phases = len(self.phase_steps)
        problems = []
        for name in ("mode_probs", "distill_weights", "dmd_weights", "adversarial_weights"):
            if len(getattr(self, name)) != phases:
                problems.append(f"{name} has {len(getattr(self, name))} entries but there are {phases} phases (phase_steps)")
        modes = {len(p) for p in self.mode_probs}
        if len(modes) != 1 or any(sum(p) <= 0 or min(p) < 0 for p in self.mode_probs):
            problems.append("mode_probs must give every phase the same number of non-negative mode probabilities")
        elif self.teacher_steps < modes.pop():
            problems.append("teacher_steps must be at least the number of mixture modes")
        if self.distill_loss not in DISTILL_LOSSES:
            problems.append(f"distill_loss {self.distill_loss!r} is not one of {', '.join(DISTILL_LOSSES)}")
        elif self.distill_loss == "lpips" and not self.lpips_weights:
            problems.append("distill_loss 'lpips' needs lpips_weights: local files with torchvision's VGG16 weights and the "
                            "lpips package's vgg.pth (nothing is downloaded)")
        if self.gan_loss not in GAN_LOSSES:
            problems.append(f"gan_loss {self.gan_loss!r} is not one of {', '.join(GAN_LOSSES)}")
        if self.real_from not in REAL_SOURCES:
            problems.append(f"real_from {self.real_from!r} is not one of {', '.join(REAL_SOURCES)}")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            problems.append(f"need 1 <= guidance_min <= guidance_max; got {self.guidance_min}, {self.guidance_max}")
        if any(not 0 <= t < NUM_TRAIN_TIMESTEPS for t in self.gan_timesteps):
            problems.append(f"gan_timesteps must lie in [0, {NUM_TRAIN_TIMESTEPS})")
        if self.sampler not in FLASH_SAMPLERS:
            problems.append(f"sampler {self.sampler!r} is not one of {', '.join(FLASH_SAMPLERS)}")
        if self.lora_rank < 1 or self.batch_size < 1 or min(self.phase_steps) < 1:
            problems.append("lora_rank, batch_size and every phase_steps entry must be positive")
        elif not 0.0 <= self.student_inputs <= 1.0 or (self.student_inputs and self.pairs_per_rollout == 1):
            problems.append(f"student_inputs ({self.student_inputs}) must lie in [0, 1] and needs pairs_per_rollout > 1")
        elif self.dmd_interval < 1 or self.generator_interval < 1:
            problems.append("dmd_interval and generator_interval must be at least 1")
        elif self.fake_score not in FAKE_SCORES:
            problems.append(f"fake_score {self.fake_score!r} is not one of {', '.join(FAKE_SCORES)}")
        elif self.generator_interval > 1 and self.fake_score != "separate":
            problems.append("generator_interval > 1 needs fake_score 'separate' (only a separate fake score learns "
                            "between student updates)")
        elif self.pairs_per_rollout < 1 or self.batch_size % self.pairs_per_rollout:
            problems.append(f"pairs_per_rollout ({self.pairs_per_rollout}) must be positive and divide batch_size ({self.batch_size})")
        if problems:
            raise ValueError("invalid Flash configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "FlashConfig":
        """A copy with some options changed; unknown names raise a ValueError that lists the valid ones."""
        return replace_options(self, "Flash", **changes)


PRESETS = {
    "paper": FlashConfig(),
    # The bundled proxy teacher on a CPU: a smaller LoRA also on the ResNet convolutions (the proxy UNet has
    # attention at one level only), a shorter grid, larger batches, a higher rate and a guidance range
    # around its best CFG scale; phase structure and loss weights as the paper. DDIM sampling: on the proxy the
    # bundled student's 4-step FID is 37.9 with it, 44.1 with LCM re-noising (bench/results/flash.json).
    "proxy": FlashConfig(lora_rank=32, lora_targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
                         teacher_steps=16, phase_steps=(150, 150, 150, 150), guidance_min=2.0, guidance_max=6.0,
                         lr=2e-4, disc_lr=2e-4, batch_size=32, sampler="ddim"),
}


def start_index_probabilities(config: FlashConfig, phase: int) -> torch.Tensor:
    """P(start index i) on the K-step grid: modes at i = j K / M (M modes) weighted by the phase's probabilities."""
    k, probs = config.teacher_steps, config.mode_probs[phase]
    locs = [j * (k // len(probs)) for j in range(len(probs))]
    i = torch.arange(k, dtype=torch.float64)
    density = sum(p * torch.exp(-(i - loc) ** 2 / config.mixture_var) for p, loc in zip(probs, locs))
    return density / density.sum()


def start_indices(config: FlashConfig, phase: int, gen: torch.Generator) -> torch.Tensor:
    """``pairs_per_rollout`` grid indices, each drawn from the phase's mixture (independently)."""
    probs = start_index_probabilities(config, phase)
    if config.pairs_per_rollout == 1:
        return torch.multinomial(probs, 1, generator=gen)
    return torch.multinomial(probs, config.pairs_per_rollout, replacement=True, generator=gen)


def export_timesteps(config: FlashConfig) -> list[int]:
    """The grid timesteps at the mixture modes: where the student was trained to start (999, 749, 499, 249)."""
    grid = distillation_timesteps(config.teacher_steps)
    return [int(grid[j * config.teacher_steps // config.sample_steps]) for j in range(config.sample_steps)]


class FlashDistillation(AdversarialDistillation):
    """Student, frozen teacher, discriminator head and text encoders; ``forward(batch, gen)`` returns per-sample losses.

    One module so that ``accelerate`` moves, wraps (DDP) and checkpoints it as a whole; only the LoRA and the
    head have ``requires_grad``.
    """

    def __init__(self, pipe, student, teacher, config: FlashConfig, schedule: DiscreteSchedule,
                 fake_score: Optional[torch.nn.Module] = None):
        super().__init__(pipe, student, teacher, config, schedule)
        self.fake_score = fake_score
        if config.distill_loss == "lpips":
            from ..lpips import LPIPS

            self.lpips, self.vae = LPIPS.from_files(config.lpips_weights), pipe.vae.requires_grad_(False)
        self.grid_timesteps = distillation_timesteps(config.teacher_steps)
        self.grid = schedule.sigmas_for_timesteps(self.grid_timesteps)

    def train(self, mode: bool = True) -> "FlashDistillation":
        super().train(mode)
        if hasattr(self, "lpips"):
            self.lpips.eval(), self.vae.eval()
        return self

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg_, z = self.config, batch["latents"]
        phase = cfg_.phase(batch["step"])
        pairs = cfg_.pairs_per_rollout
        rollouts, device = z.shape[0] // pairs, z.device
        cond, uncond = self.prompts.with_unconditional(batch["captions"][:rollouts])
        teacher = UNetDenoiser(self.teacher, self.schedule)

        # 1. Start indices on the teacher's grid, one per rollout pair (shared by the batch, so the rollout is batched);
        # the rollout starts at the noisiest.
        indices = start_indices(cfg_, phase, gen)
        start = int(indices.min())
        sigmas = self.grid[start:].to(device)
        noise = torch.randn((rollouts, *z.shape[1:]), generator=gen).to(z)
        if start == 0:
            x = noise * start_noise_scaling(sigmas[0])     # pure noise, as at inference
        else:
            t_start = torch.full((rollouts,), int(self.grid_timesteps[start]))
            x = diffuse(self.schedule, z[:rollouts], noise, t_start) * start_noise_scaling(sigmas[0])

        # 2. The teacher's multistep CFG target, computed once, and its states at the pairs' start indices (skipped when
        # nothing reads it: DMD2's zero distillation weight).
        states = {0: x}
        keep = (lambda step: states.setdefault(step["i"], step["x"])) if pairs > 1 else None
        target = None
        if pairs > 1 or cfg_.distill_weights[phase] or cfg_.real_from == "teacher":
            with torch.no_grad():
                target = sample_dpmpp_2m(CFGDenoiser(teacher, cond, uncond, self._guidance_scale(gen)), x, sigmas,
                                         callback=keep)
        if pairs > 1:
            offsets = (indices - start).tolist()
            inputs = [states[i] for i in offsets]
            if cfg_.student_inputs:
                inputs = self._student_states(states[0], inputs, offsets, sigmas, cond, gen)
            x, target = torch.cat(inputs), target.repeat(pairs, 1, 1, 1)
            cond, uncond = cat_cond(*[cond] * pairs), cat_cond(*[uncond] * pairs)
        start_sigmas = self.grid[indices].to(device).repeat_interleave(rollouts)

        # 3. The student's one-step x0, through the LCM boundary (without gradient between DMD2's student updates: its
        # LoRA then gets no gradient, and AdamW leaves it alone).
        generator_step = batch["step"] % cfg_.generator_interval == 0
        with torch.set_grad_enabled(generator_step and torch.is_grad_enabled()):
            student_x0 = UNetDenoiser(self.student, self.schedule, consistency_boundary=True)(x, start_sigmas, **cond)

        terms = {} if target is None else {"distill": self._distill(student_x0, target)}
        dmd_step = generator_step and batch["step"] // cfg_.generator_interval % cfg_.dmd_interval == 0
        dmd_weight = cfg_.dmd_weights[phase] * cfg_.dmd_interval if dmd_step else 0.0
        if dmd_weight:
            terms["dmd"] = self._dmd(student_x0, cond, uncond, teacher, gen)
        terms["adversarial"], terms["discriminator"] = self._adversarial(student_x0, target if cfg_.real_from == "teacher" else z, cond, gen)
        if self.fake_score is not None:
            terms["fake_score"] = self._fake_score_loss(student_x0.detach(), cond, gen)
        terms["loss"] = (cfg_.distill_weights[phase] * terms.get("distill", 0.0) + dmd_weight * terms.get("dmd", 0.0)
                         + cfg_.adversarial_weights[phase] * terms["adversarial"] + terms["discriminator"]
                         + terms.get("fake_score", 0.0))
        return terms

    def _student_states(self, start: torch.Tensor, inputs: list, offsets: list, sigmas: torch.Tensor, cond: dict,
                        gen: torch.Generator) -> list:
        """``inputs`` with each state past the rollout's ``start`` replaced, with probability ``student_inputs``, by
        where the exported sampler takes the student in one step from the start (no gradient)."""
        chosen = (torch.rand(len(offsets), generator=gen) < self.config.student_inputs).tolist()
        if not any(c and o for c, o in zip(chosen, offsets)):
            return inputs
        with torch.no_grad():
            x0 = UNetDenoiser(self.student, self.schedule, consistency_boundary=True)(
                start, sigmas[0].expand(len(start)), **cond)
        sampler = get_sampler(self.config.sampler)
        noise = lambda sigma, sigma_next: torch.randn(start.shape, generator=gen).to(start)   # noqa: E731
        return [sampler(lambda x, sigma, **_: x0, start, sigmas[[0, o]], noise_sampler=noise) if c and o else state
                for state, o, c in zip(inputs, offsets, chosen)]

    def _guidance_scale(self, gen: torch.Generator) -> float:
        """The teacher's CFG scale, uniform in [guidance_min, guidance_max] (diffusers convention)."""
        low, high = self.config.guidance_min, self.config.guidance_max
        return low + (high - low) * float(torch.rand((), generator=gen))

    def _distill(self, student_x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = (student_x0.float() - target.float()).flatten(1)
        if self.config.distill_loss == "l2":
            return diff.pow(2).mean(1)
        if self.config.distill_loss == "l1":
            return diff.abs().mean(1)
        if self.config.distill_loss == "huber":
            c = self.config.huber_c
            return ((diff.pow(2) + c * c).sqrt() - c).mean(1)
        return self.lpips(self._decode_crop(student_x0), self._decode_crop(target.detach()))

    def _decode_crop(self, latents: torch.Tensor) -> torch.Tensor:
        size = min(self.config.lpips_crop, latents.shape[-1])
        top, left = (latents.shape[-2] - size) // 2, (latents.shape[-1] - size) // 2
        crop = latents[..., top:top + size, left:left + size] / self.vae.config.scaling_factor
        return self.vae.decode(crop.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def _noised(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 noised at a uniform training timestep, its sigma, the noise), in the samplers' sigma form."""
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen)
        sigma = self.schedule.sigmas[t].to(x0)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        return x0 + noise * sigma.view(-1, 1, 1, 1), sigma, noise

    def _dmd(self, student_x0, cond, uncond, teacher, gen) -> torch.Tensor:
        """Distribution matching: move x0 along (fake x0 - real x0) at a random noise level, normalised per sample."""
        with torch.no_grad():
            x, sigma, _ = self._noised(student_x0.detach(), gen)
            real = CFGDenoiser(teacher, cond, uncond, self._guidance_scale(gen))(x, sigma)
            fake = UNetDenoiser(self.student if self.fake_score is None else self.fake_score, self.schedule)(x, sigma, **cond)
            weight = 1.0 / ((student_x0 - real).abs().flatten(1).mean(1) + 1e-5)
            goal = student_x0 - weight.view(-1, 1, 1, 1) * (fake - real)
        return (student_x0.float() - goal.float()).pow(2).flatten(1).mean(1)

    def _fake_score_loss(self, student_x0: torch.Tensor, cond: dict, gen: torch.Generator) -> torch.Tensor:
        """DMD2's fake score learns the student's distribution: the teacher's denoising loss (epsilon MSE) on the
        student's noised outputs."""
        x, sigma, noise = self._noised(student_x0, gen)
        x0 = UNetDenoiser(self.fake_score, self.schedule)(x, sigma, **cond)
        eps = (x - x0.float()) / sigma.view(-1, 1, 1, 1)
        return (eps - noise).pow(2).flatten(1).mean(1)

    def _adversarial(self, student_x0, real, cond, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """(generator term, discriminator term), both per sample, from one teacher feature pass."""
        features = teacher_features(self.tap, self.teacher.dtype, self.schedule, student_x0, real, cond,
                                    self.config.gan_timesteps, gen)
        return adversarial_terms(self.discriminator, self.config.gan_loss, *features)

    @torch.no_grad()
    def sample(self, captions: Sequence[str], seeds: Sequence[int], steps: int) -> torch.Tensor:
        """Student latents at ``steps`` steps as the exported file will sample them: its timesteps (its own list at its
        step count, else core's fallback) and its sampler."""
        exported = exported_metadata(self.config, base_of(self.prompts.pipe), self.schedule.prediction_type)
        return sample_student(self.student, self.schedule, self.prompts(captions), seeds, exported.timesteps_for(steps),
                              exported.sampler)


def build_distillation(pipe, config: FlashConfig, init_lora: Optional[str | Path] = None,
                       teacher_dtype: torch.dtype = torch.float32, seed: int = 0) -> FlashDistillation:
    """Frozen teacher (in ``teacher_dtype``) + student (teacher copy + fp32 LoRA) + head, from a loaded pipeline.

    LoRA and head initialisation draw from ``seed``, so that a resumed run is the run that never stopped."""
    import copy

    config.validate()
    base = base_of(pipe)
    init = None
    if init_lora is not None:
        adapter = read_adapter(init_lora, expected_base=base, expected_kinds=["flash_lora"])
        init, _ = read_lora(adapter.tensors)
    teacher = pipe.unet.requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = add_student_lora(copy.deepcopy(teacher), config, init)
        # DMD2's fake score starts as the teacher (its LoRA's up projections start at zero).
        fake_score = add_student_lora(copy.deepcopy(teacher), config) if config.fake_score == "separate" else None
        for unet in (student, fake_score):
            if unet is not None and config.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
        if teacher.dtype != teacher_dtype:
            teacher.to(teacher_dtype)
        return FlashDistillation(pipe, student, teacher, config, schedule_of(pipe), fake_score)


def exported_metadata(config: FlashConfig, base: str, prediction: str, provenance: Optional[dict] = None) -> AdapterMetadata:
    """What a Flash student's file says: how the hosts will sample it (and the previews do)."""
    return consistency_lora_metadata(config, base, prediction, config.sampler, export_timesteps(config), provenance)


def export_flash_lora(distillation: FlashDistillation, path: str | Path, base: str, provenance: dict) -> AdapterMetadata:
    """The student's LoRA as one fewstep adapter file: kohya keys + metadata (atomic write)."""
    meta = exported_metadata(distillation.config, base, distillation.schedule.prediction_type, provenance)
    export_consistency_lora(distillation.student, distillation.config, path, meta)
    return meta


def train_flash(
    teacher: str | Path,                     # diffusers pipeline folder or single-file checkpoint
    data,                                    # CaptionedImages, or a dataset spec for load_dataset ("proxy", a folder, shards)
    run_dir: str | Path,                     # checkpoints, logs, sample grids
    out: str | Path,                         # the exported adapter file
    config: FlashConfig = FlashConfig(),
    resolution: Optional[int] = None,        # image size for a dataset spec (default: the teacher's native size)
    teacher_config: Optional[str | Path] = None,  # diffusers folder with configs, for single-file teachers
    init_lora: Optional[str | Path] = None,  # a Flash LoRA file to continue from
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """Distil ``teacher`` into a Flash LoRA and export it; returns ``out``, or None if stopped by ``stop_after``."""
    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    setup = method.setup
    distillation = build_distillation(setup.pipe, config, init_lora, teacher_dtype=teacher_dtype(method.run.mixed_precision),
                                      seed=method.run.seed)
    log.info("Flash student: %s trainable LoRA parameters, discriminator head %s",
             f"{sum(p.numel() for p in distillation.student.parameters() if p.requires_grad):,}",
             f"{sum(p.numel() for p in distillation.discriminator.parameters()):,}")

    def sample_fn(model, step):
        for steps in (1, 2, config.sample_steps):
            method.preview(lambda captions, seeds: model.sample(captions, seeds, steps), f"step-{step:08d}-{steps}steps")

    def export(model):
        export_flash_lora(model, method.out, setup.base, method.provenance(
            "flash", config.total_steps, ("teacher_steps", "pairs_per_rollout", "student_inputs", "dmd_interval",
                                          "fake_score", "generator_interval", "guidance_min", "guidance_max",
                                          "distill_loss", "gan_loss")))

    return train_and_export(method, "flash", distillation, export, "flash", total_steps=config.total_steps,
                            sample_fn=sample_fn, lr_scales={"discriminator.": config.disc_lr / config.lr})


def load_config(preset: str = "paper", config_file: Optional[str | Path] = None, **overrides) -> FlashConfig:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored)."""
    return load_options(PRESETS, "Flash", preset, config_file, **overrides)
