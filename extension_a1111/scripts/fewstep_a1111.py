"""fewstep in AUTOMATIC1111's WebUI and Forge: one accordion in txt2img and img2img turns the run into a few-step one.

The WebUI loads this file on its own (not as part of a package), so it first imports the fewstep package from the
tree it lives in. All logic is in the ``extension_a1111`` package (``host`` runs the hooks); this file is UI and hook wiring.
"""

import importlib.util
import logging
import sys
from pathlib import Path

import gradio as gr

from modules import script_callbacks, scripts
from modules.ui_common import create_refresh_button
from modules.ui_components import FormRow, InputAccordion


def _import_fewstep():
    """The fewstep package this extension belongs to: the tree two levels up (extension_a1111/scripts/...), whatever
    that folder is called, unless a fewstep package is already loaded."""
    if "fewstep" not in sys.modules:
        root = Path(__file__).resolve().parents[2]
        spec = importlib.util.spec_from_file_location("fewstep", root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fewstep"] = module
        spec.loader.exec_module(module)
    from fewstep.extension_a1111 import a1111_patches, adapter_files, host, run_config, sampling

    return a1111_patches, adapter_files, host, run_config, sampling


a1111_patches, adapter_files, host, run_config, sampling = _import_fewstep()

_log = logging.getLogger("fewstep")
if not _log.handlers and not logging.getLogger().handlers:   # unless the WebUI logs, fewstep's lines go to its console
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)

sampling.register_samplers()
script_callbacks.on_cfg_denoiser(a1111_patches.on_cfg_denoiser)


def _from_infotext(field):
    """Paste-back reader of one setting: the recorded value (or its default) when fewstep was on, else no change."""
    def read(params):
        settings = run_config.settings_from_infotext(params)
        return None if settings is None else getattr(settings, field)
    return read


class FewStepScript(scripts.Script):
    def title(self):
        return "fewstep"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        defaults = run_config.Settings()
        with InputAccordion(False, label="fewstep", elem_id=f"fewstep_{tab}") as enabled:
            with FormRow(variant="compact"):   # the host's own layout for a dropdown with a refresh button
                adapter = gr.Dropdown(label="Adapter (models/fewstep, models/Lora)", choices=adapter_files.list_adapters(),
                                      value=None, elem_id=f"fewstep_{tab}_adapter")
                create_refresh_button(adapter, lambda: None, lambda: {"choices": adapter_files.list_adapters()},
                                      f"fewstep_{tab}_refresh")
            with gr.Row():
                strength = gr.Slider(0.0, 2.0, value=defaults.strength, step=0.05, label="Strength",
                                     elem_id=f"fewstep_{tab}_strength")
                steps = gr.Slider(0, 16, value=defaults.steps, step=1, label="Steps (0: the file's)",
                                  elem_id=f"fewstep_{tab}_steps")
                sampler = gr.Dropdown(label="Sampler", choices=run_config.SAMPLER_CHOICES, value=defaults.sampler,
                                      elem_id=f"fewstep_{tab}_sampler")
            with gr.Row():
                negative_strength = gr.Slider(0.0, 3.0, value=defaults.negative_strength, step=0.05,
                                              label="Negative strength (SUN adapters)", elem_id=f"fewstep_{tab}_negative")
                w = gr.Slider(-1.0, 15.0, value=defaults.w, step=0.5, label="Guidance w (guided students; -1: the file's)",
                              elem_id=f"fewstep_{tab}_w")
        components = [enabled, adapter, strength, steps, negative_strength, w, sampler]
        self.infotext_fields = [(component, _from_infotext(name))
                                for component, name in zip(components, run_config.Settings.__dataclass_fields__)]
        self.infotext_fields[0] = (enabled, lambda params: run_config.INFOTEXT_ADAPTER in params)
        return components

    def before_process(self, p, *args):
        host.undo_leftovers()

    def process(self, p, *args):
        host.begin(p, args)

    def before_process_batch(self, p, *args, prompts=None, **kwargs):
        host.add_lora_tag(p, prompts)

    def process_batch(self, p, *args, **kwargs):
        host.after_networks(p)

    def process_before_every_sampling(self, p, *args, **kwargs):   # Forge only
        host.before_every_sampling(p)

    def postprocess_batch(self, p, *args, **kwargs):
        host.end_batch(p)

    def postprocess(self, p, processed, *args):
        host.end(p)
