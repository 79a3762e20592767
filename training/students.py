"""Sample a teacher pipeline with an adapter file applied, the way the file's metadata says.

What the ComfyUI nodes and the A1111 extension do inside their hosts, done on a diffusers pipeline: used
by ``fewstep bench``, ``fewstep eval --adapter`` and the quickstart. The LoRA is merged into a copy of the
UNet (no per-step LoRA overhead); sampler, timesteps and boundary condition come from the metadata.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.adapter_file import (SNAP_DECODER_PREFIX, W_EMBEDDING_KEY, Adapter, AdapterFileError, describe, read_adapter,
                                 read_header, without_w_embedding)
from ..core.guidance import cfg_scale_from_imagen_w
from ..core.lora import LoraKeyError, merge_lora, read_lora
from ..core.parameterization import start_noise_scaling
from ..core.samplers import get_sampler
from ..core.schedule import DiscreteSchedule
from .diffusers_sampling import CFGDenoiser, UNetDenoiser, w_condition
from .pipelines import PromptEncoder, base_of
from .teacher import to_uint8


@torch.no_grad()
def sample_student(unet, schedule: DiscreteSchedule, cond: dict, seeds: Sequence[int], timesteps: Sequence[int],
                   sampler: str = "consistency", consistency_boundary: bool = True, uncond: Optional[dict] = None,
                   cfg_scale: float = 1.0) -> torch.Tensor:
    """Latents of a student from unit noise drawn per seed (a sample does not depend on the batch it is in), one pass
    per step, or with CFG against ``uncond`` when ``cfg_scale`` is not 1. The sampler's own noise is seeded with the
    first seed."""
    config = unet.config
    noise = torch.stack([torch.randn(config.in_channels, config.sample_size, config.sample_size,
                                     generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(unet.device)
    sigmas = schedule.sigmas_for_timesteps(timesteps).to(noise.device)
    model = UNetDenoiser(unet, schedule, consistency_boundary=consistency_boundary)
    extra_args = {"seed": int(seeds[0])}
    if cfg_scale == 1.0:
        extra_args.update(cond)
    else:
        model = CFGDenoiser(model, cond, uncond, cfg_scale)
    return get_sampler(sampler)(model, noise * start_noise_scaling(sigmas[0]), sigmas, extra_args=extra_args)


def load_unet_weights(unet, tensors: dict, name: str) -> None:
    """Whole-UNet weights from an adapter file into ``unet``; every key must fit (else: made for another model)."""
    try:
        result = unet.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:   # shapes that differ
        raise AdapterFileError(f"{name}: does not fit this teacher's UNet ({str(exc).splitlines()[-1].strip()[:120]}): "
                               "made for another model") from None
    if result.missing_keys or result.unexpected_keys:
        raise AdapterFileError(f"{name}: does not fit this teacher's UNet (missing {result.missing_keys[:2]}, "
                               f"unexpected {result.unexpected_keys[:2]}): made for another model")


def merge_file_lora(unet, adapter: Adapter, strength: float = 1.0) -> None:
    """An adapter file's LoRA (a guided student's without its w projection) merged into ``unet``."""
    try:
        merge_lora(unet, read_lora(without_w_embedding(adapter.tensors), alpha=adapter.metadata.extra.get("alpha"))[0], strength)
    except LoraKeyError as exc:
        raise AdapterFileError(f"{Path(adapter.path).name}: {exc}") from None


class _Student:
    """What the student kinds share: ``images`` decodes the subclass's ``latents(captions, seeds, steps, w, sampler,
    negative)``; None means the file's own setting. ``negative`` (one prompt for all) reaches the kinds that read a
    negative prompt without CFG (SUN); the others take no negative prompt and refuse one."""

    takes_negative = False   # whether ``latents`` reads a negative prompt

    def images(self, captions: Sequence[str], seeds: Sequence[int], steps: Optional[int] = None,
               w: Optional[float] = None, sampler: Optional[str] = None, negative: Optional[str] = None) -> np.ndarray:
        if negative and not self.takes_negative:
            raise ValueError(f"{type(self).__name__} samples without CFG and has no negative-prompt input")
        latents = self.latents(captions, seeds, steps, w, sampler, **({"negative": negative} if negative is not None else {}))
        with torch.no_grad():
            return to_uint8(self.decode(latents / self.pipe.vae.config.scaling_factor))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from (unscaled) latents: the pipeline's VAE."""
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype)).sample


class AdaptedTeacher(_Student):
    """A copy of the pipeline's UNet with an adapter file's weights, sampled without CFG as its metadata says: a LoRA
    merged (``flash_lora``; a ``gdd_student`` LoRA) or whole UNet weights (a ``gdd_student`` of format ``unet``)."""

    def __init__(self, pipe, adapter_path: str | Path, strength: float = 1.0):
        self.pipe = pipe
        self.adapter: Adapter = read_adapter(adapter_path, expected_base=base_of(pipe), expected_kinds=["flash_lora", "gdd_student"])
        self.unet = copy.deepcopy(pipe.unet)
        if not self.adapter.metadata.lora_weights:
            load_unet_weights(self.unet, self.adapter.tensors, Path(adapter_path).name)
        else:
            merge_file_lora(self.unet, self.adapter, strength)
        self.schedule = DiscreteSchedule.stable_diffusion(prediction_type=self.adapter.metadata.prediction)
        self.prompts = PromptEncoder(pipe)

    def latents(self, captions: Sequence[str], seeds: Sequence[int], steps: Optional[int] = None,
                w: Optional[float] = None, sampler: Optional[str] = None) -> torch.Tensor:
        """``w`` is accepted for a uniform interface; these files have no guidance input."""
        meta = self.adapter.metadata
        return sample_student(self.unet, self.schedule, self.prompts(captions), seeds, meta.timesteps_for(steps or meta.steps),
                              sampler or meta.sampler, meta.consistency_boundary)


class GuidedStudent(_Student):
    """A ``guided_student`` file: the teacher's UNet architecture plus a w-embedding, one pass per step with w as input.
    The file holds the whole UNet, or a LoRA merged into the teacher's."""

    def __init__(self, pipe, adapter_path: str | Path):
        from diffusers import UNet2DConditionModel

        self.pipe = pipe
        self.adapter: Adapter = read_adapter(adapter_path, expected_base=base_of(pipe), expected_kinds=["guided_student"])
        meta = self.adapter.metadata
        self.embedding_dim = int(meta.extra["embedding_dim"])
        self.unet = UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=self.embedding_dim)
        if meta.lora_weights:
            load_unet_weights(self.unet, {**pipe.unet.state_dict(), W_EMBEDDING_KEY: self.adapter.tensors[W_EMBEDDING_KEY]},
                              Path(adapter_path).name)
            merge_file_lora(self.unet, self.adapter)
        else:
            load_unet_weights(self.unet, self.adapter.tensors, Path(adapter_path).name)
        self.unet.to(pipe.unet.device, pipe.unet.dtype).eval()
        self.schedule = DiscreteSchedule.stable_diffusion(prediction_type=meta.prediction)
        self.prompts = PromptEncoder(pipe)

    def latents(self, captions: Sequence[str], seeds: Sequence[int], steps: Optional[int] = None,
                w: Optional[float] = None, sampler: Optional[str] = None) -> torch.Tensor:
        meta = self.adapter.metadata
        cond = self.prompts(captions)
        w = meta.guidance["default_w"] if w is None else w
        cond.update(w_condition(w, self.embedding_dim, cond["encoder_hidden_states"], len(captions)))
        return sample_student(self.unet, self.schedule, cond, seeds, meta.timesteps_for(steps or meta.steps),
                              sampler or meta.sampler, consistency_boundary=False)


class SunStudent(_Student):
    """A ``sun_adapter`` file (ours or the released layout) on a copy of the teacher's UNet, one pass per step with the
    negative prompt in the adapter; ``negative_strength`` scales the negative branch (1: as trained)."""

    takes_negative = True

    def __init__(self, pipe, adapter_path: str | Path, negative_strength: float = 1.0):
        from .sun_attention import attach_sun, sun_adapter_from_tensors

        self.pipe = pipe
        self.adapter: Adapter = read_adapter(adapter_path, expected_base=base_of(pipe), expected_kinds=["sun_adapter"])
        self.unet = copy.deepcopy(pipe.unet)
        try:
            self.sun = sun_adapter_from_tensors(self.unet, self.adapter.tensors)
        except ValueError as exc:
            raise AdapterFileError(f"{Path(adapter_path).name}: {exc}") from None
        self.inputs = attach_sun(self.unet, self.sun)
        self.negative_strength = negative_strength
        self.schedule = DiscreteSchedule.stable_diffusion(prediction_type=self.adapter.metadata.prediction)
        self.prompts = PromptEncoder(pipe)

    def latents(self, captions: Sequence[str], seeds: Sequence[int], steps: Optional[int] = None,
                w: Optional[float] = None, sampler: Optional[str] = None, negative: str = "") -> torch.Tensor:
        """``w`` is accepted for a uniform interface; a SUN adapter bakes in its CFG scale."""
        meta = self.adapter.metadata
        features = self.prompts([negative])["encoder_hidden_states"]
        with self.inputs.negative_prompt(features, self.negative_strength):
            return sample_student(self.unet, self.schedule, self.prompts(captions), seeds, meta.timesteps_for(steps or meta.steps),
                                  sampler or meta.sampler, consistency_boundary=False)


class SnapStudent(_Student):
    """A ``snap_student`` file: its own UNet, built from the architecture in its metadata (SnapFusion's slim UNet),
    and its pruned VAE decoder if it has one,
    sampled with CFG against the empty prompt, as it was distilled: at guidance weight ``w`` (Imagen's: CFG scale 1 + w),
    by default the file's CFG scale."""

    def __init__(self, pipe, adapter_path: str | Path):
        from diffusers import UNet2DConditionModel

        self.pipe = pipe
        self.adapter: Adapter = read_adapter(adapter_path, expected_base=base_of(pipe), expected_kinds=["snap_student"])
        meta = self.adapter.metadata
        self.unet = UNet2DConditionModel.from_config(meta.extra["unet_config"])
        unet = {k: v for k, v in self.adapter.tensors.items() if not k.startswith(SNAP_DECODER_PREFIX)}
        load_unet_weights(self.unet, unet, Path(adapter_path).name)
        self.unet.to(pipe.unet.device, pipe.unet.dtype).eval()
        self.decoder = None
        if "decoder_config" in meta.extra:   # SnapFusion's pruned VAE decoder
            from .methods.snap_decoder import PrunedDecoder

            self.decoder = PrunedDecoder(meta.extra["decoder_config"])
            try:
                self.decoder.load_state_dict({k[len(SNAP_DECODER_PREFIX):]: v.float() for k, v in self.adapter.tensors.items()
                                              if k.startswith(SNAP_DECODER_PREFIX)})
            except RuntimeError:
                raise AdapterFileError(f"{Path(adapter_path).name}: its VAE decoder weights do not fit the decoder its "
                                       "metadata describes: the file is corrupt") from None
            self.decoder.to(pipe.vae.device, pipe.vae.dtype).eval()
        self.schedule = DiscreteSchedule.stable_diffusion(prediction_type=meta.prediction)
        self.prompts = PromptEncoder(pipe)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The file's pruned decoder when it has one, else the pipeline's VAE."""
        if self.decoder is None:
            return super().decode(latents)
        return self.decoder(latents.to(self.pipe.vae.dtype))

    def latents(self, captions: Sequence[str], seeds: Sequence[int], steps: Optional[int] = None,
                w: Optional[float] = None, sampler: Optional[str] = None) -> torch.Tensor:
        meta = self.adapter.metadata
        cond, uncond = self.prompts.with_unconditional(captions)
        return sample_student(self.unet, self.schedule, cond, seeds, meta.timesteps_for(steps or meta.steps), sampler or meta.sampler,
                              consistency_boundary=False, uncond=uncond,
                              cfg_scale=meta.extra.get("cfg_scale", 1.0) if w is None else cfg_scale_from_imagen_w(w))


def load_student(pipe, adapter_path: str | Path) -> _Student:
    """The sampler for an adapter file of any kind fewstep can sample on a diffusers pipeline."""
    name = Path(adapter_path).name
    meta, _, _ = describe(read_header(adapter_path), name, base_of(pipe))
    if meta.kind in ("flash_lora", "gdd_student"):
        return AdaptedTeacher(pipe, adapter_path)
    elif meta.kind == "guided_student":
        return GuidedStudent(pipe, adapter_path)
    elif meta.kind == "sun_adapter":
        return SunStudent(pipe, adapter_path)
    elif meta.kind == "snap_student":
        return SnapStudent(pipe, adapter_path)
    else:
        raise AdapterFileError(f"{name}: fewstep cannot sample {meta.kind} files on a diffusers pipeline yet")
