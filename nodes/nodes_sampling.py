"""fewstep's ComfyUI nodes (V3 schema): load an adapter, pick a sampler and sigmas, or do it all in one KSampler."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.samplers import SAMPLERS
from ..core.schedule import SPACINGS, select_timesteps, timesteps_explicit, timesteps_for_denoise
from . import adapters

CATEGORY = "sampling/fewstep"
MAX_STEPS = 50

_ADAPTER_TOOLTIP = ("A few-step adapter from models/fewstep or models/loras: a fewstep file (Flash LoRA, guided student or "
                    "SUN adapter; it says how to sample), the released SUN adapter, or an LCM, TCD, Hyper-SD or released Flash Diffusion LoRA (settings are inferred "
                    "and shown on the node).")
_STRENGTH_TOOLTIP = "How strongly the adapter is applied; 1.0 is what it was trained for."
_STEPS_TOOLTIP = "Sampling steps; 0 takes the adapter's own step count."
_W_TOOLTIP = ("Guided students only: the guidance weight w the student takes as input (Imagen's convention: like CFG "
              "scale 1 + w, at one pass per step); -1 uses the file's default. Ignored by LoRA adapters.")
_NEGATIVE_STRENGTH_TOOLTIP = ("SUN adapters only: how strongly the negative prompt pushes away (1.0 as trained, 0 ignores it, "
                              "above 1 pushes harder). Ignored by other adapters.")
_DENOISE_TOOLTIP = ("Below 1.0 the latent keeps part of its content (img2img, inpainting, hires refine): the step count "
                    "stays and the steps are squeezed into the lower part of the noise schedule.")


def _model_and_adapter_inputs() -> list:
    """The inputs both adapter nodes start with: model, adapter file, strength."""
    return [io.Model.Input("model", tooltip="The SD1.5, SDXL or PixArt model the adapter was made for."),
            io.Combo.Input("adapter", options=adapters.list_adapters(), tooltip=_ADAPTER_TOOLTIP),
            io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05, tooltip=_STRENGTH_TOOLTIP)]


def _steps_input() -> io.Int.Input:
    return io.Int.Input("steps", default=0, min=0, max=MAX_STEPS, tooltip=_STEPS_TOOLTIP)


def _w_input() -> io.Float.Input:
    return io.Float.Input("w", default=-1.0, min=-1.0, max=30.0, step=0.5, tooltip=_W_TOOLTIP)


class FewStepLoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepLoadAdapter",
            display_name="FewStep Load Adapter",
            category=CATEGORY,
            description="Applies a few-step adapter to a model and outputs the sampler and sigmas it was trained for, "
                        "for SamplerCustom / SamplerCustomAdvanced (use CFG 1.0 there).",
            inputs=[
                *_model_and_adapter_inputs(),
                _steps_input(),
                _w_input(),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: connect CLIP to also apply the adapter's text-encoder weights, if it has any."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the adapter applied."),
                io.Clip.Output(display_name="CLIP", tooltip="CLIP with the adapter's text-encoder weights (only if CLIP was connected)."),
                io.Sampler.Output(display_name="SAMPLER", tooltip="The sampler the adapter was trained for."),
                io.Sigmas.Output(display_name="SIGMAS", tooltip="The adapter's timesteps as sigmas for this model."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter: str, strength: float, steps: int, w: float, clip=None) -> io.NodeOutput:
        prepared, loaded = adapters.prepare(model, clip, adapter, strength, steps, w=_file_default_if_negative(w))
        return io.NodeOutput(prepared.model, prepared.clip, adapters.make_sampler(prepared.sampler_name), prepared.sigmas,
                             ui=ui.PreviewText(prepared.summary(adapter, loaded, prepared.cfg)))


class FewStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepSampler",
            display_name="FewStep Sampler",
            category=CATEGORY,
            description="A few-step sampler for SamplerCustom / SamplerCustomAdvanced.",
            inputs=[
                io.Combo.Input("sampler", options=list(SAMPLERS), default="consistency",
                               tooltip="consistency: LCM/Flash multistep sampling (predict x0, re-noise); dpmpp_2m: "
                                       "DPM-Solver++(2M); ddim: deterministic DDIM; stochastic: DDPM-like ancestral "
                                       "steps; onestep: a single pass to x0."),
                io.Float.Input("gamma", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="consistency only: TCD's stochasticity. 1.0 re-noises fully (LCM, Flash), "
                                       "0.0 is deterministic (DDIM-like); about 0.3 suits TCD LoRAs."),
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="ddim only: fresh noise per step (0 deterministic, 1 as DDPM)."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
        )

    @classmethod
    def execute(cls, sampler: str, gamma: float, eta: float) -> io.NodeOutput:
        return io.NodeOutput(adapters.make_sampler(sampler, gamma=gamma, eta=eta))


class FewStepSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepSigmas",
            display_name="FewStep Sigmas",
            category=CATEGORY,
            description="Sigmas for a few-step schedule at the model's own noise levels.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise schedule the sigmas follow."),
                io.Int.Input("steps", default=4, min=1, max=MAX_STEPS, tooltip="Number of steps (ignored for explicit)."),
                io.Combo.Input("spacing", options=list(SPACINGS) + ["explicit"], default="trailing",
                               tooltip="trailing: evenly spaced from the last timestep (999, 749, 499, 249; Flash, "
                                       "SDXL-Lightning); lcm: LCM's grid (999, 759, 499, 259; LCM/TCD LoRAs); "
                                       "explicit: the list below."),
                io.String.Input("timesteps", default="999, 749, 499, 249",
                                tooltip="explicit only: training timesteps, highest first, separated by commas."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=_DENOISE_TOOLTIP),
            ],
            outputs=[io.Sigmas.Output(display_name="SIGMAS")],
        )

    @classmethod
    def execute(cls, model, steps: int, spacing: str, timesteps: str, denoise: float) -> io.NodeOutput:
        if spacing == "explicit":
            chosen = timesteps_explicit(_parse_timesteps(timesteps))
        else:
            chosen = select_timesteps(spacing, steps)
        return io.NodeOutput(adapters.model_schedule(model).sigmas_for_timesteps(timesteps_for_denoise(chosen, denoise)))


def _negative_strength_input() -> io.Float.Input:
    return io.Float.Input("negative_strength", default=1.0, min=0.0, max=4.0, step=0.05, tooltip=_NEGATIVE_STRENGTH_TOOLTIP)


class FewStepSunGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepSunGuider",
            display_name="FewStep SUN Guider",
            category=CATEGORY,
            description="For a model with a SUN adapter (FewStep Load Adapter): one model pass per step on the positive prompt, "
                        "while the adapter reads the negative prompt, so it still works without CFG. For SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The model from FewStep Load Adapter with a SUN adapter."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="What it should not show (an empty prompt is fine)."),
                _negative_strength_input(),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER")],
        )

    @classmethod
    def execute(cls, model, positive, negative, negative_strength: float) -> io.NodeOutput:
        from .sun import make_sun_guider

        guider = make_sun_guider(model, negative_strength)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)


def _file_default_if_negative(w: float):
    return None if w < 0 else w


def _parse_timesteps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"timesteps must be whole numbers separated by commas, e.g. 999, 749, 499, 249; got {text!r}") from None


class FewStepKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepKSampler",
            display_name="FewStep KSampler",
            category=CATEGORY,
            description="One node for few-step sampling: applies the adapter and samples with the settings in its file. "
                        "Works for txt2img, img2img (denoise) and inpainting latents (noise mask).",
            inputs=[
                *_model_and_adapter_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed of the starting noise and of each re-noising step."),
                _steps_input(),
                _w_input(),
                io.Float.Input("cfg", default=1.0, min=1.0, max=20.0, step=0.1,
                               tooltip="1.0 is one model pass per step, as few-step adapters are trained; above 1 the "
                                       "negative prompt is used too, at twice the cost (some LCM LoRAs like 1.5-2). "
                                       "SUN adapters ignore it: they read the negative prompt in one pass."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="What it should not show; used when cfg is above 1, and always "
                                                          "with a SUN adapter."),
                _negative_strength_input(),
                io.Latent.Input("latent_image", tooltip="An empty latent (txt2img), an encoded image (img2img) or an "
                                                        "inpainting latent with a noise mask."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=_DENOISE_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The sampled latent.")],
        )

    @classmethod
    def execute(cls, model, adapter: str, strength: float, seed: int, steps: int, w: float, cfg: float, positive, negative,
                negative_strength: float, latent_image, denoise: float) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.utils
        import latent_preview

        prepared, loaded = adapters.prepare(model, None, adapter, strength, steps, denoise, w=_file_default_if_negative(w))
        patched = prepared.model
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        callback = latent_preview.prepare_callback(patched, len(prepared.sigmas) - 1)
        sampler, options = adapters.make_sampler(prepared.sampler_name), dict(
            noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        if prepared.negative_in_adapter:
            from .sun import make_sun_guider

            guider = make_sun_guider(patched, negative_strength)
            guider.set_conds(positive, negative)
            options["denoise_mask"] = options.pop("noise_mask")
            result = guider.sample(noise, samples, sampler, prepared.sigmas, **options)
            latent["samples"] = result.to(comfy.model_management.intermediate_device())
        else:
            latent["samples"] = comfy.sample.sample_custom(patched, noise, cfg, sampler, prepared.sigmas, positive, negative,
                                                           samples, **options)
        return io.NodeOutput(latent, ui=ui.PreviewText(prepared.summary(adapter, loaded, cfg)))


NODES = [FewStepLoadAdapter, FewStepKSampler, FewStepSampler, FewStepSigmas, FewStepSunGuider]
