"""The shipped workflows (workflows/*.json), described compactly; ``python -m tests.workflow_specs OBJECT_INFO OUT_DIR``
writes them in ComfyUI's UI format, OBJECT_INFO being ``/object_info`` saved from a ComfyUI with fewstep's nodes.

The files, not this module, are what users and the tests load; this is how they were made (and are remade when a
node's inputs change).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .comfy_workflow import WorkflowBuilder

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
FLASH = "flash_sd15.safetensors"       # models/loras: a Flash LoRA (jasperai/flash-sd, or `fewstep train flash`)
SUN = "sun_sd15.safetensors"           # models/fewstep: a SUN adapter (`fewstep train sun`, or the released one)
PROMPT = "a photo of a red fox in the snow, soft light"
NEGATIVE = "blurry, lowres, watermark"
REFERENCE = "example.png"              # input/: the image to inpaint, upscale or swap a face into
FACE = "face.png"                      # input/: the face to put in
UPSCALE_MODEL = "RealESRGAN_x4plus.pth"  # models/upscale_models: an ESRGAN-type upscaler


def _model(wf: WorkflowBuilder, positive: str = PROMPT, negative: str = NEGATIVE):
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    pos = wf.add("CLIPTextEncode", "Positive", text=positive, clip=(ckpt, 1))
    neg = wf.add("CLIPTextEncode", "Negative", text=negative, clip=(ckpt, 1))
    return ckpt, pos, neg


def _ksampler(wf, ckpt, pos, neg, latent, denoise=1.0, seed=42, adapter=FLASH, title=None):
    return wf.add("FewStepKSampler", title, model=(ckpt, 0), adapter=adapter, strength=1.0, seed=seed, steps=0, w=-1.0,
                  cfg=1.0, positive=(pos, 0), negative=(neg, 0), negative_strength=1.0, latent_image=(latent, 0),
                  denoise=denoise)


def _save(wf, ckpt, samples, prefix, tiled=False):
    if tiled:
        image = wf.add("VAEDecodeTiled", samples=(samples, 0), vae=(ckpt, 2), tile_size=512, overlap=64,
                       temporal_size=64, temporal_overlap=8)
    else:
        image = wf.add("VAEDecode", samples=(samples, 0), vae=(ckpt, 2))
    return image, wf.add("SaveImage", images=(image, 0), filename_prefix=prefix)


def _masked_pass(wf, ckpt, pos, neg, pixels, mask, keep, denoise, prefix, title=None, keep_title=None):
    """A few-step img2img pass of ``pixels`` where ``mask`` is 1, composited onto ``keep`` (the pixels outside)."""
    encoded = wf.add("VAEEncode", pixels=pixels, vae=(ckpt, 2))
    masked = wf.add("SetLatentNoiseMask", samples=(encoded, 0), mask=mask)
    samples = _ksampler(wf, ckpt, pos, neg, masked, denoise=denoise, title=title)
    decoded = wf.add("VAEDecode", samples=(samples, 0), vae=(ckpt, 2))
    result = wf.add("ImageCompositeMasked", keep_title, destination=keep, source=(decoded, 0), x=0, y=0,
                    resize_source=False, mask=mask)
    wf.add("SaveImage", images=(result, 0), filename_prefix=prefix)


def _sample_custom(wf, ckpt, guider, sampler, sigmas, prefix):
    """SamplerCustomAdvanced on an empty 512-pixel latent with seeded noise, decoded and saved."""
    noise = wf.add("RandomNoise", noise_seed=42)
    latent = wf.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    samples = wf.add("SamplerCustomAdvanced", noise=(noise, 0), guider=(guider, 0), sampler=sampler, sigmas=sigmas,
                     latent_image=(latent, 0))
    _save(wf, ckpt, samples, prefix)


def txt2img(wf: WorkflowBuilder) -> None:
    ckpt, pos, neg = _model(wf)
    latent = wf.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _save(wf, ckpt, _ksampler(wf, ckpt, pos, neg, latent), "fewstep/txt2img")


def txt2img_custom_sampler(wf: WorkflowBuilder) -> None:
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    adapter = wf.add("FewStepLoadAdapter", model=(ckpt, 0), clip=(ckpt, 1), adapter=FLASH, strength=1.0, steps=0, w=-1.0)
    pos = wf.add("CLIPTextEncode", "Positive", text=PROMPT, clip=(adapter, 1))
    guider = wf.add("BasicGuider", model=(adapter, 0), conditioning=(pos, 0))
    sampler = wf.add("FewStepSampler", sampler="consistency", gamma=1.0, eta=0.0)
    sigmas = wf.add("FewStepSigmas", model=(adapter, 0), steps=4, spacing="lcm", timesteps="999, 759, 499, 259", denoise=1.0)
    _sample_custom(wf, ckpt, guider, (sampler, 0), (sigmas, 0), "fewstep/txt2img_custom")


def txt2img_sun(wf: WorkflowBuilder) -> None:
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    adapter = wf.add("FewStepLoadAdapter", model=(ckpt, 0), adapter=SUN, strength=1.0, steps=0, w=-1.0)
    pos = wf.add("CLIPTextEncode", "Positive", text=PROMPT, clip=(ckpt, 1))
    neg = wf.add("CLIPTextEncode", "Negative", text=NEGATIVE, clip=(ckpt, 1))
    guider = wf.add("FewStepSunGuider", model=(adapter, 0), positive=(pos, 0), negative=(neg, 0), negative_strength=1.0)
    _sample_custom(wf, ckpt, guider, (adapter, 2), (adapter, 3), "fewstep/txt2img_sun")


def inpaint(wf: WorkflowBuilder) -> None:
    ckpt, pos, neg = _model(wf)
    image = wf.add("LoadImage", "Image (paint the mask in the mask editor)", image=REFERENCE)
    _masked_pass(wf, ckpt, pos, neg, (image, 0), (image, 1), (image, 0), 0.9, "fewstep/inpaint",
                 keep_title="Only the masked part changes")


def _upscale(wf: WorkflowBuilder, tiled: bool, prefix: str) -> None:
    ckpt, pos, neg = _model(wf)
    latent = wf.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    first, _ = _save(wf, ckpt, _ksampler(wf, ckpt, pos, neg, latent, title="Generate"), f"{prefix}_base")
    larger = wf.add("ImageScaleBy", "x2 (or an upscale model: UpscaleModelLoader + ImageUpscaleWithModel)",
                    image=(first, 0), upscale_method="lanczos", scale_by=2.0)
    if tiled:
        encoded = wf.add("VAEEncodeTiled", pixels=(larger, 0), vae=(ckpt, 2), tile_size=512, overlap=64,
                         temporal_size=64, temporal_overlap=8)
    else:
        encoded = wf.add("VAEEncode", pixels=(larger, 0), vae=(ckpt, 2))
    refined = _ksampler(wf, ckpt, pos, neg, encoded, denoise=0.45, title="Refine")
    _save(wf, ckpt, refined, prefix, tiled=tiled)


def upscale_model(wf: WorkflowBuilder) -> None:
    """The x2 by an upscale model, its output scaled to exactly twice the size (a x4 model's by half)."""
    ckpt, pos, neg = _model(wf)
    latent = wf.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    first, _ = _save(wf, ckpt, _ksampler(wf, ckpt, pos, neg, latent, title="Generate"), "fewstep/upscale_model_base")
    loader = wf.add("UpscaleModelLoader", model_name=UPSCALE_MODEL)
    upscaled = wf.add("ImageUpscaleWithModel", upscale_model=(loader, 0), image=(first, 0))
    larger = wf.add("ImageScale", "To twice the generated size", image=(upscaled, 0), upscale_method="lanczos",
                    width=1024, height=1024, crop="disabled")
    encoded = wf.add("VAEEncode", pixels=(larger, 0), vae=(ckpt, 2))
    _save(wf, ckpt, _ksampler(wf, ckpt, pos, neg, encoded, denoise=0.45, title="Refine"), "fewstep/upscale_model")


def upscale(wf: WorkflowBuilder) -> None:
    _upscale(wf, tiled=False, prefix="fewstep/upscale")


def upscale_tiled(wf: WorkflowBuilder) -> None:
    _upscale(wf, tiled=True, prefix="fewstep/upscale_tiled")


# Face swap with core nodes: the face image scaled into a box of the target, then a few-step masked img2img pass.
FACE_BOX = {"x": 192, "y": 96, "width": 128, "height": 160}
FACE_GROW = 16


def faceswap(wf: WorkflowBuilder) -> None:
    ckpt, pos, neg = _model(wf, positive="a portrait photo of a person, natural skin, soft light")
    target = wf.add("LoadImage", "Target image", image=REFERENCE)
    face = wf.add("LoadImage", "Face to put in", image=FACE)
    box = FACE_BOX
    scaled = wf.add("ImageScale", image=(face, 0), upscale_method="lanczos", width=box["width"], height=box["height"],
                    crop="center")
    placed = wf.add("ImageCompositeMasked", "Face placed in the box", destination=(target, 0), source=(scaled, 0),
                    x=box["x"], y=box["y"], resize_source=False)
    canvas = wf.add("SolidMask", "Target-sized empty mask (set to the target's size)", value=0.0, width=512, height=512)
    square = wf.add("SolidMask", "Face box", value=1.0, width=box["width"], height=box["height"])
    mask = wf.add("MaskComposite", "Face mask", destination=(canvas, 0), source=(square, 0), x=box["x"], y=box["y"],
                  operation="add")
    grown = wf.add("GrowMask", "Blend the seams", mask=(mask, 0), expand=FACE_GROW, tapered_corners=True)
    _masked_pass(wf, ckpt, pos, neg, (placed, 0), (grown, 0), (target, 0), 0.55, "fewstep/faceswap",
                 title="Blend identity, seams, light", keep_title="Outside the face: the target's pixels")


# ReActor (github.com/Gourieff/ComfyUI-ReActor), as its node declares its inputs: not installed here, so its interface is
# written out for the builder. Its SWAP_MASK output (the swapped faces) limits the restore pass to the faces.
REACTOR = {"ReActorFaceSwap": {
    "input": {"required": {
        "enabled": ["BOOLEAN", {"default": True}], "input_image": ["IMAGE", {}],
        "swap_model": [["inswapper_128.onnx"], {}],
        "facedetection": [["retinaface_resnet50", "retinaface_mobile0.25", "YOLOv5l", "YOLOv5n"], {}],
        "face_restore_model": [["none", "codeformer-v0.1.0.pth", "GFPGANv1.4.pth"], {}],
        "face_restore_visibility": ["FLOAT", {"default": 1}], "codeformer_weight": ["FLOAT", {"default": 0.5}],
        "detect_gender_input": [["no", "female", "male"], {"default": "no"}],
        "detect_gender_source": [["no", "female", "male"], {"default": "no"}],
        "input_faces_index": ["STRING", {"default": "0"}], "source_faces_index": ["STRING", {"default": "0"}],
        "console_log_level": [[0, 1, 2], {"default": 1}]},
        "optional": {"source_image": ["IMAGE", {}], "face_model": ["FACE_MODEL", {}], "face_boost": ["FACE_BOOST", {}]}},
    "output": ["IMAGE", "FACE_MODEL", "IMAGE", "MASK"],
    "output_name": ["SWAPPED_IMAGE", "FACE_MODEL", "ORIGINAL_IMAGE", "SWAP_MASK"]}}


def faceswap_reactor(wf: WorkflowBuilder) -> None:
    """The swap by ReActor (no face restorer: the few-step pass restores), then a few-step masked pass over the faces."""
    ckpt, pos, neg = _model(wf, positive="a portrait photo of a person, natural skin, soft light")
    target = wf.add("LoadImage", "Target image", image=REFERENCE)
    face = wf.add("LoadImage", "Face to put in", image=FACE)
    swapped = wf.add("ReActorFaceSwap", "Face swap (ReActor)", enabled=True, input_image=(target, 0),
                     source_image=(face, 0), swap_model="inswapper_128.onnx", facedetection="retinaface_resnet50",
                     face_restore_model="none")
    grown = wf.add("GrowMask", "Blend the seams", mask=(swapped, 3), expand=FACE_GROW, tapered_corners=True)
    _masked_pass(wf, ckpt, pos, neg, (swapped, 0), (grown, 0), (swapped, 0), 0.35, "fewstep/faceswap_reactor",
                 title="Restore: skin, seams, light", keep_title="Outside the faces: the swap's pixels")


WORKFLOWS = {"txt2img": txt2img, "txt2img_custom_sampler": txt2img_custom_sampler, "txt2img_sun": txt2img_sun,
             "inpaint": inpaint, "upscale": upscale, "upscale_tiled": upscale_tiled, "upscale_model": upscale_model,
             "faceswap": faceswap,
             "faceswap_reactor": faceswap_reactor}
OFFLINE = [name for name in WORKFLOWS if name != "faceswap_reactor"]   # the ones that need no third-party node


def main(object_info_path: str, out_dir: str) -> None:
    object_info = json.loads(Path(object_info_path).read_text())
    for name, build in WORKFLOWS.items():
        wf = WorkflowBuilder({**object_info, **REACTOR})
        build(wf)
        Path(out_dir, f"{name}.json").write_text(json.dumps(wf.to_ui(), indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
