"""The teacher with its training data as VAE latents, what every method trains against: a dataset (or a
``fewstep synth`` set) encoded once, batches drawn from it, preview grids decoded by the teacher's VAE."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.schedule import DiscreteSchedule
from .errors import UserError
from .images import save_grid, to_pixels, to_uint8
from .pipelines import base_of, load_teacher
from .synth_sets import SynthError, read_latent_set, synth_settings

log = logging.getLogger("fewstep")


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
    pipe = load_teacher(teacher, config=teacher_config)
    if resolution is not None and (resolution < 1 or resolution % pipe.vae_scale_factor):
        raise UserError(f"resolution {resolution} must be a positive multiple of {pipe.vae_scale_factor}, the teacher's "
                        f"VAE downsampling factor (its native size is {pipe.unet.config.sample_size * pipe.vae_scale_factor})")
    synth = synth_settings(data) if isinstance(data, (str, Path)) else None
    if (synth or {}).get("layout") == "latents":
        return _latent_teacher_data(pipe, data, teacher, resolution)
    if isinstance(data, (str, Path)):
        from .data import load_dataset

        data = load_dataset(str(data), size=resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    mean, std = encode_dataset(pipe.vae, to_pixels(data.images))
    return TeacherData(pipe, base_of(pipe), mean, std, list(data.captions), synth)


def _latent_teacher_data(pipe, path, teacher, resolution: Optional[int]) -> TeacherData:
    """A ``fewstep synth --latents`` set as training data: its latents are exact (no posterior spread)."""
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


@torch.no_grad()
def encode_dataset(vae, pixels: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: the UNet stage draws latents from them without the encoder."""
    means, stds = [], []
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)
