"""ComfyUI glue: put a fewstep adapter on a MODEL (and CLIP) and build the SAMPLER and SIGMAS its file asks for.

No diffusion math lives here (DESIGN.md): the boundary condition, timesteps, sigmas and samplers are core's.
This module only translates between ComfyUI's objects (ModelPatcher, KSAMPLER, model_sampling) and core.
Host modules are imported inside functions, so the pure parts can be tested without ComfyUI.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..core.adapter_file import Adapter, AdapterFileError, read_adapter_cached, without_w_embedding
from ..core.guidance import TimeEmbedWithW, cfg_scale_from_imagen_w
from ..core.lora import KOHYA_TEXT_PREFIXES, KOHYA_UNET_PREFIX, convert_lora, detect_layout
from ..core.parameterization import consistency_boundary_denoised
from ..core.run_plan import LORA, OWN_UNET, SUN_LAYERS, UNET_BLEND, RunPlan, check_kind, kinds_applied, plan_run
from ..core.samplers import get_sampler
from ..core.schedule import NUM_TRAIN_TIMESTEPS, DiscreteSchedule, timesteps_for_denoise
from ..core.unet_names import comfy_unet_config
from ..model_patcher.unet_blend import add_unet_blend

logger = logging.getLogger("fewstep")

ADAPTER_FOLDERS = ("fewstep", "loras")  # ComfyUI model folders the adapter menus list, fewstep's own first
WRAPPER_KEY = "fewstep"                 # one package-wide key for every patch fewstep puts on a model
SUPPORTED_KINDS = kinds_applied((LORA, UNET_BLEND, OWN_UNET, SUN_LAYERS))   # every form of weights core plans
# ComfyUI model-config classes (matched anywhere in the MRO, so SSD-1B, Vega, pix2pix variants count) -> base.
_BASE_OF_CONFIG = {"SD15": "sd15", "SDXL": "sdxl", "PixArtAlpha": "pixart"}


def register_model_folder() -> None:
    """models/fewstep, next to models/loras (extra_model_paths.yaml may add more under the key ``fewstep``)."""
    import folder_paths

    folder_paths.add_model_folder_path("fewstep", os.path.join(folder_paths.models_dir, "fewstep"), is_default=True)


def list_adapters() -> list[str]:
    """Every .safetensors in the adapter folders: only safetensors, since loading never unpickles."""
    import folder_paths

    names: list[str] = []
    for folder in ADAPTER_FOLDERS:
        names += [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(".safetensors") and n not in names]
    return names


def adapter_path(name: str) -> str:
    """The file ``name`` in the adapter folders. ComfyUI does not check combo values server-side: on a fresh install
    (no adapter files, an empty menu) the node gets None, and an API caller may send any name."""
    import folder_paths

    if not name:
        raise AdapterFileError("no adapter selected: put a .safetensors in models/fewstep or models/loras, then refresh "
                               "the node list (press R)")
    if not isinstance(name, str):
        raise AdapterFileError(f"adapter must be a file name from models/fewstep or models/loras; got {name!r}")
    for folder in ADAPTER_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise AdapterFileError(f"{name}: not found in models/{' or models/'.join(ADAPTER_FOLDERS)}; refresh the node list")


def model_base(model) -> str:
    """fewstep's base name of a ComfyUI MODEL, from its model-config class."""
    config = model.model.model_config
    for cls in type(config).__mro__:
        if cls.__name__ in _BASE_OF_CONFIG:
            return _BASE_OF_CONFIG[cls.__name__]
    raise AdapterFileError(f"fewstep adapters are made for SD1.5, SDXL or PixArt models; this MODEL is {type(config).__name__}")


def load_adapter(path: str, base: str) -> Adapter:
    """The adapter file, checked against the model's base and read once while it is unchanged."""
    adapter = read_adapter_cached(path, base)
    check_kind(os.path.basename(path), adapter.metadata.kind, SUPPORTED_KINDS, "these nodes load")
    return adapter


def kohya_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The LoRA in the kohya layout ComfyUI's loader maps (it ignores PEFT/diffusers keys with a log line); a guided
    LoRA's w projection is not part of it."""
    tensors = without_w_embedding(adapter.tensors)
    if detect_layout(tensors) == "kohya":
        return tensors
    return convert_lora(tensors, "kohya", alpha=adapter.metadata.extra.get("alpha"))


def lora_module_names(keys) -> set[str]:
    """kohya module names (``lora_unet_…``, ``lora_te_…``) of kohya state-dict keys."""
    return {key.split(".", 1)[0] for key in keys}


def unmatched_unet_modules(state_dict: dict[str, torch.Tensor], key_map: dict[str, Any]) -> list[str]:
    """UNet LoRA modules the model has no layer for: ComfyUI would only log them, we refuse the file."""
    return sorted(n for n in lora_module_names(state_dict) if n.startswith(KOHYA_UNET_PREFIX) and n not in key_map)


def add_lora(model, clip, adapter: Adapter, strength: float, notes: list[str]):
    """(model, clip) clones with the LoRA's patches at ``strength``; every UNet module must find its layer."""
    import comfy.lora

    state_dict = kohya_state_dict(adapter)
    if clip is None:
        text = [k for k in state_dict if k.startswith(KOHYA_TEXT_PREFIXES)]
        if text:
            notes.append(f"text-encoder LoRA weights ({len(lora_module_names(text))} modules) left out: connect CLIP to apply them")
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(KOHYA_TEXT_PREFIXES)}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    unmatched = unmatched_unet_modules(state_dict, key_map)
    if unmatched:
        total = sum(n.startswith(KOHYA_UNET_PREFIX) for n in lora_module_names(state_dict))
        raise AdapterFileError(f"{os.path.basename(adapter.path)}: {len(unmatched)} of {total} UNet LoRA modules match no "
                               f"layer of this model (e.g. {unmatched[0]}): it was made for a different model")
    patches = comfy.lora.load_lora(state_dict, key_map)
    model = model.clone()
    model.add_patches(patches, strength)
    if clip is not None:
        clip = clip.clone()
        clip.add_patches(patches, strength)
    return model, clip


def add_unet_weights(model, adapter: Adapter, strength: float):
    """A clone carrying a student's whole UNet (guided, GDD) at ``strength`` (0: the loaded model, 1: the student), as
    ``model_patcher.unet_blend`` puts it on; every tensor must fit."""
    import comfy.utils

    name = os.path.basename(adapter.path)
    ldm_of = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)   # diffusers name -> LDM name
    base = model.model.state_dict()   # names, shapes and dtypes only
    weights, unmatched = {}, []
    for key, value in without_w_embedding(adapter.tensors).items():
        target = "diffusion_model." + ldm_of.get(key, "")
        if key not in ldm_of or target not in base or base[target].shape != value.shape:
            unmatched.append(key)
            continue
        weights[target] = value.to(base[target].dtype)
    if unmatched:
        raise AdapterFileError(f"{name}: {len(unmatched)} UNet tensors do not fit this model (e.g. {unmatched[0]}): "
                               "the student was made for a different model")
    model = model.clone()
    add_unet_blend(model, weights, strength)
    return model


def add_w_offset(model, adapter: Adapter, plan: RunPlan):
    """A clone whose time MLP adds a guided student's w offset (the plan's w) to its input."""
    model = model.clone()
    time_embed = model.get_model_object("diffusion_model.time_embed")
    model.add_object_patch("diffusion_model.time_embed", TimeEmbedWithW(time_embed, plan.w_offset(adapter.tensors)))
    return model


_last_built: dict[str, Any] = {}


def build_snap_model(model, adapter: Adapter):
    """A new MODEL with a snap_student's own (slim) UNet, built from the architecture in its file the way ComfyUI builds
    the pruned UNets it knows: the base model's config class (latent format, conditioning) with the slim layer counts
    and depths. Every tensor must find its layer and every layer a tensor. The last one built is kept while the file
    and the base model are unchanged."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.utils

    key = (adapter.path, id(model.model), id(adapter))
    if _last_built.get("key") == key:
        return _last_built["model"]
    name = os.path.basename(adapter.path)
    base_config = model.model.model_config
    config = type(base_config)(comfy_unet_config(base_config.unet_config, adapter.metadata.extra["unet_config"]))
    config.set_inference_dtype(base_config.unet_config.get("dtype"), base_config.manual_cast_dtype)
    ldm_of = comfy.utils.unet_to_diffusers(config.unet_config)
    unknown = [k for k in adapter.tensors if k not in ldm_of]
    student = config.get_model({}, "")
    if adapter.metadata.prediction == "v_prediction":
        student.model_type = comfy.model_base.ModelType.V_PREDICTION
        student.model_sampling = comfy.model_base.model_sampling(config, student.model_type)
    state = config.process_unet_state_dict({ldm_of[k]: v for k, v in adapter.tensors.items() if k in ldm_of})
    result = student.diffusion_model.load_state_dict(state, strict=False)
    if unknown or result.missing_keys or result.unexpected_keys:
        raise AdapterFileError(f"{name}: its weights do not fit the UNet its metadata describes (unplaced "
                               f"{(unknown + result.unexpected_keys)[:2]}, missing {result.missing_keys[:2]}): the file is corrupt")
    patcher = comfy.model_patcher.ModelPatcher(student, load_device=model.load_device, offload_device=model.offload_device)
    _last_built.clear()
    _last_built.update(key=key, model=patcher)
    return patcher


def consistency_boundary_wrapper(executor, x, sigma, *args, **kwargs):
    """APPLY_MODEL wrapper: the model's x0 through LCM's boundary condition, as consistency students were trained."""
    denoised = executor(x, sigma, *args, **kwargs)
    timestep = executor.class_obj.model_sampling.timestep(sigma)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("fewstep: denoising at timestep %s", [int(t) for t in timestep.reshape(-1).unique().tolist()])
    return consistency_boundary_denoised(denoised, x, sigma, timestep)


def add_consistency_boundary(model):
    """A clone whose denoised output goes through the boundary condition (replacing any earlier fewstep one)."""
    from comfy.patcher_extension import WrappersMP

    model = model.clone()
    model.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, consistency_boundary_wrapper)
    return model


def make_sampler(name: str, **options):
    """ComfyUI SAMPLER over core's sampler ``name``, given the options that sampler takes (others are dropped)."""
    import comfy.samplers

    fn = get_sampler(name)
    accepted = inspect.signature(fn).parameters
    return comfy.samplers.KSAMPLER(fn, extra_options={k: v for k, v in options.items() if k in accepted})


def model_schedule(model) -> DiscreteSchedule:
    """core's schedule over the MODEL's own sigmas, one per training timestep (so patched or zero-SNR schedules are
    honoured). A table of another length does not index by timestep: ``ModelSamplingDiscrete``'s lcm mode keeps LCM's
    50 original timesteps (19, 39, ..., 999); its own ``sigma(t)`` then says what each training timestep is."""
    model_sampling = model.get_model_object("model_sampling")
    sigmas = model_sampling.sigmas
    if sigmas.shape[0] != NUM_TRAIN_TIMESTEPS:
        sigmas = model_sampling.sigma(torch.arange(NUM_TRAIN_TIMESTEPS, device=sigmas.device))
    return DiscreteSchedule.from_sigmas(sigmas)


@dataclass
class Prepared:
    """What the loader and the one-node sampler hand on: the patched model and how to sample with it."""

    model: Any
    clip: Any
    sampler_name: str
    timesteps: list[int]
    sigmas: torch.Tensor
    cfg: float  # the CFG scale the adapter was trained for (1: no CFG)
    w: Optional[float] = None  # a guided student's guidance weight
    notes: list[str] = field(default_factory=list)
    sun_patches: list = field(default_factory=list)  # a SUN adapter's attn2 patches: the negative prompt goes through them

    @property
    def negative_in_adapter(self) -> bool:
        return bool(self.sun_patches)

    def summary(self, name: str, adapter: Adapter, cfg: float) -> str:
        meta = adapter.metadata
        source = "inferred from its keys" if adapter.inferred else "from its metadata"
        passes = "one model pass per step" if cfg == 1 or self.negative_in_adapter else "two model passes per step"
        lines = [f"{name}: {meta.kind} for {meta.base} ({source})",
                 f"sampler {self.sampler_name}, {len(self.timesteps)} steps at timesteps "
                 f"{', '.join(map(str, self.timesteps))}, " + ("no CFG" if self.negative_in_adapter else f"CFG {cfg:g}") + f" ({passes})"]
        if self.w is not None:
            lines.append(f"guidance w = {self.w:g} as the student's input (like CFG {cfg_scale_from_imagen_w(self.w):g}; "
                         f"trained for w in [{meta.guidance['w_min']:g}, {meta.guidance['w_max']:g}])")
        if meta.kind == "snap_student":
            trained = float(meta.extra.get("cfg_scale", 1.0))
            lines.append(f"SnapFusion student: its own UNet from the file, distilled to sample with CFG {trained:g}"
                         + (f" (cfg is {cfg:g} here)" if cfg != trained else ""))
        if self.negative_in_adapter:
            baked = (meta.guidance or {}).get("cfg_scale")
            lines.append(f"SUN adapter on {len(self.sun_patches)} cross-attention layers: the negative prompt goes through it"
                         + (f" (reproduces CFG {baked:g})" if baked else "")
                         + "; sample with FewStep KSampler or FewStep SUN Guider")
        return "\n".join(lines + adapter.notes + self.notes)


def prepare(model, clip, name: str, strength: float, steps: int = 0, denoise: float = 1.0,
            w: Optional[float] = None) -> tuple[Prepared, Adapter]:
    """Everything a node needs from an adapter file: patched MODEL/CLIP, SAMPLER name, timesteps and SIGMAS.
    ``w`` is a guided student's guidance weight (None: the file's default)."""
    from .sun import add_sun

    adapter = load_adapter(adapter_path(name), model_base(model))
    plan = plan_run(adapter.metadata, strength, steps, w=w)
    notes, sun_patches = list(plan.notes), []
    if plan.weights == LORA:
        model, clip = add_lora(model, clip, adapter, strength, notes)
    elif plan.weights == UNET_BLEND:
        model = add_unet_weights(model, adapter, strength)
    elif plan.weights == OWN_UNET:
        model = build_snap_model(model, adapter)
        if strength != 1.0:
            notes.append("strength is ignored for snap_student files: the student is its own, smaller UNet")
    elif plan.weights == SUN_LAYERS:
        model, sun_patches = add_sun(model, adapter, strength)
    else:
        raise AdapterFileError(f"{name}: these nodes cannot apply {plan.weights} weights: update fewstep")
    if plan.w is not None:
        model = add_w_offset(model, adapter, plan)
    if plan.consistency_boundary:
        model = add_consistency_boundary(model)
    timesteps = timesteps_for_denoise(list(plan.timesteps), denoise)
    sigmas = model_schedule(model).sigmas_for_timesteps(timesteps)
    return Prepared(model, clip, plan.sampler, timesteps, sigmas, plan.cfg_scale, plan.w, notes, sun_patches), adapter
