"""A1111 glue: apply an ``A1111Run`` to a processing object and undo every change when the run ends. Forge shares
the sampler settings and LoRA handling here and applies the rest through its model patcher (``forge.py``).

What a run changes in A1111, and how each change is undone:
- the sampler, steps, CFG scale and sigma schedule of ``p`` (the request's own object: nothing to undo);
- the option ``skip_early_cond``, overridden so that A1111 skips the negative pass (it has no CFG = 1 shortcut), only
  while the few-step sampler runs: restored on the way out of it, also when sampling fails, to the user's value or to
  no entry if the user never saved one (else saving the settings would write it to config.json). A1111's own
  ``override_settings`` cannot do this: ``process_images`` restores only the options the user had saved;
- for a SUN adapter, the forward of every cross-attention module it covers (our attention plus the adapter, fed the
  negative prompt's features that ``on_cfg_denoiser`` delivers); the modules get their own forward back;
- for a LoRA outside ``models/Lora``, an entry in the Lora extension's list of networks; removed again;
- for a whole-UNet student (guided, GDD), the UNet's weights (moved towards the student's by the strength, after the Lora extension
  has applied the prompt's networks, so that its own weight backups stay the base model's); for a guided student
  (whole or LoRA) its time MLP (with the w offset); the weights are copied back from a CPU copy and the time MLP put back.
A1111 calls no script hook when a run fails, but it closes every request's processing object (``with closing(p)``
in the UI's and the API's txt2img and img2img), failed or not: the undo list runs there, and again at the start of
the next request (every request passes through this always-on script). Host modules are imported inside functions.
"""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..core.adapter_file import W_EMBEDDING_KEY, Adapter, AdapterFileError, read_adapter
from ..core.guidance import TimeEmbedWithW, w_conditioning_offset
from ..core.lora import KOHYA_TEXT_PREFIXES, KOHYA_UNET_PREFIX, detect_layout
from ..core.parameterization import consistency_boundary_denoised
from ..core.samplers import SAMPLERS, get_sampler
from ..core.schedule import DiscreteSchedule
from ..core.sun import SunAdapter, SunFileError, multi_head_attention, sun_adapter_for_model
from ..core.unet_names import diffusers_attention_name, ldm_unet_keys
from .run_config import A1111Run, Settings, configure, model_base, sampler_label

logger = logging.getLogger("fewstep")

RUN_ATTR = "fewstep_run"   # on the processing object: the ActiveRun, or the RunError that stops the run
FEWSTEP_FOLDER = "fewstep"  # models/fewstep, next to models/Lora


class RunError(RuntimeError):
    """A fewstep setting that cannot be run; raised when sampling starts, so that the UI shows it (A1111 only logs
    errors raised in script hooks and would go on without fewstep)."""


@dataclass
class ActiveRun:
    run: A1111Run
    adapter: Adapter
    negative: Optional[torch.Tensor] = None   # the negative prompt's text features, for SUN
    sun_layers_fired: set = field(default_factory=set)
    sun: Optional[tuple[SunAdapter, dict[str, str]]] = None   # Forge: the adapter's layers, their LDM names
    sun_patches: list = field(default_factory=list)           # Forge: the attn2 patches put on the UNet
    student_keys: dict[str, str] = field(default_factory=dict)   # a guided student's {file key: LDM parameter}
    student_applied: bool = False
    sampling_options: dict[str, Any] = field(default_factory=dict)   # A1111 options overridden while our sampler runs


class Undo:
    """Changes to shared state, undone in reverse order."""

    def __init__(self):
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, undo: Callable[[], None]) -> None:
        self._steps.append((what, undo))

    def run(self) -> None:
        while self._steps:
            what, undo = self._steps.pop()
            try:
                undo()
            except Exception:  # one failed undo must not keep the others from running
                logger.exception("fewstep: could not undo %s", what)


_undo = Undo()


# ---------------------------------------------------------------------------------------------- adapter files


def lora_folder() -> Optional[str]:
    """The Lora extension's folder (models/Lora unless --lora-dir says otherwise); None without the extension."""
    from modules import shared

    return getattr(shared.cmd_opts, "lora_dir", None)


def adapter_folders() -> list[str]:
    """models/fewstep first, then the Lora extension's folder."""
    from modules import paths_internal

    return [os.path.join(paths_internal.models_path, FEWSTEP_FOLDER)] + [f for f in [lora_folder()] if f]


def list_adapters() -> list[str]:
    """Every .safetensors under the adapter folders, as paths relative to its folder (only safetensors: loading never
    unpickles)."""
    names: list[str] = []
    for folder in adapter_folders():
        for root, _, files in os.walk(folder, followlinks=True):
            for file in sorted(files):
                if file.lower().endswith(".safetensors"):
                    name = os.path.relpath(os.path.join(root, file), folder).replace(os.sep, "/")
                    if name not in names:
                        names.append(name)
    return sorted(names, key=str.lower)


def adapter_path(name: str) -> str:
    """The file ``name`` (as ``list_adapters`` gives it) in the first adapter folder that holds it. The name comes from
    the API as well as the dropdown: it must stay inside the folders (no absolute path, no ``..``)."""
    if not name:
        raise AdapterFileError("no adapter selected: put a .safetensors in models/fewstep or models/Lora and press the "
                               "refresh button")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or parts[0] == "" or ".." in parts:
        raise AdapterFileError(f"{name!r}: not an adapter name; expected a file name relative to models/fewstep or "
                               "models/Lora, as the adapter dropdown lists it")
    if not name.lower().endswith(".safetensors"):
        raise AdapterFileError(f"{name!r}: not a .safetensors file; adapters load from safetensors only")
    for folder in adapter_folders():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise AdapterFileError(f"{name}: not found in {' or '.join(adapter_folders())}; press the refresh button")


_last_read: dict[str, Any] = {}


def load_adapter(path: str, base: str) -> Adapter:
    """read_adapter checked against the model's base; the last file stays in memory while it is unchanged."""
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size, base)
    if _last_read.get("key") != key:
        _last_read.clear()
        _last_read.update(key=key, adapter=read_adapter(path, expected_base=base))
    return _last_read["adapter"]


# ---------------------------------------------------------------------------------------------- samplers


def a1111_sampler(name: str):
    """core sampler ``name`` in A1111's k-diffusion calling convention: noise from the request's per-image RNG (so a
    seed gives the same image alone or in a batch), LCM's boundary condition when the run's adapter needs it."""
    sample_fn = get_sampler(name)
    takes_noise = "noise_sampler" in inspect.signature(sample_fn).parameters

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        active = getattr(model.p, RUN_ATTR, None)
        if isinstance(active, RunError):
            raise active
        from modules import sd_samplers_common

        denoiser = model
        if isinstance(active, ActiveRun) and active.run.plan.consistency_boundary:
            schedule = DiscreteSchedule.from_sigmas(model.inner_model.sigmas)

            def denoiser(x_, sigma, **kwargs):
                return consistency_boundary_denoised(model(x_, sigma, **kwargs), x_, sigma, schedule.timestep(sigma))

        options = {}
        if takes_noise:
            rng = sd_samplers_common.TorchHijack(model.p)
            options["noise_sampler"] = lambda sigma, sigma_next: rng.randn_like(x)
        with options_overridden(active.sampling_options if isinstance(active, ActiveRun) else {}):
            return sample_fn(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)

    sample.__name__ = f"sample_fewstep_{name}"
    return sample


def register_samplers() -> None:
    """One A1111 sampler per core sampler ("FewStep consistency", ...); idempotent (scripts are reloaded)."""
    from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion

    for name in SAMPLERS:
        label = sampler_label(name)
        if label in sd_samplers.all_samplers_map:
            continue
        data = sd_samplers_common.SamplerData(
            label, lambda model, name=name: sd_samplers_kdiffusion.KDiffusionSampler(a1111_sampler(name), model),
            [f"fewstep_{name}"], {})
        sd_samplers.all_samplers.append(data)
        sd_samplers.all_samplers_map[label] = data
    sd_samplers.set_samplers()


def schedule_of(sd_model) -> DiscreteSchedule:
    from . import forge

    if forge.is_forge(sd_model):
        return forge.schedule_of(sd_model)
    alphas_cumprod = sd_model.alphas_cumprod.detach().float().cpu()
    return DiscreteSchedule.from_sigmas(((1 - alphas_cumprod) / alphas_cumprod).sqrt())


# ---------------------------------------------------------------------------------------------- options


@contextmanager
def options_overridden(options: dict[str, Any]):
    """A1111 options set to ``options`` inside the block, and back to the user's saved values, or to no entry where
    there was none, when it ends, whatever way it ends (an entry left behind would be saved with the settings as if
    the user had set it)."""
    if not options:
        yield
        return
    from modules import shared

    data = shared.opts.data
    saved = {name: (name in data, data.get(name)) for name in options}
    data.update(options)
    try:
        yield
    finally:
        for name, (had, old) in saved.items():
            if had:
                data[name] = old
            else:
                data.pop(name, None)


# ---------------------------------------------------------------------------------------------- SUN


class SunAttention:
    """Stands in for one cross-attention module's forward during a run: its attention plus the SUN layer."""

    def __init__(self, module: torch.nn.Module, layer, name: str, active: ActiveRun):
        self.module, self.layer, self.name, self.active = module, layer, name, active

    def __call__(self, x, context=None, mask=None, **kwargs):
        m = self.module
        context = x if context is None else context
        q, k, v = m.to_q(x), m.to_k(context), m.to_v(context)

        def attend(q_, k_, v_):
            return multi_head_attention(q_, k_, v_, m.heads)

        h = attend(q, k, v)
        negative = self.active.negative
        if negative is not None:
            plan = self.active.run.plan
            with torch.no_grad():
                h = self.layer.follow(q)(attend, q, h, negative.to(q.device), context, plan.negative_strength, plan.strength)
            self.active.sun_layers_fired.add(self.name)
        return m.to_out(h)


def ldm_unet(sd_model) -> torch.nn.Module:
    return sd_model.model.diffusion_model


def layers_per_block(unet: torch.nn.Module) -> int:
    blocks = unet.num_res_blocks
    return blocks[0] if isinstance(blocks, (list, tuple)) else blocks


def sun_layers(unet: torch.nn.Module, adapter: Adapter) -> tuple[SunAdapter, dict[str, str]]:
    """The adapter's layers checked against the LDM UNet, and {diffusers name: LDM name} of its attention modules."""
    names = {diffusers_attention_name(n, layers_per_block(unet)): n for n, _ in unet.named_modules()
             if n.endswith((".attn1", ".attn2"))}
    key_shapes = {n: unet.get_submodule(n).to_k.weight.shape for n in names.values() if n.endswith("attn2")}
    try:
        return sun_adapter_for_model(adapter.tensors, names, key_shapes), names
    except (SunFileError, ValueError) as exc:
        raise AdapterFileError(f"{os.path.basename(adapter.path)}: {exc}") from None


def install_sun(sd_model, active: ActiveRun) -> int:
    """Put the SUN layers on the model's cross-attention modules until the run ends; returns how many."""
    unet = ldm_unet(sd_model)
    sun, names = sun_layers(unet, active.adapter)
    for name in sun.names:
        module = unet.get_submodule(names[name])
        own = module.__dict__.get("forward")   # another extension's instance-level forward, kept as it was
        module.forward = SunAttention(module, sun.layer(name).requires_grad_(False), names[name], active)

        def restore(module=module, own=own):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own

        _undo.push(f"SUN on {names[name]}", restore)
    return len(sun.names)


def on_cfg_denoiser(params) -> None:
    """A1111 callback before every denoiser call: keep the negative prompt's text features for the SUN layers (A1111
    hands them over even when the negative pass itself is skipped)."""
    active = getattr(getattr(params.denoiser, "p", None), RUN_ATTR, None)
    if isinstance(active, ActiveRun) and active.run.plan.negative_in_adapter:
        uncond = params.text_uncond
        active.negative = uncond["crossattn"] if isinstance(uncond, dict) else uncond


# ---------------------------------------------------------------------------------------------- guided students


def student_keys(unet: torch.nn.Module, adapter: Adapter) -> dict[str, str]:
    """{the student file's UNet key: the LDM UNet's parameter name}; every tensor must fit, and a guided student needs
    its w projection (checked before the run)."""
    name = os.path.basename(adapter.path)
    tensors = {k: v for k, v in adapter.tensors.items() if k != W_EMBEDDING_KEY}
    try:
        keys = ldm_unet_keys(tensors, layers_per_block(unet))
    except ValueError as exc:
        raise AdapterFileError(f"{name}: {exc}") from None
    params = dict(unet.named_parameters())
    unmatched = [k for k, n in keys.items() if n not in params or tuple(params[n].shape) != tuple(tensors[k].shape)]
    if unmatched or (adapter.metadata.kind == "guided_student" and W_EMBEDDING_KEY not in adapter.tensors):
        example = unmatched[0] if unmatched else W_EMBEDDING_KEY
        raise AdapterFileError(f"{name}: {len(unmatched) or 1} UNet tensors do not fit this model (e.g. {example}): the "
                               "student was made for a different model")
    return keys


def apply_student(sd_model, active: ActiveRun) -> None:
    """Once per run, after the prompt's LoRAs (and a LoRA student's own) are applied: a whole-UNet student's weights
    moved to the student's by the strength, a guided student's w offset on its time MLP."""
    if active.student_applied:
        return
    active.student_applied = True
    unet, plan = ldm_unet(sd_model), active.run.plan
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for key, ldm in active.student_keys.items():
            param, saved = params[ldm], params[ldm].detach().to("cpu", copy=True)
            param.lerp_(active.adapter.tensors[key].to(param), plan.strength)
            _undo.push(f"weight {ldm}", lambda param=param, saved=saved: param.data.copy_(saved.to(param)))
    if plan.w is None:
        return
    time_embed = unet.time_embed
    offset = w_conditioning_offset(active.adapter.tensors[W_EMBEDDING_KEY].float(), plan.w)
    unet.time_embed = TimeEmbedWithW(time_embed, offset.to(next(time_embed.parameters()).device))

    def restore():
        unet.time_embed = time_embed

    _undo.push("time MLP", restore)


# ---------------------------------------------------------------------------------------------- LoRA


def lora_networks():
    """The built-in Lora extension's ``networks`` module (it imports it under that name)."""
    import sys

    module = sys.modules.get("networks")
    if module is None or not hasattr(module, "available_network_aliases"):
        raise AdapterFileError("the built-in Lora extension is not loaded: enable it (Extensions tab) to use Flash LoRAs")
    return module


def register_lora(alias: str, path: str) -> None:
    """Make a file outside models/Lora known to the Lora extension under ``alias`` for this run."""
    networks = lora_networks()
    known = networks.available_network_aliases.get(alias)
    if known is not None and os.path.realpath(known.filename) == os.path.realpath(path):
        return
    import network

    entry = network.NetworkOnDisk(alias, path)
    saved = {table: getattr(networks, table).get(alias) for table in ("available_networks", "available_network_aliases")}
    for table in saved:
        getattr(networks, table)[alias] = entry

    def restore():
        for table, old in saved.items():
            if old is None:
                getattr(networks, table).pop(alias, None)
            else:
                getattr(networks, table)[alias] = old

    _undo.push(f"Lora entry {alias}", restore)


def lora_module_count(adapter: Adapter) -> int:
    """How many layers the file's LoRA patches (kohya module names; other layouts are counted the same way)."""
    prefixes = (KOHYA_UNET_PREFIX,) + tuple(KOHYA_TEXT_PREFIXES)
    if detect_layout(adapter.tensors) == "kohya":
        return len({k.split(".", 1)[0] for k in adapter.tensors if k.startswith(prefixes)})
    return len({k.rsplit(".", 2)[0] for k in adapter.tensors if "lora" in k})


# ---------------------------------------------------------------------------------------------- the run


def undo_leftovers() -> None:
    """At the start of every request: undo what a run that failed half-way left (A1111 calls no hook on failure)."""
    _undo.run()


def undo_when_closed(p) -> None:
    """Run the undo list when A1111 closes the request's processing object: it does so after every run, failed ones
    too (``with closing(p)``), where no script hook is called."""
    close = getattr(p, "close", None)
    if close is None:
        return

    def close_and_undo():
        try:
            _undo.run()
        finally:
            close()

    p.close = close_and_undo


def begin(p, args) -> None:
    """Before processing (the model for this request is loaded): configure the run from the accordion's ``args``."""
    try:
        settings = Settings.from_args(args)
        if not settings.enabled:
            return
        active = _configure(p, settings)
    except (AdapterFileError, ValueError, TypeError, OSError) as exc:
        _undo.run()
        stop_run(p, str(exc))
        p.sampler_name = sampler_label(next(iter(SAMPLERS)))   # its sampler raises the error when sampling starts
        return
    setattr(p, RUN_ATTR, active)
    undo_when_closed(p)
    logger.info("%s", active.run.summary)


def stop_run(p, reason: str) -> None:
    """Stop the request with ``reason`` when sampling starts: fewstep's sampler raises it (A1111 only logs errors raised
    in script hooks and would go on without fewstep)."""
    error = RunError(f"fewstep: {reason}")
    logger.error("%s", error)
    setattr(p, RUN_ATTR, error)


def _configure(p, settings: Settings) -> ActiveRun:
    from . import forge

    sd_model = p.sd_model
    path = adapter_path(settings.adapter)
    adapter = load_adapter(path, model_base(getattr(sd_model, "is_sdxl", False), getattr(sd_model, "is_sd1", False)))
    run = configure(settings, adapter)
    active = ActiveRun(run, adapter)
    plan = run.plan
    p.sampler_name, p.scheduler = run.sampler_name, "Automatic"
    if getattr(p, "hr_sampler_name", None) is not None:
        p.hr_sampler_name = None   # the hires pass samples with the same few-step sampler
    p.steps = plan.steps
    schedule = schedule_of(sd_model)   # the hires pass and img2img ask for other step counts: the file's spacing
    p.sampler_noise_scheduler_override = lambda steps: schedule.sigmas_for_timesteps(adapter.metadata.timesteps_for(steps))
    p.extra_generation_params.update(run.infotext)
    if forge.is_forge(sd_model):
        forge.configure(p, active)
    else:
        p.cfg_scale = plan.cfg_scale
        if run.skip_negative_pass:
            active.sampling_options["skip_early_cond"] = 1.0
        if plan.negative_in_adapter:
            install_sun(sd_model, active)
        if run.unet_weights:
            active.student_keys = student_keys(ldm_unet(sd_model), adapter)
    if run.lora_alias is not None:
        lora_dir = lora_folder()
        if lora_dir is None or not os.path.realpath(path).startswith(os.path.realpath(lora_dir) + os.sep):
            register_lora(run.lora_alias, path)
    return active


def active_run(p) -> Optional[ActiveRun]:
    active = getattr(p, RUN_ATTR, None)
    return active if isinstance(active, ActiveRun) else None


def add_lora_tag(p, prompts: list[str]) -> None:
    """Before a batch's extra networks are parsed: the LoRA tag on every prompt of the batch."""
    active = active_run(p)
    if active is not None and active.run.lora_tag is not None:
        for i, prompt in enumerate(prompts):
            prompts[i] = f"{prompt} {active.run.lora_tag}"


def add_lora_to_hires(p) -> None:
    """The hires pass activates the networks of its own prompts, parsed with the first pass's: add ours there."""
    from modules import extra_networks

    active = active_run(p)
    data = getattr(p, "hr_extra_network_data", None)
    if active is None or active.run.lora_alias is None or data is None:
        return
    alias = active.run.lora_alias
    entries = data.setdefault("lora", [])
    if not any(e.items[:1] == [alias] for e in entries):
        entries.append(extra_networks.ExtraNetworkParams(items=[alias, f"{active.run.plan.strength:g}"]))


def after_networks(p) -> None:
    """After a batch's extra networks are activated: our LoRA joins the hires pass's networks; in A1111 a whole-UNet
    student goes onto the weights the networks left; a LoRA file must have found a layer for every module (the
    hosts only log misses; a run with a LoRA that missed stops)."""
    from . import forge

    active = active_run(p)
    if active is None:
        return
    add_lora_to_hires(p)
    if (active.run.unet_weights or active.run.plan.w is not None) and not forge.is_forge(p.sd_model):
        apply_student(p.sd_model, active)
    if active.run.lora_alias is None:
        return
    alias = active.run.lora_alias
    expected = lora_module_count(active.adapter)
    if forge.is_forge(p.sd_model):
        applied = forge.lora_modules_applied(p.sd_model, active.adapter.path)
    else:
        net = next((n for n in lora_networks().loaded_networks if n.name == alias), None)
        applied = 0 if net is None else len(net.modules)
    if applied < expected:
        stop_run(p, f"{os.path.basename(active.adapter.path)}: {expected - applied} of {expected} LoRA modules match no layer "
                    "of this model: it was made for a different model")
    else:
        logger.info("fewstep: LoRA %s: %d of %d modules applied", alias, applied, expected)


def before_every_sampling(p) -> None:
    """Forge, before each sampling pass (first pass, hires pass): the run's patches on the UNet it samples with."""
    from . import forge

    active = active_run(p)
    if active is not None and forge.is_forge(p.sd_model):
        forge.patch_unet(p, active)


def end_batch(p) -> None:
    """After a batch, before its infotext is written: A1111 notes the skipped negative pass as "Skip Early CFG",
    which pasted back would set the option for runs without fewstep."""
    active = active_run(p)
    if active is not None and active.run.skip_negative_pass:
        p.extra_generation_params.pop("Skip Early CFG", None)


def end(p) -> None:
    """After processing: report what ran, undo every change."""
    active = active_run(p)
    if active is not None and active.run.plan.negative_in_adapter:
        fired = active.sun_layers_fired | {patch.key for patch in active.sun_patches if patch.fired}
        logger.info("fewstep: SUN adapter ran on %d cross-attention layers with the negative prompt", len(fired))
    _undo.run()
