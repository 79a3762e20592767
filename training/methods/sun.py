"""SUN (SpeedUpNet, Chai et al. 2023): train the negative-prompt cross-attention adapter of ``core.sun``.

The base UNet stays frozen; only the adapter learns. Two objectives, both against the teacher's classifier-free
guidance with a *negative* prompt (diffusers' convention, uncond replaced by the negative: n + s (p - n)):

1. Negative-positive offset learning: at a random noise level, the adapted model's single pass (positive prompt in
   the UNet, negative prompt in the adapter) matches the teacher's CFG prediction. Negative prompts are drawn per
   sample: the empty prompt (plain CFG) with probability ``empty_negative_prob``, else a random prompt from the pool
   (a file, or the training captions), so that the adapter learns what a negative prompt does, not one prompt.
   With probability ``truncate_prompt_prob`` the positive caption is cut to its first words: a vague prompt has
   several kinds of sample, which is where a negative prompt shows (a few-caption dataset has no such prompts).
2. Multi-Step Consistency (MSC): from shared noise, the teacher samples with CFG in ``msc_teacher_steps`` DPM-Solver++
   steps; at each of the student's ``sample_steps`` trailing timesteps the adapted model, started on the teacher's
   trajectory, must land where the teacher lands at the next one in one step. The target is the x0 whose DDIM step
   does that (progressive distillation's target), so the few-step result stays faithful to the multi-step CFG one.

The paper's method text could not be retrieved (only the inference code is public): the adapter, attention
normalisation and their combination are the official code's; both losses are reconstructions consistent with the
paper's abstract (``shared/research/sun-training.md``). Our initialisation also differs: the branches start from the
layer's own key/value weights with alpha = 0, so training starts from the base model instead of a random offset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...core.adapter_file import AdapterMetadata, write_adapter
from ...core.parameterization import append_dims, distillation_weight, progressive_distillation_target, start_noise_scaling
from ...core.samplers import get_sampler
from ...core.schedule import NUM_TRAIN_TIMESTEPS, DiscreteSchedule, distillation_timesteps
from ...core.sun import VARIANTS
from ..diffusers_sampling import CFGDenoiser, UNetDenoiser
from ..pipelines import PromptEncoder
from ..students import sample_student
from ..sun_attention import attach_sun, new_sun_adapter
from ..driver import start_run, train_and_export
from ..teacher_data import schedule_of
from ..options import CheckpointingOption, OptimiserOptions, count, load_options, option, positive_float, replace_options

log = logging.getLogger("fewstep")

LOSS_SPACES = ("x", "eps")
PROVENANCE_FIELDS = ("variant", "cfg_scale", "empty_negative_prob", "truncate_prompt_prob", "loss_space", "msc_weight",
                     "msc_teacher_steps")


@dataclass
class SunConfig(OptimiserOptions, CheckpointingOption):
    """SUN's options. The paper states none of its training hyperparameters; defaults are ours, named as such."""

    variant: str = option("add_pos", "add_pos: also an extra positive branch, as the released adapter; plain: the negative "
                          "branch only", choices=VARIANTS)
    cfg_scale: float = option(7.5, "the teacher's CFG scale the adapter reproduces (diffusers convention)")
    empty_negative_prob: float = option(0.5, "share of samples whose negative prompt is empty (plain CFG)")
    negative_prompts: Optional[str] = option(None, "text file with one negative prompt per line to train with (none: the "
                                             "training captions)", parse=str)
    truncate_prompt_prob: float = option(0.0, "share of captions cut to their first words: vaguer prompts, whose samples a "
                                         "negative prompt can steer (few-caption datasets need them)")
    loss_space: str = option("x", "x: x0 error weighted by max(SNR, 1) (keeps the first, noisiest step's weight); eps: "
                             "noise MSE", choices=LOSS_SPACES)
    # Multi-step consistency against the teacher's CFG trajectory.
    msc_weight: float = option(1.0, "weight of the multi-step consistency loss (0: off)")
    msc_teacher_steps: int = option(24, "steps of the teacher's DPM-Solver++ CFG trajectory (a multiple of the student's "
                                    "steps, so that its timesteps lie on the grid)")
    msc_batch_size: int = option(2, "samples per step that get a teacher trajectory (the costly part)", parse=count)
    teacher_sampler: str = "dpmpp_2m"       # the paper's baseline: DPM-Solver++ with CFG
    # Optimisation: only the adapter is trained.
    steps: int = 20000
    lr: float = option(1e-4, "learning rate of the adapter's key/value projections", parse=positive_float)
    gain_lr_scale: float = option(30.0, "the per-channel gains (alpha, beta) learn at lr times this: they must move by O(1)",
                                  parse=positive_float)
    ema_decay: Optional[float] = 0.9999
    # What the exported file says (the released adapter: DPM-Solver++ at 4 trailing steps).
    sampler: str = option("dpmpp_2m", "the sampler the file names", choices=("dpmpp_2m", "ddim"))
    sample_steps: int = option(4, "the step count the file names")

    def validate(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.loss_space not in LOSS_SPACES:
            problems.append(f"loss_space {self.loss_space!r} is not one of {', '.join(LOSS_SPACES)}")
        if self.cfg_scale < 1.0:
            problems.append(f"cfg_scale must be at least 1; got {self.cfg_scale}")
        for name in ("empty_negative_prob", "truncate_prompt_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in [0, 1]; got {getattr(self, name)}")
        if self.msc_weight < 0 or self.gain_lr_scale <= 0:
            problems.append("msc_weight must not be negative and gain_lr_scale must be positive")
        if min(self.steps, self.batch_size, self.sample_steps, self.msc_teacher_steps) < 1 or self.msc_batch_size < 0:
            problems.append("steps, batch_size, sample_steps and msc_teacher_steps must be positive")
        elif self.msc_teacher_steps % self.sample_steps:
            problems.append(f"msc_teacher_steps ({self.msc_teacher_steps}) must be a multiple of sample_steps ({self.sample_steps})")
        if self.msc_batch_size > self.batch_size:
            problems.append(f"msc_batch_size ({self.msc_batch_size}) cannot exceed batch_size ({self.batch_size})")
        for name in ("sampler", "teacher_sampler"):
            try:
                get_sampler(getattr(self, name))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        if self.negative_prompts is not None and not Path(self.negative_prompts).is_file():
            problems.append(f"negative_prompts file {self.negative_prompts} does not exist")
        if problems:
            raise ValueError("invalid SUN configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "SunConfig":
        return replace_options(self, "SUN", **changes)


PRESETS = {
    "paper": SunConfig(),
    # The bundled proxy teacher samples at CFG 4; sized for a 2-core CPU.
    "proxy": SunConfig(cfg_scale=4.0, msc_teacher_steps=8, msc_batch_size=8, steps=1500, lr=1e-3, batch_size=32,
                       ema_decay=0.999, warmup_steps=50, truncate_prompt_prob=0.3),
}


def load_config(preset: str = "paper", config_file: Optional[str | Path] = None, **overrides) -> SunConfig:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored)."""
    return load_options(PRESETS, "SUN", preset, config_file, **overrides)


class SunTraining(torch.nn.Module):
    """The frozen UNet with the trainable adapter attached, and the text encoders, as one module for accelerate.

    ``forward(batch, gen)`` returns the per-sample loss. The teacher is the same UNet with no negative set."""

    def __init__(self, pipe, config: SunConfig, schedule: DiscreteSchedule, negative_pool: Sequence[str]):
        super().__init__()
        self.config, self.schedule, self.negative_pool = config, schedule, list(negative_pool)
        self.unet = pipe.unet.requires_grad_(False).eval()
        self.adapter = new_sun_adapter(self.unet, add_pos=config.variant == "add_pos").requires_grad_(True)
        self.inputs = attach_sun(self.unet, self.adapter)
        self.text_encoders = torch.nn.ModuleList(
            [m.requires_grad_(False) for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None])
        self.prompts = PromptEncoder(pipe)
        self.denoiser = UNetDenoiser(self.unet, schedule)
        # The student's trailing timesteps as a sub-grid of the teacher's rollout grid.
        self.register_buffer("rollout_sigmas", schedule.sigmas_for_timesteps(distillation_timesteps(config.msc_teacher_steps)),
                             persistent=False)
        self.stride = config.msc_teacher_steps // config.sample_steps

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval(), self.text_encoders.eval()
        return self

    def lr_scales(self) -> dict[str, float]:
        """The learning-rate factors of the per-channel gains (for ``training_loop``)."""
        return {f"adapter.*_{gain}": self.config.gain_lr_scale for gain in ("alpha", "beta")}

    def draw_positives(self, captions: Sequence[str], gen: torch.Generator) -> list[str]:
        cut = torch.rand(len(captions), generator=gen) < self.config.truncate_prompt_prob
        keep = torch.rand(len(captions), generator=gen)
        out = []
        for caption, c, k in zip(captions, cut.tolist(), keep.tolist()):
            words = caption.split()
            out.append(" ".join(words[: 1 + int(k * (len(words) - 1))]) if c and len(words) > 1 else caption)
        return out

    def draw_negatives(self, n: int, gen: torch.Generator) -> list[str]:
        empty = torch.rand(n, generator=gen) < self.config.empty_negative_prob
        picks = torch.randint(len(self.negative_pool), (n,), generator=gen)
        return ["" if e or not self.negative_pool else self.negative_pool[i] for e, i in zip(empty.tolist(), picks.tolist())]

    def student(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, negative: dict) -> torch.Tensor:
        """The adapted model's x0: one pass with the positive prompt, the negative in the adapter."""
        with self.inputs.negative_prompt(negative["encoder_hidden_states"]):
            return self.denoiser(x, sigma, **cond)

    def teacher(self, cond: dict, negative: dict) -> CFGDenoiser:
        return CFGDenoiser(self.denoiser, cond, negative, self.config.cfg_scale)

    def _error(self, student_x0: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return distillation_weight(sigma, self.config.loss_space) * (student_x0.float() - target.float()).pow(2).flatten(1).mean(1)

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg_, z = self.config, batch["latents"]
        n = z.shape[0]
        cond = self.prompts(self.draw_positives(batch["captions"], gen))
        negative = self.prompts(self.draw_negatives(n, gen))
        # 1. Offset learning at a uniformly drawn timestep.
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=gen)
        sigma = self.schedule.sigmas[t].to(z)
        x = z + append_dims(sigma, z.ndim) * torch.randn(z.shape, generator=gen).to(z)
        with torch.no_grad():
            target = self.teacher(cond, negative)(x, sigma)
        offset = self._error(self.student(x, sigma, cond, negative), target, sigma)
        out = {"loss": offset, "offset": offset.detach()}
        # 2. Multi-step consistency on the first msc_batch_size samples.
        m = cfg_.msc_batch_size if cfg_.msc_weight > 0 else 0
        if m:
            first = lambda c: {k: first(v) if isinstance(v, dict) else v[:m] for k, v in c.items()}  # noqa: E731
            cond_m, negative_m = first(cond), first(negative)
            noise = torch.randn((m, *z.shape[1:]), generator=gen).to(z)
            states, sigmas = self.teacher_trajectory(noise, cond_m, negative_m)
            k = torch.randint(0, cfg_.sample_steps, (m,), generator=gen)
            rows = torch.arange(m)
            x_k, x_next = states[k, rows], states[k + 1, rows]
            sigma_k, sigma_next = sigmas[k].to(z), sigmas[k + 1].to(z)
            target = progressive_distillation_target(x_k, x_next, sigma_k, sigma_next)
            msc = self._error(self.student(x_k, sigma_k, cond_m, negative_m), target, sigma_k)
            # Scaled so that msc_weight weighs the batch means of the two terms.
            out["loss"] = torch.cat([offset[:m] + cfg_.msc_weight * msc * (n / m), offset[m:]])
            out["msc"] = msc.detach()
        return out

    @torch.no_grad()
    def teacher_trajectory(self, noise: torch.Tensor, cond: dict, negative: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's CFG sampling from ``noise``, its states at the student's timesteps and the end:
        (sample_steps + 1, batch, ...) and their sigmas."""
        sigmas = self.rollout_sigmas.to(noise)
        states = []

        def keep(info: dict) -> None:
            if info["i"] % self.stride == 0:
                states.append(info["x"])

        final = get_sampler(self.config.teacher_sampler)(self.teacher(cond, negative), noise * start_noise_scaling(sigmas[0]),
                                                         sigmas, callback=keep)
        return torch.stack(states + [final]), sigmas[:: self.stride]

    @torch.no_grad()
    def sample(self, captions: Sequence[str], seeds: Sequence[int], negative: str = "") -> torch.Tensor:
        """Adapted-model latents at the file's sampler and steps, with one negative prompt for all."""
        neg = self.prompts([negative] * len(captions))
        with self.inputs.negative_prompt(neg["encoder_hidden_states"]):
            return sample_student(self.unet, self.schedule, self.prompts(captions), seeds,
                                  distillation_timesteps(self.config.sample_steps), self.config.sampler, consistency_boundary=False)


def negative_pool(config: SunConfig, captions: Sequence[str]) -> list[str]:
    if config.negative_prompts is None:
        return sorted(set(captions))
    lines = [line.strip() for line in Path(config.negative_prompts).read_text().splitlines()]
    return [line for line in lines if line]


def export_sun_adapter(adapter, schedule: DiscreteSchedule, config: SunConfig, path: str | Path, base: str,
                       provenance: dict) -> AdapterMetadata:
    """The adapter's tensors (our layout, fp16) + metadata as one fewstep adapter file (atomic write)."""
    meta = AdapterMetadata(
        kind="sun_adapter", base=base, prediction=schedule.prediction_type, sampler=config.sampler, steps=config.sample_steps,
        timesteps=distillation_timesteps(config.sample_steps), provenance=provenance,
        guidance={"convention": "cfg", "cfg_scale": config.cfg_scale},
        extra={"variant": config.variant, "layout": "fewstep", "cfg_scale": 1.0},
    )
    write_adapter(path, {k: v.detach().to(torch.float16) for k, v in adapter.to_tensors().items()}, meta)
    return meta



PREVIEW_NEGATIVE_PICK = 7   # which preview caption also serves as a negative prompt in the preview grids


def train_sun(
    teacher: str | Path,                     # diffusers pipeline folder or single-file checkpoint
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,                     # checkpoints, logs, sample grids
    out: str | Path,                         # the exported adapter file
    config: SunConfig = SunConfig(),
    resolution: Optional[int] = None,        # image size for a dataset spec (default: the teacher's native size)
    teacher_config: Optional[str | Path] = None,  # diffusers folder with configs, for single-file teachers
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """Train a SUN adapter for ``teacher`` and export it; None if stopped by ``stop_after``."""
    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    setup = method.setup
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(method.run.seed)
        model = SunTraining(setup.pipe, config, schedule_of(setup.pipe), negative_pool(config, setup.captions))
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    log.info("SUN adapter (%s): %s trainable parameters in %d cross-attention layers", config.variant,
             f"{sum(p.numel() for p in model.adapter.parameters()):,}", len(model.adapter.names))
    preview = setup.preview_captions()
    preview_negative = preview[PREVIEW_NEGATIVE_PICK % len(preview)]

    def sample_fn(m, step):
        for label, negative in (("empty", ""), ("negative", preview_negative)):
            method.preview(lambda captions, seeds: m.sample(captions, seeds, negative), f"step-{step:08d}-{label}")

    def export(m):
        export_sun_adapter(m.adapter, m.schedule, config, method.out, setup.base,
                           method.provenance("sun", config.steps, PROVENANCE_FIELDS))

    return train_and_export(method, "sun", model, export, "SUN", sample_fn=sample_fn, lr_scales=model.lr_scales())
