"""The diffusers host: an adapter file applied to a teacher pipeline and sampled as ``core.run_plan`` says.

What the ComfyUI nodes and the A1111 extension do inside their hosts, done on a diffusers pipeline: used by
``fewstep bench``, ``fewstep eval --adapter``, ``synth``, previews and the quickstart. ``load_student`` switches on
the plan's weights once; each student class is one way of putting them on a copy of the UNet (a LoRA merged, so no
per-step LoRA overhead; a whole UNet blended; an own UNet built; SUN layers attached), and all sample the same way:
sampler, timesteps, boundary condition, CFG and w come from the plan.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.adapter_file import (SNAP_DECODER_PREFIX, W_EMBEDDING_KEY, Adapter, AdapterFileError, describe, read_adapter,
                                 read_header, without_w_embedding)
from ..core.lora import LoraKeyError, merge_lora, read_lora
from ..core.run_plan import LORA, OWN_UNET, SUN_LAYERS, UNET_BLEND, RunPlan, plan_run, unet_blend
from ..core.parameterization import start_noise_scaling
from ..core.samplers import get_sampler
from ..core.schedule import DiscreteSchedule
from .diffusers_sampling import CFGDenoiser, UNetDenoiser, w_condition
from .pipelines import PromptEncoder, base_of
from .images import to_uint8


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


def blend_unet_weights(unet, tensors: dict, strength: float, name: str) -> None:
    """A whole UNet's weights on ``unet`` as the plan's UNET_BLEND says (``core.run_plan.unet_blend``); every key must
    fit."""
    own = unet.state_dict()
    load_unet_weights(unet, {k: unet_blend(own[k], v, strength) if k in own and own[k].shape == v.shape else v
                             for k, v in tensors.items()}, name)


def merge_file_lora(unet, adapter: Adapter, strength: float = 1.0) -> None:
    """An adapter file's LoRA (a guided student's without its w projection) merged into ``unet``."""
    try:
        merge_lora(unet, read_lora(without_w_embedding(adapter.tensors), alpha=adapter.metadata.extra.get("alpha"))[0], strength)
    except LoraKeyError as exc:
        raise AdapterFileError(f"{Path(adapter.path).name}: {exc}") from None


class _Student:
    """What every student shares: the file read and checked against the pipeline, the plan for each call, and
    sampling as the plan says. A subclass builds ``self.unet`` (``build_unet``); ``strength`` is the adapter's weight
    and ``negative_strength`` a SUN adapter's negative branch (1: as trained). In ``latents``/``images`` None means the
    file's own setting; ``negative`` (one prompt for all) reaches the kinds that read a negative prompt without CFG
    (SUN); the others take no negative prompt and refuse one."""

    takes_negative = False   # whether ``latents`` reads a negative prompt

    def __init__(self, pipe, adapter_path: str | Path, strength: float = 1.0, negative_strength: float = 1.0):
        self.pipe = pipe
        self.adapter: Adapter = read_adapter(adapter_path, expected_base=base_of(pipe))
        self.name = Path(adapter_path).name
        self.strength, self.negative_strength = strength, negative_strength
        meta = self.adapter.metadata
        plan = self.plan()
        if student_class(plan, self.name) is not type(self):
            raise AdapterFileError(f"{self.name}: is a {meta.kind} ({plan.weights} weights); {type(self).__name__} does not "
                                   "apply it: use load_student")
        self.schedule = DiscreteSchedule.stable_diffusion(prediction_type=meta.prediction)
        self.prompts = PromptEncoder(pipe)
        self.unet = self.build_unet(plan)

    def build_unet(self, plan: RunPlan):
        raise NotImplementedError

    def plan(self, steps: Optional[int] = None, w: Optional[float] = None, sampler: Optional[str] = None,
             cfg_scale: Optional[float] = None) -> RunPlan:
        """core's plan for one call (its ``notes`` say what the user should know, e.g. a w outside the trained range)."""
        return plan_run(self.adapter.metadata, self.strength, steps or 0, sampler, w, self.negative_strength, cfg_scale)

    def latents(self, captions: Sequence[str], seeds: Sequence[int], steps: Optional[int] = None, w: Optional[float] = None,
                sampler: Optional[str] = None, negative: str = "", cfg_scale: Optional[float] = None) -> torch.Tensor:
        plan = self.plan(steps, w, sampler, cfg_scale)
        uncond = None
        if plan.model_passes_per_step == 2:
            cond, uncond = self.prompts.with_unconditional(captions)
        else:
            cond = self.prompts(captions)
        if plan.w is not None:
            cond.update(w_condition(plan.w, int(self.adapter.metadata.extra["embedding_dim"]), cond["encoder_hidden_states"],
                                    len(captions)))
        with self.negative_prompt(plan, negative):
            return sample_student(self.unet, self.schedule, cond, seeds, plan.timesteps, plan.sampler, plan.consistency_boundary,
                                  uncond=uncond, cfg_scale=plan.cfg_scale if uncond is not None else 1.0)

    def negative_prompt(self, plan: RunPlan, negative: str):
        """The context the model runs in for the negative prompt (nothing: only SUN reads one without CFG)."""
        return contextlib.nullcontext()

    def images(self, captions: Sequence[str], seeds: Sequence[int], steps: Optional[int] = None,
               w: Optional[float] = None, sampler: Optional[str] = None, negative: Optional[str] = None,
               cfg_scale: Optional[float] = None) -> np.ndarray:
        if negative and not self.takes_negative:
            raise ValueError(f"{type(self).__name__} samples without CFG and has no negative-prompt input")
        latents = self.latents(captions, seeds, steps, w, sampler, negative or "", cfg_scale)
        with torch.no_grad():
            return to_uint8(self.decode(latents / self.pipe.vae.config.scaling_factor))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from (unscaled) latents: the pipeline's VAE."""
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype)).sample


class AdaptedTeacher(_Student):
    """A copy of the pipeline's UNet with the file's weights on it: a LoRA merged (LORA: ``flash_lora``, a
    ``gdd_student`` LoRA) or a whole UNet blended in (UNET_BLEND: a ``gdd_student`` of format ``unet``)."""

    def build_unet(self, plan: RunPlan):
        unet = copy.deepcopy(self.pipe.unet)
        self.put_weights(unet, plan)
        return unet

    def put_weights(self, unet, plan: RunPlan) -> None:
        if plan.weights == LORA:
            merge_file_lora(unet, self.adapter, plan.strength)
        else:   # UNET_BLEND (student_class admits nothing else)
            blend_unet_weights(unet, self.adapter.tensors, plan.strength, self.name)


class GuidedStudent(AdaptedTeacher):
    """A ``guided_student`` file: the teacher's UNet architecture plus a w-embedding (diffusers' ``time_cond_proj_dim``,
    fed the plan's w), with the file's LoRA merged or whole UNet blended in; one pass per step."""

    def build_unet(self, plan: RunPlan):
        from diffusers import UNet2DConditionModel

        pipe = self.pipe
        unet = UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=int(self.adapter.metadata.extra["embedding_dim"]))
        load_unet_weights(unet, {**pipe.unet.state_dict(), W_EMBEDDING_KEY: self.adapter.tensors[W_EMBEDDING_KEY]}, self.name)
        self.put_weights(unet, plan)
        return unet.to(pipe.unet.device, pipe.unet.dtype).eval()


class SunStudent(_Student):
    """A ``sun_adapter`` file (ours or the released layout) on a copy of the teacher's UNet, one pass per step with the
    negative prompt in the adapter."""

    takes_negative = True

    def build_unet(self, plan: RunPlan):
        from .sun_attention import attach_sun, sun_adapter_from_tensors

        unet = copy.deepcopy(self.pipe.unet)
        try:
            self.sun = sun_adapter_from_tensors(unet, self.adapter.tensors)
        except ValueError as exc:
            raise AdapterFileError(f"{self.name}: {exc}") from None
        self.inputs = attach_sun(unet, self.sun)
        return unet

    def negative_prompt(self, plan: RunPlan, negative: str):
        features = self.prompts([negative])["encoder_hidden_states"]
        return self.inputs.negative_prompt(features, plan.negative_strength)


class SnapStudent(_Student):
    """A ``snap_student`` file: its own UNet, built from the architecture in its metadata (SnapFusion's slim UNet),
    and its pruned VAE decoder if it has one, sampled with CFG against the empty prompt as it was distilled (at the
    file's CFG scale unless one is given)."""

    def build_unet(self, plan: RunPlan):
        from diffusers import UNet2DConditionModel

        pipe, meta = self.pipe, self.adapter.metadata
        unet = UNet2DConditionModel.from_config(meta.extra["unet_config"])
        load_unet_weights(unet, {k: v for k, v in self.adapter.tensors.items() if not k.startswith(SNAP_DECODER_PREFIX)},
                          self.name)
        self.decoder = None
        if "decoder_config" in meta.extra:   # SnapFusion's pruned VAE decoder
            from .pruned_decoder import PrunedDecoder

            self.decoder = PrunedDecoder(meta.extra["decoder_config"])
            try:
                self.decoder.load_state_dict({k[len(SNAP_DECODER_PREFIX):]: v.float() for k, v in self.adapter.tensors.items()
                                              if k.startswith(SNAP_DECODER_PREFIX)})
            except RuntimeError:
                raise AdapterFileError(f"{self.name}: its VAE decoder weights do not fit the decoder its metadata "
                                       "describes: the file is corrupt") from None
            self.decoder.to(pipe.vae.device, pipe.vae.dtype).eval()
        return unet.to(pipe.unet.device, pipe.unet.dtype).eval()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The file's pruned decoder when it has one, else the pipeline's VAE."""
        if self.decoder is None:
            return super().decode(latents)
        return self.decoder(latents.to(self.pipe.vae.dtype))


def student_class(plan: RunPlan, name: str) -> type[_Student]:
    """Which student carries out ``plan`` on a diffusers pipeline: the one switch on the plan's weights."""
    if plan.weights in (LORA, UNET_BLEND):
        return GuidedStudent if plan.w is not None else AdaptedTeacher
    elif plan.weights == SUN_LAYERS:
        return SunStudent
    elif plan.weights == OWN_UNET:
        return SnapStudent
    else:
        raise AdapterFileError(f"{name}: fewstep cannot apply {plan.weights} weights on a diffusers pipeline yet")


def load_student(pipe, adapter_path: str | Path, strength: float = 1.0, negative_strength: float = 1.0) -> _Student:
    """The student for an adapter file of any kind, as its plan says."""
    name = Path(adapter_path).name
    meta, _, _ = describe(read_header(adapter_path), name, base_of(pipe))   # refuses kinds core does not know
    return student_class(plan_run(meta), name)(pipe, adapter_path, strength, negative_strength)
