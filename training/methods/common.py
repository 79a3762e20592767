"""What every distillation method shares: options (preset < JSON file < flags), the teacher with its training
data as latents, and preview grids. Each method keeps only its own objective, student and export."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import torch

from ...core.lora import read_lora, write_lora
from ...core.schedule import DiscreteSchedule
from ..errors import UserError

log = logging.getLogger("fewstep")
Config = TypeVar("Config")


def replace_options(config: Config, label: str, **changes) -> Config:
    """A copy of a method's config dataclass with some options changed; JSON lists become tuples. Unknown names
    raise a ValueError with a "did you mean" and the valid names."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - names)
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, 1)) else u for u in unknown]
        raise ValueError(f"unknown {label} option(s) {', '.join(hints)}; valid options: {', '.join(sorted(names))}")
    return dataclasses.replace(config, **{k: _as_tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


def _as_tuple(value):
    return tuple(_as_tuple(v) if isinstance(v, list) else v for v in value)


def load_options(presets: dict[str, Config], label: str, preset: str, config_file: Optional[str | Path] = None,
                 **overrides) -> Config:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored); validated."""
    if preset not in presets:
        raise ValueError(f"unknown {label} preset {preset!r}; expected one of {', '.join(presets)}")
    config = presets[preset]
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        try:
            options = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise ValueError(f"config file {path} must hold a JSON object of {label} options ({{\"name\": value, ...}}); "
                             f"found a JSON {type(options).__name__}")
        config = replace_options(config, label, **options)
    config = replace_options(config, label, **{k: v for k, v in overrides.items() if v is not None})
    nonfinite = [f.name for f in dataclasses.fields(config) if _has_nonfinite(getattr(config, f.name))]
    if nonfinite:
        raise ValueError(f"{label} option(s) {', '.join(nonfinite)} must be finite numbers (not NaN or infinity)")
    config.validate()
    return config


def _has_nonfinite(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_has_nonfinite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


@dataclass
class TeacherData:
    """A loaded teacher pipeline and its training set as VAE latent distributions (encoded once)."""

    pipe: object
    base: str
    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]
    synth: Optional[dict] = None   # the settings of a `fewstep synth` set (None: real data)

    @property
    def scaling(self) -> float:
        return self.pipe.vae.config.scaling_factor

    def batch_fn(self, batch_size: int) -> Callable[[torch.Generator], dict]:
        """Batches of {"latents", "captions"}: a fresh posterior sample of random training images per step."""
        def batch(gen: torch.Generator) -> dict:
            idx = torch.randint(len(self.mean), (batch_size,), generator=gen)
            z = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)) * self.scaling
            return {"latents": z, "captions": [self.captions[i] for i in idx]}
        return batch

    def preview_captions(self, count: int = 20) -> list[str]:
        return sorted(set(self.captions))[:count]

    def save_grid(self, latents: torch.Tensor, path: Path) -> None:
        """Decode and write one row of previews (main process only under ``accelerate launch``)."""
        from accelerate import PartialState

        from ..teacher import save_grid, to_uint8

        if not PartialState().is_main_process:
            return
        vae = self.pipe.vae.to(latents.device)
        with torch.no_grad():
            images = to_uint8(vae.decode(latents.to(vae.dtype) / self.scaling).sample)
        save_grid(images, path, columns=len(latents))


def load_teacher_data(teacher: str | Path, data, resolution: Optional[int] = None,
                      teacher_config: Optional[str | Path] = None) -> TeacherData:
    """The teacher (diffusers folder or single file) and a dataset (object or spec) encoded by its VAE; a latents
    set from ``fewstep synth`` is taken as it is (no VAE round trip)."""
    from ..pipelines import base_of, load_teacher
    from ..synth import synth_settings
    from ..teacher import encode_dataset, to_pixels

    pipe = load_teacher(teacher, config=teacher_config)
    if resolution is not None and (resolution < 1 or resolution % pipe.vae_scale_factor):
        raise UserError(f"resolution {resolution} must be a positive multiple of {pipe.vae_scale_factor}, the teacher's "
                        f"VAE downsampling factor (its native size is {pipe.unet.config.sample_size * pipe.vae_scale_factor})")
    synth = synth_settings(data) if isinstance(data, (str, Path)) else None
    if (synth or {}).get("layout") == "latents":
        return _latent_teacher_data(pipe, data, teacher, resolution)
    if isinstance(data, (str, Path)):
        from ..data import load_dataset

        data = load_dataset(str(data), size=resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    mean, std = encode_dataset(pipe.vae, to_pixels(data.images))
    return TeacherData(pipe, base_of(pipe), mean, std, list(data.captions), synth)


def _latent_teacher_data(pipe, path, teacher, resolution: Optional[int]) -> TeacherData:
    """A ``fewstep synth --latents`` set as training data: its latents are exact (no posterior spread)."""
    from ..pipelines import base_of
    from ..synth import SynthError, read_latent_set

    synth = read_latent_set(path)
    base, unet = base_of(pipe), pipe.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    size = unet.sample_size * pipe.vae_scale_factor
    if synth.settings.base != base or tuple(synth.latents.shape[1:]) != shape or resolution not in (None, size):
        raise SynthError(f"{path}: latents of a {synth.settings.base} teacher, shaped {tuple(synth.latents.shape[1:])}; this "
                         f"run needs {base} latents shaped {shape} ({size} px): synthesize the set with this teacher")
    if Path(synth.settings.teacher).resolve() != Path(teacher).resolve():
        log.warning("%s was synthesized by %s, not by the teacher of this run (%s)", path, synth.settings.teacher, teacher)
    mean = synth.latents.float() / pipe.vae.config.scaling_factor
    return TeacherData(pipe, base, mean, torch.zeros_like(mean), synth.captions, {**dataclasses.asdict(synth.settings), "path": str(path)})


def teacher_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen teacher's dtype for a run's mixed precision (it takes no gradient, so it may be half)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def schedule_of(pipe) -> DiscreteSchedule:
    """SD's training schedule with the pipeline's prediction type (its scheduler config says epsilon or v)."""
    return DiscreteSchedule.stable_diffusion(prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"))


def provenance(method: str, teacher: str | Path, train_steps: int, data: TeacherData, config, fields: Sequence[str]) -> dict:
    """How an adapter was made, for its metadata: ``images`` in the dataset (and the settings it was synthesized with,
    for a ``fewstep synth`` set), ``batch_size`` per step."""
    from ... import __version__

    options = dataclasses.asdict(config)
    made = {"method": method, "teacher": str(teacher), "train_steps": train_steps, "images": len(data.captions),
            "batch_size": config.batch_size, "fewstep_version": __version__, "config": {k: options[k] for k in fields}}
    if data.synth is not None:
        made["synthesized"] = data.synth
    return made


@dataclass(frozen=True)
class RunOptions:
    """How a training run runs, whatever it learns: the training loop's mechanics. Every ``train_*`` takes them as
    keywords (``**run_options``) and the CLI's run flags set them."""

    mixed_precision: str = "no"
    checkpoint_every: int = 250
    sample_every: int = 250
    log_every: int = 25
    seed: int = 0
    resume: bool = True
    progress: bool = True
    stop_after: Optional[int] = None   # stop, as if killed, after this many steps (resume later)

    def stops_before(self, total_steps: int) -> bool:
        """Whether ``stop_after`` ends the run before ``total_steps``: then nothing is exported."""
        return self.stop_after is not None and self.stop_after < total_steps


def fit(model: torch.nn.Module, run_dir: Path, batch_fn, config, desc: str, run: RunOptions, total_steps: Optional[int] = None,
        sample_fn=None, lr_scales: Optional[dict[str, float]] = None) -> torch.nn.Module:
    """The shared loop on ``model(batch, gen)`` with a method config's optimiser options (steps, lr, warmup_steps,
    grad_clip, ema_decay) and the run's mechanics."""
    from ..loop import training_loop

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
