"""Guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models"), stage 1.

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
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...core.adapter_file import AdapterMetadata, write_adapter
from ...core.guidance import cfg_scale_from_imagen_w
from ...core.parameterization import append_dims, distillation_weight
from ...core.schedule import NUM_TRAIN_TIMESTEPS, DiscreteSchedule, select_timesteps
from ..diffusers_sampling import CFGDenoiser, UNetDenoiser, w_condition
from ..pipelines import PromptEncoder
from ..students import sample_student
from .common import load_options, load_teacher_data, provenance, replace_options

log = logging.getLogger("fewstep")

LOSS_SPACES = ("x", "eps")
GUIDED_SAMPLERS = ("ddim", "stochastic")


@dataclass
class GuidedConfig:
    """Guided distillation's options; defaults follow the paper's latent text-to-image setup."""

    # The guidance weight w (Imagen's convention; CFG scale s = 1 + w), drawn uniformly per sample.
    w_min: float = 2.0
    w_max: float = 14.0
    default_w: float = 6.5                          # what the exported file proposes (CFG scale 7.5)
    embedding_dim: int = 256                        # width of w's sinusoidal features (time_cond_proj_dim)
    loss_space: str = "x"                           # x: truncated-SNR-weighted x0 error (paper) | eps: noise MSE
    # Stage 1 optimisation: the whole UNet is trained.
    steps: int = 10000
    lr: float = 1e-5
    batch_size: int = 8
    ema_decay: Optional[float] = 0.9999
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    # What the exported file says: sampler and default step count (stage 1 keeps the teacher's steps).
    sampler: str = "ddim"                           # ddim | stochastic (Meng's: one double step, re-noise one back)
    sample_steps: int = 50

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
        if min(self.steps, self.batch_size, self.embedding_dim, self.sample_steps) < 1:
            problems.append("steps, batch_size, embedding_dim and sample_steps must be positive")
        if problems:
            raise ValueError("invalid guided-distillation configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "GuidedConfig":
        return replace_options(self, "guided", **changes)


PRESETS = {
    "paper": GuidedConfig(),
    # The bundled proxy teacher samples at CFG 4 (w = 3): w in [0, 8] covers it; sized for a 2-core CPU.
    "proxy": GuidedConfig(w_min=0.0, w_max=8.0, default_w=3.0, steps=2000, lr=1e-4, batch_size=32, ema_decay=0.999),
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


class GuidedStage1(torch.nn.Module):
    """Student, frozen teacher and text encoders; ``forward(batch, gen)`` returns the per-sample stage-1 loss."""

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

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg_, z = self.config, batch["latents"]
        n = z.shape[0]
        cond, uncond = self.prompts.with_unconditional(batch["captions"])
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=gen)
        sigma = self.schedule.sigmas[t].to(z)
        x = z + append_dims(sigma, z.ndim) * torch.randn(z.shape, generator=gen).to(z)   # sigma space: x0 + sigma eps
        w = cfg_.w_min + (cfg_.w_max - cfg_.w_min) * torch.rand(n, generator=gen)
        with torch.no_grad():
            target = CFGDenoiser(UNetDenoiser(self.teacher, self.schedule), cond, uncond, cfg_scale_from_imagen_w(w).to(z))(x, sigma)
        student = UNetDenoiser(self.student, self.schedule)(x, sigma, **cond, **w_condition(w, cfg_.embedding_dim, z, n))
        error = (student.float() - target.float()).pow(2).flatten(1).mean(1)
        return {"loss": distillation_weight(sigma, cfg_.loss_space) * error, "x0_mse": error.detach()}

    @torch.no_grad()
    def sample(self, captions: Sequence[str], seeds: Sequence[int], steps: int, w: float) -> torch.Tensor:
        """Student latents at ``steps`` trailing steps with guidance weight ``w``, one pass per step."""
        cond = self.prompts(captions)
        cond.update(w_condition(w, self.config.embedding_dim, cond["encoder_hidden_states"], len(captions)))
        return sample_student(self.student, self.schedule, cond, seeds, select_timesteps("trailing", steps),
                              self.config.sampler, consistency_boundary=False)


def build_stage1(pipe, config: GuidedConfig, seed: int = 0) -> GuidedStage1:
    config.validate()
    teacher = pipe.unet.requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = add_w_embedding(teacher, config.embedding_dim).requires_grad_(True).train()
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    schedule = DiscreteSchedule.stable_diffusion(prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"))
    return GuidedStage1(pipe, student, teacher, config, schedule)


def export_guided_student(model: GuidedStage1, path: str | Path, base: str, provenance: dict) -> AdapterMetadata:
    """The student UNet (diffusers keys, fp16) + metadata as one fewstep adapter file (atomic write)."""
    config = model.config
    meta = AdapterMetadata(
        kind="guided_student", base=base, prediction=model.schedule.prediction_type, sampler=config.sampler,
        steps=config.sample_steps, timesteps=select_timesteps("trailing", config.sample_steps), provenance=provenance,
        guidance={"convention": "imagen", "w_min": config.w_min, "w_max": config.w_max, "default_w": config.default_w},
        extra={"embedding_dim": config.embedding_dim, "layout": "diffusers_unet", "stage": 1, "cfg_scale": 1.0},
    )
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.student.state_dict().items()}
    write_adapter(path, tensors, meta)
    return meta


def train_guided(
    teacher: str | Path,                     # diffusers pipeline folder or single-file checkpoint
    data,                                    # CaptionedImages, or a dataset spec for load_dataset ("proxy", a folder, shards)
    run_dir: str | Path,                     # checkpoints, logs, sample grids
    out: str | Path,                         # the exported adapter file
    config: GuidedConfig = GuidedConfig(),
    resolution: Optional[int] = None,        # image size for a dataset spec (default: the teacher's native size)
    teacher_config: Optional[str | Path] = None,  # diffusers folder with configs, for single-file teachers
    mixed_precision: str = "no",
    checkpoint_every: int = 250,
    sample_every: int = 500,
    log_every: int = 25,
    seed: int = 0,
    resume: bool = True,
    stop_after: Optional[int] = None,
    progress: bool = True,
) -> Optional[Path]:
    """Stage 1: distil ``teacher`` into a w-conditioned student and export it; None if stopped by ``stop_after``."""
    from accelerate import PartialState

    from ..loop import training_loop

    config.validate()
    run_dir, out = Path(run_dir), Path(out)
    setup = load_teacher_data(teacher, data, resolution, teacher_config)
    model = build_stage1(setup.pipe, config, seed=seed)
    log.info("guided student: %s trainable parameters", f"{sum(p.numel() for p in model.student.parameters()):,}")
    preview = setup.preview_captions()

    def sample_fn(m, step):
        for w in (0.0, config.default_w):
            setup.save_grid(m.sample(preview, list(range(len(preview))), min(config.sample_steps, 8), w),
                            run_dir / "samples" / f"step-{step:08d}-w{w:g}.png")

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "guided_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    model = training_loop(
        run_dir, model, lambda m, b, g: m(b, g), setup.batch_fn(config.batch_size), config.steps, lr=config.lr,
        grad_clip=config.grad_clip, ema_decay=config.ema_decay, mixed_precision=mixed_precision,
        checkpoint_every=checkpoint_every, sample_every=sample_every, sample_fn=sample_fn, log_every=log_every,
        seed=seed, resume=resume, stop_after=stop_after, progress=progress, desc="guided stage 1")
    if stop_after is not None and stop_after < config.steps:
        return None
    if PartialState().is_main_process:
        export_guided_student(model, out, setup.base, provenance("guided", teacher, config.steps, len(setup.captions), config,
                                                                ("w_min", "w_max", "loss_space", "embedding_dim")))
    PartialState().wait_for_everyone()
    return out
