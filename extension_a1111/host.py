"""A1111 glue: the run's life in the script hooks. Configure it from the accordion's settings, apply it to the
processing object and undo every change when it ends. Forge shares the sampler settings and LoRA handling and applies
the rest through its model patcher (``forge.py``); what is changed where lives in ``a1111_patches``, ``lora_networks``
and ``sampling``.

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

import logging
import os

from ..core.adapter_file import AdapterFileError
from ..core.run_plan import LORA, SUN_LAYERS, UNET_BLEND
from ..core.samplers import SAMPLERS
from . import forge
from .a1111_patches import apply_student, install_sun, ldm_unet
from .adapter_files import adapter_path, load_adapter, lora_folder
from .ldm_unet import student_keys
from .lora_networks import lora_module_count, lora_networks, register_lora
from .run_config import Settings, configure, model_base, sampler_label
from .run_state import RUN_ATTR, ActiveRun, active_run, pending_undo, stop_run
from .sampling import schedule_of

logger = logging.getLogger("fewstep")


def undo_leftovers() -> None:
    """At the start of every request: undo what a run that failed half-way left (A1111 calls no hook on failure)."""
    pending_undo.run()


def undo_when_closed(p) -> None:
    """Run the undo list when A1111 closes the request's processing object: it does so after every run, failed ones
    too (``with closing(p)``), where no script hook is called."""
    close = getattr(p, "close", None)
    if close is None:
        return

    def close_and_undo():
        try:
            pending_undo.run()
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
        pending_undo.run()
        stop_run(p, str(exc))
        p.sampler_name = sampler_label(next(iter(SAMPLERS)))   # its sampler raises the error when sampling starts
        return
    setattr(p, RUN_ATTR, active)
    undo_when_closed(p)
    logger.info("%s", active.run.summary)


def _configure(p, settings: Settings) -> ActiveRun:
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
    if run.lora_alias is not None:
        lora_dir = lora_folder()
        if lora_dir is None or not os.path.realpath(path).startswith(os.path.realpath(lora_dir) + os.sep):
            register_lora(run.lora_alias, path)
    if forge.is_forge(sd_model):
        forge.configure(p, active)
    else:
        configure_a1111(p, active)
    return active


def configure_a1111(p, active: ActiveRun) -> None:
    """What A1111 itself needs beyond the sampler settings: the CFG scale and the negative pass, and the adapter's
    weights checked against the UNet or put on it (so that a mismatch stops the run before sampling). A LoRA goes
    through the host's Lora extension (the prompt tag), a whole UNet onto the weights once the networks are applied."""
    plan = active.run.plan
    p.cfg_scale = plan.cfg_scale
    if active.run.skip_negative_pass:
        active.sampling_options["skip_early_cond"] = 1.0
    if plan.weights == LORA:
        pass
    elif plan.weights == UNET_BLEND:
        active.student_keys = student_keys(ldm_unet(p.sd_model), active.adapter)
    elif plan.weights == SUN_LAYERS:
        install_sun(p.sd_model, active)
    else:
        raise AdapterFileError(f"{active.run.adapter_name}: the A1111 extension cannot apply {plan.weights} weights")


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
    pending_undo.run()
