"""fewstep's nodes inside a real ComfyUI: a headless server on loopback, API-format graphs through POST /prompt.

Runs only when COMFYUI_PATH points at a ComfyUI checkout (see tests/comfyui_host.py); skips with the reason otherwise.
The checkpoint is a tiny SD1.5 that ComfyUI detects (model_channels 320, context 768, one level, TAESD VAE), and the
LoRA comes from `fewstep train flash` on a diffusers teacher with the very same UNet and text encoder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.core.adapter_file import AdapterMetadata, read_adapter, write_adapter
from fewstep.core.lora import LoraModule, convert_lora, write_lora
from fewstep.training.cli import main

from .adapter_fuzz import PROJECT_ERRORS, host_cases
from .comfyui_host import ComfyServer, build_tiny_sd15_teacher, comfyui, copy_into, write_checkpoint
from .workflow_specs import OFFLINE

pytestmark = [pytest.mark.host, pytest.mark.slow]

FLASH = "tiny_flash.safetensors"
FLASH_INFERRED = "tiny_flash_diffusers_layout.safetensors"
FLASH_WITH_TEXT = "tiny_flash_text_encoder.safetensors"
WRONG_BASE = "sdxl_flash.safetensors"
GUIDED, GUIDED_LORA = "tiny_guided.safetensors", "tiny_guided_lora.safetensors"
SUN = "tiny_sun.safetensors"
GDD, GDD_LORA = "tiny_gdd.safetensors", "tiny_gdd_lora.safetensors"
SNAP = "tiny_snap.safetensors"
REPO = Path(__file__).resolve().parents[1]
SUN_RELEASED = "tiny_sun_released_layout.safetensors"
SUN_PATCH = re.compile(r"fewstep: SUN layer \('(\w+)', (\d+), (\d+)\) ran with a negative prompt")
TEXT_MODULE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
DENOISING = re.compile(r"fewstep: denoising at timestep \[(\d+)\]")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    found = comfyui()
    if isinstance(found, str):
        pytest.skip(found)
    path, python, stubs = found
    root = tmp_path_factory.mktemp("comfyui")
    models = root / "work" / "models"
    teacher = build_tiny_sd15_teacher(root / "teacher")
    (models / "checkpoints").mkdir(parents=True)
    write_checkpoint(teacher, models / "checkpoints" / "tiny_sd15.safetensors", path, python, stubs)
    # A short run at a high learning rate, so that the LoRA visibly changes the model.
    assert main(["train", "flash", "--teacher", str(teacher), "--run-dir", str(root / "run"), "--phase-steps", "1,1,1,1",
                 "--batch-size", "2", "--lora-rank", "4", "--teacher-steps", "8", "--sample-every", "0", "--lr", "1e-2"]) == 0
    flash = copy_into(root / "run" / "flash_lora.safetensors", models / "loras")
    flash.rename(flash.with_name(FLASH))
    # The same weights as a released file would come: diffusers keys, no fewstep metadata.
    adapter = read_adapter(models / "loras" / FLASH)
    save_file(convert_lora(adapter.tensors, "diffusers"), str(models / "loras" / FLASH_INFERRED))
    # The same plus a text-encoder module (kohya lora_te_ keys), as many community LoRAs carry.
    text = {f"{TEXT_MODULE}.lora_down.weight": torch.randn(4, 768) * 0.5, f"{TEXT_MODULE}.lora_up.weight": torch.randn(768, 4) * 0.5,
            f"{TEXT_MODULE}.alpha": torch.tensor(4.0)}
    write_adapter(models / "loras" / FLASH_WITH_TEXT, {**adapter.tensors, **text}, adapter.metadata)
    (models / "fewstep").mkdir()
    # A guided student (stage 1) of the same teacher: a full UNet with its w projection.
    assert main(["train", "guided", "--teacher", str(teacher), "--run-dir", str(root / "guided"), "--steps", "4",
                 "--batch-size", "2", "--sample-every", "0", "--lr", "1e-2", "--ema-decay", "0", "--sample-steps", "4",
                 "--out", str(models / "fewstep" / GUIDED)]) == 0
    # The same as a LoRA with the w projection (--lora-rank).
    assert main(["train", "guided", "--teacher", str(teacher), "--run-dir", str(root / "guided-lora"), "--steps", "4",
                 "--batch-size", "2", "--sample-every", "0", "--lr", "1e-2", "--ema-decay", "0", "--sample-steps", "4",
                 "--lora-rank", "4", "--out", str(models / "fewstep" / GUIDED_LORA)]) == 0
    # A SUN adapter of the same teacher, in our layout and as the official release lays it out (processor indices).
    assert main(["train", "sun", "--teacher", str(teacher), "--run-dir", str(root / "sun"), "--steps", "3", "--batch-size", "2",
                 "--msc-batch-size", "1", "--msc-teacher-steps", "4", "--sample-every", "0", "--lr", "1e-2", "--ema-decay", "0",
                 "--out", str(models / "fewstep" / SUN)]) == 0
    save_file(_released_layout(read_adapter(models / "fewstep" / SUN).tensors), str(models / "fewstep" / SUN_RELEASED))
    sdxl = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": LoraModule(torch.zeros(4, 2048), torch.zeros(640, 4), 4.0)}
    write_adapter(models / "fewstep" / WRONG_BASE, write_lora(sdxl), AdapterMetadata(kind="flash_lora", base="sdxl"))
    # One-step GDD generators of the same teacher: the whole UNet (GDD-I) and a LoRA.
    for variant, name in (("gdd_i", GDD), ("lora", GDD_LORA)):
        assert main(["train", "gdd", "--teacher", str(teacher), "--run-dir", str(root / f"gdd-{variant}"), "--steps", "2",
                     "--batch-size", "2", "--variant", variant, "--lora-rank", "4", "--lr", "1e-2", "--sample-every", "0",
                     "--ema-decay", "0", "--out", str(models / "fewstep" / name)]) == 0
    _write_snap_student(teacher, models / "fewstep" / SNAP)
    server = ComfyServer(root / "work", path, python, stubs)
    server.teacher = teacher
    yield server
    server.close()


def _write_snap_student(teacher: Path, out: Path) -> None:
    """A SnapFusion student of the tiny teacher: its UNet without the mid block and without the up level's
    cross-attention (layer counts the teacher's: one layer cannot go), 2 DDIM steps, no CFG."""
    from fewstep.training.methods.snap_architecture import SlimArchitecture, build_slim_unet
    from fewstep.training.methods.snapfusion import export_snap_student
    from fewstep.training.pipelines import load_teacher

    unet = load_teacher(teacher).unet
    full = SlimArchitecture.of_teacher(unet.config)
    slim = build_slim_unet(unet, SlimArchitecture(full.down_layers, full.up_layers, full.down_attention, (False,), mid=False))
    torch.manual_seed(0)
    with torch.no_grad():   # moved off the teacher, so that loading the teacher's weights by mistake would show
        for p in slim.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_snap_student(slim, out, "sd15", "epsilon", 2, 1.0, {"method": "snapfusion"})


def _released_layout(tensors: dict) -> dict:
    """Keys as the official code saves them: the module's index among the UNet's attention processors."""
    from diffusers import UNet2DConditionModel

    from .comfyui_host import TINY_SD15_UNET

    index = {name[: -len(".processor")]: i for i, name in enumerate(UNet2DConditionModel(**TINY_SD15_UNET).attn_processors)}
    out = {}
    for key, value in tensors.items():
        module, param = key.split(".attn2.")
        out[f"{index[module + '.attn2']}.{param}"] = value
    return out


def _base_graph(prompt: str = "a silhouette of a cat") -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def _ksampler(latent, seed: int, adapter: str = FLASH, denoise: float = 1.0, strength: float = 1.0,
              negative_strength: float = 1.0) -> dict:
    return {"class_type": "FewStepKSampler", "inputs": {
        "model": ["ckpt", 0], "adapter": adapter, "strength": strength, "seed": seed, "steps": 0, "w": -1.0, "cfg": 1.0,
        "positive": ["pos", 0], "negative": ["neg", 0], "negative_strength": negative_strength, "latent_image": latent,
        "denoise": denoise}}


def _outputs(graph: dict, samples, prefix: str) -> dict:
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": ["ckpt", 2]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    graph["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": f"latents/{prefix}"}}
    return graph


def _run(comfy: ComfyServer, graph: dict) -> tuple[dict, list[int]]:
    """(history entry, the timesteps fewstep's patched model was called at during this run)."""
    before = len(comfy.log())
    entry = comfy.run(graph)
    return entry, [int(t) for t in DENOISING.findall(comfy.log()[before:])]


def _latent(comfy: ComfyServer, entry: dict, node: str = "save_latent") -> torch.Tensor:
    saved = entry["outputs"][node]["latents"][0]
    return load_file(str(comfy.workdir / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def _assert_success(entry: dict) -> None:
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"][-1]


def test_nodes_are_registered_with_tooltips(comfy):
    info = comfy.get("/object_info")
    ours = {name: node for name, node in info.items() if name.startswith("FewStep")}
    assert set(ours) == {"FewStepLoadAdapter", "FewStepKSampler", "FewStepSampler", "FewStepSigmas", "FewStepSunGuider"}
    for name, node in ours.items():
        assert node["category"] == "sampling/fewstep" and node["display_name"].startswith("FewStep ")
        for group in node["input"].values():
            for input_name, (_, options) in group.items():
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
    adapters = ours["FewStepLoadAdapter"]["input"]["required"]["adapter"][1]["options"]
    assert {FLASH, FLASH_INFERRED, FLASH_WITH_TEXT, WRONG_BASE, GUIDED, SUN, SUN_RELEASED} <= set(adapters)   # models/fewstep and models/loras


def test_ksampler_txt2img_samples_at_the_files_timesteps(comfy):
    entry, timesteps = _run(comfy, _outputs({**_base_graph(), "sample": _ksampler(["empty", 0], seed=1)}, ["sample", 0], "ks"))
    _assert_success(entry)
    assert entry["outputs"]["save"]["images"], "no image written"
    assert timesteps == [999, 749, 499, 249]   # the file's fewstep.timesteps, one model pass each
    assert "4 steps at timesteps 999, 749, 499, 249" in entry["outputs"]["sample"]["text"][0]
    assert torch.isfinite(_latent(comfy, entry)).all()


def test_load_adapter_into_sampler_custom_applies_the_lora(comfy):
    def graph(strength: float, prefix: str) -> dict:
        g = _base_graph()
        g["load"] = {"class_type": "FewStepLoadAdapter", "inputs": {
            "model": ["ckpt", 0], "adapter": FLASH, "strength": strength, "steps": 0, "w": -1.0, "clip": ["ckpt", 1]}}
        g["sample"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["load", 0], "add_noise": True, "noise_seed": 2, "cfg": 1.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["load", 2], "sigmas": ["load", 3], "latent_image": ["empty", 0]}}
        return _outputs(g, ["sample", 0], prefix)

    entry, timesteps = _run(comfy, graph(1.0, "custom"))
    _assert_success(entry)
    assert entry["outputs"]["save"]["images"]
    assert timesteps == [999, 749, 499, 249]
    without, _ = _run(comfy, graph(0.0, "custom_strength0"))
    _assert_success(without)
    with_lora, no_lora = _latent(comfy, entry), _latent(comfy, without)
    assert torch.isfinite(with_lora).all() and (with_lora - no_lora).abs().max() > 1e-3


def test_flash_lora_samples_as_the_training_code_does_with_ddim(comfy):
    """The Flash file through FewStep Load Adapter, FewStep Sampler's ddim (what the proxy preset's files name) and
    SamplerCustom: the latent our own sampler gives with the LoRA merged, for the same seed and prompt (DDIM adds no
    noise after the first draw, so the two must agree exactly up to float error)."""
    from fewstep.training.pipelines import load_teacher
    from fewstep.training.students import AdaptedTeacher

    g = _base_graph()
    g["load"] = {"class_type": "FewStepLoadAdapter", "inputs": {
        "model": ["ckpt", 0], "adapter": FLASH, "strength": 1.0, "steps": 0, "w": -1.0, "clip": ["ckpt", 1]}}
    g["ddim"] = {"class_type": "FewStepSampler", "inputs": {"sampler": "ddim", "gamma": 0.3, "eta": 0.0}}
    g["sample"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["load", 0], "add_noise": True, "noise_seed": 3, "cfg": 1.0, "positive": ["pos", 0],
        "negative": ["neg", 0], "sampler": ["ddim", 0], "sigmas": ["load", 3], "latent_image": ["empty", 0]}}
    entry, timesteps = _run(comfy, _outputs(g, ["sample", 0], "flash_ddim"))
    _assert_success(entry)
    assert timesteps == [999, 749, 499, 249]
    teacher = load_teacher(comfy.teacher)
    teacher.text_encoder.half().float()   # as the checkpoint ComfyUI loads holds it
    student = AdaptedTeacher(teacher, comfy.workdir / "models" / "loras" / FLASH)
    ours = student.latents(["a silhouette of a cat"], [3], sampler="ddim")
    theirs = _latent(comfy, entry) * 0.18215
    assert theirs.shape == ours.shape
    # ComfyUI merges the fp16 LoRA into the checkpoint's fp16 weights, we into fp32 ones: a few 1e-3 apart. Sampling
    # the same LoRA with the LCM re-noising the file names lands far off, so the agreement is the sampler's.
    torch.testing.assert_close(theirs, ours, rtol=1e-2, atol=1e-2)
    assert (theirs - student.latents(["a silhouette of a cat"], [3], sampler="consistency")).abs().max() > 0.1


def test_inpainting_latent_keeps_the_unmasked_part(comfy):
    g = _base_graph()
    g["image"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x804020}}
    g["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 2]}}
    g["canvas"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    g["top"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 32}}
    g["mask"] = {"class_type": "MaskComposite", "inputs": {"destination": ["canvas", 0], "source": ["top", 0], "x": 0, "y": 0,
                                                         "operation": "add"}}
    g["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["encode", 0], "mask": ["mask", 0]}}
    g["sample"] = _ksampler(["masked", 0], seed=3, denoise=0.5)
    g["save_original"] = {"class_type": "SaveLatent", "inputs": {"samples": ["encode", 0], "filename_prefix": "latents/original"}}
    entry, timesteps = _run(comfy, _outputs(g, ["sample", 0], "inpaint"))
    _assert_success(entry)
    assert timesteps == [499, 374, 249, 124]   # denoise 0.5: four steps squeezed below t = 500
    result, original = _latent(comfy, entry), _latent(comfy, entry, "save_original")
    assert torch.allclose(result[..., 5:, :], original[..., 5:, :], atol=1e-4)   # rows well below the mask edge
    assert (result[..., :3, :] - original[..., :3, :]).abs().max() > 1e-2       # the masked top was repainted


def test_file_without_metadata_loads_with_inferred_settings(comfy):
    g = _base_graph()
    g["load"] = {"class_type": "FewStepLoadAdapter", "inputs": {"model": ["ckpt", 0], "adapter": FLASH_INFERRED,
                                                               "strength": 1.0, "steps": 0, "w": -1.0}}
    g["sample"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["load", 0], "add_noise": True, "noise_seed": 4, "cfg": 1.0, "positive": ["pos", 0],
        "negative": ["neg", 0], "sampler": ["load", 2], "sigmas": ["load", 3], "latent_image": ["empty", 0]}}
    entry, timesteps = _run(comfy, _outputs(g, ["sample", 0], "inferred"))
    _assert_success(entry)
    assert timesteps == [999, 759, 499, 259]   # LCM's grid, what such LoRAs are published with
    shown = entry["outputs"]["load"]["text"][0]
    assert "inferred from its keys" in shown and "no fewstep metadata" in shown


def test_text_encoder_weights_go_to_clip_when_it_is_connected(comfy):
    def graph(prefix: str, through_loader: bool) -> dict:
        g = _base_graph("a handwritten digit seven")
        g["load"] = {"class_type": "FewStepLoadAdapter", "inputs": {
            "model": ["ckpt", 0], "adapter": FLASH_WITH_TEXT, "strength": 1.0, "steps": 0, "w": -1.0, "clip": ["ckpt", 1]}}
        if through_loader:
            g["pos"]["inputs"]["clip"] = ["load", 1]
        g["sample"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["load", 0], "add_noise": True, "noise_seed": 6, "cfg": 1.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["load", 2], "sigmas": ["load", 3], "latent_image": ["empty", 0]}}
        return _outputs(g, ["sample", 0], prefix)

    patched, _ = _run(comfy, graph("text_lora", through_loader=True))
    plain, _ = _run(comfy, graph("text_lora_plain_clip", through_loader=False))
    _assert_success(patched), _assert_success(plain)
    assert (_latent(comfy, patched) - _latent(comfy, plain)).abs().max() > 1e-3   # the prompt was encoded differently
    one_node, _ = _run(comfy, _outputs({**_base_graph(), "sample": _ksampler(["empty", 0], seed=6, adapter=FLASH_WITH_TEXT)},
                                       ["sample", 0], "text_lora_ksampler"))
    _assert_success(one_node)
    assert "text-encoder LoRA weights (1 modules) left out: connect CLIP" in one_node["outputs"]["sample"]["text"][0]


def test_guided_student_takes_w_as_input(comfy):
    def graph(w: float, strength: float, prefix: str) -> dict:
        g = _base_graph()
        g["load"] = {"class_type": "FewStepLoadAdapter", "inputs": {
            "model": ["ckpt", 0], "adapter": GUIDED, "strength": strength, "steps": 0, "w": w}}
        g["sample"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["load", 0], "add_noise": True, "noise_seed": 8, "cfg": 1.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["load", 2], "sigmas": ["load", 3], "latent_image": ["empty", 0]}}
        return _outputs(g, ["sample", 0], prefix)

    low, _ = _run(comfy, graph(0.0, 1.0, "guided_w0"))
    high, _ = _run(comfy, graph(6.0, 1.0, "guided_w6"))
    off, _ = _run(comfy, graph(6.0, 0.0, "guided_strength0"))
    for entry in (low, high, off):
        _assert_success(entry)
    shown = high["outputs"]["load"]["text"][0]
    assert "guided_student for sd15" in shown and "sampler ddim, 4 steps at timesteps 999, 749, 499, 249" in shown
    assert "guidance w = 6" in shown
    w0, w6, base = _latent(comfy, low), _latent(comfy, high), _latent(comfy, off)
    assert torch.isfinite(w6).all()
    assert (w0 - w6).abs().max() > 1e-4     # w reaches the model through the time embedding
    assert (w6 - base).abs().max() > 1e-3   # the student's weights are applied
    one_node, _ = _run(comfy, _outputs({**_base_graph(), "sample": _ksampler(["empty", 0], seed=9, adapter=GUIDED)},
                                       ["sample", 0], "guided_ksampler"))
    _assert_success(one_node)
    assert "guidance w = 6.5" in one_node["outputs"]["sample"]["text"][0]   # the file's default w (paper preset)


def test_guided_students_whole_and_lora_sample_as_the_training_code_does(comfy):
    """FewStep KSampler with a whole-UNet guided student and with a LoRA one: the latent our diffusers sampler gives for
    the same seed, prompt and w (the LoRA through ComfyUI's own LoRA loader, w through the time MLP). The whole student
    runs again last, on a model ComfyUI still holds patched from the runs before."""
    from fewstep.training.pipelines import load_teacher
    from fewstep.training.students import GuidedStudent

    teacher = load_teacher(comfy.teacher)
    teacher.text_encoder.half().float()   # the checkpoint's text encoder is fp16
    for name, w in ((GUIDED, 3.0), (GUIDED_LORA, 3.0), (GUIDED, 5.0)):
        graph = {**_base_graph(), "sample": _ksampler(["empty", 0], seed=3, adapter=name)}
        graph["sample"]["inputs"]["w"] = w
        entry, _ = _run(comfy, _outputs(graph, ["sample", 0], f"guided_exact_{name}_{w:g}"))
        _assert_success(entry)
        assert f"guidance w = {w:g}" in entry["outputs"]["sample"]["text"][0]
        ours = GuidedStudent(teacher, comfy.workdir / "models" / "fewstep" / name).latents(["a silhouette of a cat"], [3], w=w)
        # The random tiny teacher's latents run to the hundreds: the tolerance is relative to their scale.
        torch.testing.assert_close(_latent(comfy, entry) * 0.18215, ours, rtol=0, atol=1e-3 * float(ours.abs().max()))


# The tiny UNet's cross-attention layers as ComfyUI addresses them: one input block, the middle block, two output blocks.
TINY_ATTN2 = {("input", 1, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)}


def _sun_run(comfy: ComfyServer, prefix: str, adapter: str = SUN, negative: str = "blurry", negative_strength: float = 1.0,
             through_guider: bool = False):
    """(history entry, the SUN patches that fired in this run)."""
    g = _base_graph()
    g["neg"]["inputs"]["text"] = negative
    if through_guider:
        g["load"] = {"class_type": "FewStepLoadAdapter", "inputs": {
            "model": ["ckpt", 0], "adapter": adapter, "strength": 1.0, "steps": 0, "w": -1.0}}
        g["guider"] = {"class_type": "FewStepSunGuider", "inputs": {
            "model": ["load", 0], "positive": ["pos", 0], "negative": ["neg", 0], "negative_strength": negative_strength}}
        g["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}}
        g["sample"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["load", 2], "sigmas": ["load", 3],
            "latent_image": ["empty", 0]}}
    else:
        g["sample"] = _ksampler(["empty", 0], seed=11, adapter=adapter, negative_strength=negative_strength)
    before = len(comfy.log())
    entry = comfy.run(_outputs(g, ["sample", 0], prefix))
    _assert_success(entry)
    fired = [(b, int(n), int(t)) for b, n, t in SUN_PATCH.findall(comfy.log()[before:])]
    return entry, fired


def test_sun_adapter_reads_the_negative_prompt_in_one_pass(comfy):
    entry, fired = _sun_run(comfy, "sun_ksampler")
    assert set(fired) == TINY_ATTN2 and len(fired) == 4 * len(TINY_ATTN2)   # every patch, once per step, one pass each
    shown = entry["outputs"]["sample"]["text"][0]
    assert "sun_adapter for sd15" in shown and "no CFG (one model pass per step)" in shown
    assert "SUN adapter on 4 cross-attention layers" in shown
    blurry, cat = _latent(comfy, entry), _latent(comfy, _sun_run(comfy, "sun_negative_cat", negative="a silhouette of a cat")[0])
    assert torch.isfinite(blurry).all() and (blurry - cat).abs().max() > 1e-4   # the negative prompt reaches the model
    # At negative strength 0 the negative branch is off: the negative prompt no longer matters.
    off_a = _latent(comfy, _sun_run(comfy, "sun_off_a", negative_strength=0.0)[0])
    off_b = _latent(comfy, _sun_run(comfy, "sun_off_b", negative="a silhouette of a cat", negative_strength=0.0)[0])
    assert torch.allclose(off_a, off_b) and (off_a - blurry).abs().max() > 1e-4


def test_sun_guider_in_sampler_custom_advanced_and_the_released_layout(comfy):
    guided, fired = _sun_run(comfy, "sun_guider", through_guider=True)
    assert set(fired) == TINY_ATTN2
    one_node, _ = _sun_run(comfy, "sun_ksampler_same")
    assert torch.allclose(_latent(comfy, guided), _latent(comfy, one_node), atol=1e-5)   # the same sampling, two graphs
    released, fired = _sun_run(comfy, "sun_released", adapter=SUN_RELEASED)
    assert set(fired) == TINY_ATTN2
    assert "inferred from its keys" in released["outputs"]["sample"]["text"][0]
    # Same weights, other key layout; the inferred sampler (DPM-Solver++) is also what our file names.
    assert torch.allclose(_latent(comfy, released), _latent(comfy, one_node), atol=1e-3)


def test_wrong_base_adapter_is_a_node_error(comfy):
    entry, _ = _run(comfy, _outputs({**_base_graph(), "sample": _ksampler(["empty", 0], seed=5, adapter=WRONG_BASE)},
                                    ["sample", 0], "wrong"))
    assert entry["status"]["status_str"] == "error"
    kind, error = entry["status"]["messages"][-1]
    assert kind == "execution_error" and error["node_type"] == "FewStepKSampler"
    assert "adapter is for sdxl" in error["exception_message"] and "the model is sd15" in error["exception_message"]
    assert comfy.get("/system_stats")   # the server lives on


def test_no_adapter_selected_is_a_one_line_node_error(comfy):
    """A fresh install has no adapter files: ComfyUI (it checks no combo values) hands the node None."""
    entry, _ = _run(comfy, _outputs({**_base_graph(), "sample": _ksampler(["empty", 0], seed=5, adapter=None)},
                                    ["sample", 0], "no_adapter"))
    assert entry["status"]["status_str"] == "error"
    kind, error = entry["status"]["messages"][-1]
    assert kind == "execution_error" and error["node_type"] == "FewStepKSampler"
    assert error["exception_type"].endswith("AdapterFileError")
    assert error["exception_message"].startswith("no adapter selected: put a .safetensors in models/fewstep or models/loras")


def test_broken_and_hostile_adapter_files_are_one_line_node_errors(comfy):
    """One file of every tensor mutation and every kind (tests/adapter_fuzz.py) made from this host's own Flash LoRA and
    SUN adapter, dropped into models/loras: each samples finite latents or stops FewStep KSampler with the project's
    one-line error, and the server lives on."""
    loras = comfy.workdir / "models" / "loras"
    outcomes = {}
    for i, (label, path) in enumerate(host_cases({"flash": loras / FLASH, "sun": comfy.workdir / "models" / "fewstep" / SUN}, loras)):
        entry, _ = _run(comfy, _outputs({**_base_graph(), "sample": _ksampler(["empty", 0], seed=i, adapter=path.name)},
                                        ["sample", 0], f"fuzz_{i:03d}"))
        if entry["status"]["status_str"] == "success":
            assert torch.isfinite(_latent(comfy, entry)).all(), label
            outcomes[label] = "samples"
        else:
            kind, error = entry["status"]["messages"][-1]
            assert kind == "execution_error" and error["node_type"] == "FewStepKSampler", (label, error)
            assert error["exception_type"].rsplit(".", 1)[-1] in PROJECT_ERRORS, (label, error["exception_message"])
            assert "\n" not in error["exception_message"].strip(), (label, error["exception_message"])
            outcomes[label] = "refused"
        path.unlink()
    print(f"{len(outcomes)} files: {list(outcomes.values()).count('samples')} sample, {list(outcomes.values()).count('refused')} refused")
    assert comfy.get("/system_stats")
    assert set(outcomes.values()) == {"samples", "refused"}


def test_after_an_lcm_model_sampling_the_sigmas_follow_its_50_timesteps(comfy):
    """The stock LCM-LoRA chain: ModelSamplingDiscrete (lcm) keeps LCM's 50 original timesteps and sigmas, and the
    fewstep nodes after it look timesteps up through it (they indexed its 50-entry table by timestep: IndexError)."""
    graph = _base_graph()
    graph["lcm"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["ckpt", 0], "sampling": "lcm", "zsnr": False}}
    graph["load"] = {"class_type": "FewStepLoadAdapter", "inputs": {
        "model": ["lcm", 0], "adapter": FLASH, "strength": 1.0, "steps": 0, "w": -1.0}}
    graph["sigmas"] = {"class_type": "FewStepSigmas", "inputs": {
        "model": ["lcm", 0], "steps": 4, "spacing": "lcm", "timesteps": "", "denoise": 1.0}}
    graph["stock_sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}}
    graph["sample"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["load", 0], "add_noise": True, "noise_seed": 3, "cfg": 1.0, "positive": ["pos", 0],
        "negative": ["neg", 0], "sampler": ["load", 2], "sigmas": ["load", 3], "latent_image": ["empty", 0]}}
    graph["stock"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["load", 0], "add_noise": True, "noise_seed": 3, "cfg": 1.0, "positive": ["pos", 0],
        "negative": ["neg", 0], "sampler": ["stock_sampler", 0], "sigmas": ["sigmas", 0], "latent_image": ["empty", 0]}}
    graph = _outputs(graph, ["sample", 0], "lcm_chain")
    graph["save_stock"] = {"class_type": "SaveLatent", "inputs": {"samples": ["stock", 0], "filename_prefix": "latents/lcm_stock"}}
    entry, timesteps = _run(comfy, graph)
    _assert_success(entry)
    # Both graphs' four passes, seen through the lcm model's own timestep(), lie on its grid (19, 39, ..., 999): the
    # file's 999, 749, 499, 249 and FewStep Sigmas' LCM spacing 999, 759, 499, 259.
    assert len(timesteps) == 8 and all(t % 20 == 19 for t in timesteps), timesteps
    assert timesteps.count(999) == 2 and timesteps.count(499) == 2 and {759, 259} <= set(timesteps), timesteps
    assert torch.isfinite(_latent(comfy, entry)).all() and torch.isfinite(_latent(comfy, entry, "save_stock")).all()


def test_gdd_generator_samples_in_one_pass_as_the_training_code_does(comfy):
    """FewStep KSampler with a gdd_student file: one pass at t = 999, the latent the training code's sampler gives for
    the same seed and prompt (ComfyUI's latents are the model's divided by SD's scale factor 0.18215)."""
    from diffusers import UNet2DConditionModel

    from fewstep.core.schedule import DiscreteSchedule
    from fewstep.training.pipelines import PromptEncoder, load_teacher
    from fewstep.training.students import sample_student

    teacher = load_teacher(comfy.teacher)
    cond = PromptEncoder(teacher)(["a silhouette of a cat"])
    for name in (GDD, GDD_LORA):
        entry, _ = _run(comfy, _outputs({**_base_graph(), "sample": _ksampler(["empty", 0], seed=3, adapter=name)},
                                        ["sample", 0], f"gdd_{name}"))
        _assert_success(entry)
        assert "sampler onestep, 1 steps at timesteps 999" in entry["outputs"]["sample"]["text"][0]
        if name == GDD:
            adapter = read_adapter(comfy.workdir / "models" / "fewstep" / name)
            unet = UNet2DConditionModel.from_config(teacher.unet.config)
            unet.load_state_dict({k: v.float() for k, v in adapter.tensors.items()})
            with torch.no_grad():
                ours = sample_student(unet, DiscreteSchedule.stable_diffusion(), cond, [3], [999], sampler="onestep",
                                      consistency_boundary=False)
            theirs = _latent(comfy, entry) * 0.18215
            assert theirs.shape == ours.shape
            torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)


def test_snap_student_builds_its_own_slim_unet_and_samples_as_the_training_code_does(comfy):
    """FewStep KSampler with a snap_student file: ComfyUI builds the slim UNet its metadata describes (no mid block, no
    up cross-attention) and samples the latent our diffusers sampler gives for the same seed and prompt."""
    from fewstep.training.pipelines import load_teacher
    from fewstep.training.students import SnapStudent

    entry, _ = _run(comfy, _outputs({**_base_graph(), "sample": _ksampler(["empty", 0], seed=3, adapter=SNAP)},
                                    ["sample", 0], "snap"))
    _assert_success(entry)
    summary = entry["outputs"]["sample"]["text"][0]
    assert "sampler ddim, 2 steps at timesteps 999, 499" in summary and "SnapFusion student" in summary
    teacher = load_teacher(comfy.teacher)
    teacher.text_encoder.half().float()   # the checkpoint's text encoder is fp16: without the mid block the slim UNet feels it
    student = SnapStudent(teacher, comfy.workdir / "models" / "fewstep" / SNAP)
    assert student.unet.mid_block is None
    ours = student.latents(["a silhouette of a cat"], [3])
    theirs = _latent(comfy, entry) * 0.18215
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)


# --- the shipped workflows (workflows/*.json) ------------------------------------------------------------------------

WORKFLOW_SCALE = 4   # the workflows' 512-pixel sizes over 4: the tiny model on CPU
SIZE_INPUTS = {"EmptyLatentImage": ("width", "height"), "SolidMask": ("width", "height"), "ImageScale": ("width", "height"),
               "MaskComposite": ("x", "y"), "ImageCompositeMasked": ("x", "y"), "GrowMask": ("expand",)}


def _workflow_prompt(comfy: ComfyServer, name: str) -> tuple[dict, dict]:
    """(UI workflow, API prompt) with the test's checkpoint, adapters and images, at a quarter of the sizes."""
    from .comfy_workflow import ui_to_api
    from .workflow_specs import CHECKPOINT, FACE, REFERENCE, UPSCALE_MODEL
    from .workflow_specs import FLASH as WORKFLOW_FLASH
    from .workflow_specs import SUN as WORKFLOW_SUN

    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    prompt = ui_to_api(workflow, comfy.get("/object_info"))
    swap = {CHECKPOINT: "tiny_sd15.safetensors", WORKFLOW_FLASH: FLASH, WORKFLOW_SUN: SUN, REFERENCE: WORKFLOW_IMAGE,
            FACE: WORKFLOW_FACE, UPSCALE_MODEL: WORKFLOW_UPSCALER}
    for node in prompt.values():
        inputs = node["inputs"]
        for key, value in inputs.items():
            if isinstance(value, str) and value in swap:
                inputs[key] = swap[value]
        for key in SIZE_INPUTS.get(node["class_type"], ()):
            inputs[key] //= WORKFLOW_SCALE
    return workflow, prompt


WORKFLOW_IMAGE, WORKFLOW_FACE, WORKFLOW_UPSCALER = "workflow_target.png", "workflow_face.png", "tiny_compact_x2.safetensors"


@pytest.fixture(scope="module")
def workflow_images(comfy):
    """128-pixel test images in ComfyUI's input folder; the target's alpha is 0 on its left half (the mask editor's
    mask: LoadImage's MASK is 1 there)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    target = np.concatenate([rng.integers(0, 256, (128, 128, 3)), np.full((128, 128, 1), 255)], axis=-1).astype(np.uint8)
    target[:, :64, 3] = 0
    folder = comfy.workdir / "input"
    folder.mkdir(exist_ok=True)
    Image.fromarray(target, "RGBA").save(folder / WORKFLOW_IMAGE)
    Image.fromarray(rng.integers(0, 256, (96, 80, 3)).astype(np.uint8)).save(folder / WORKFLOW_FACE)
    # A x2 Real-ESRGAN Compact (SRVGG: conv, PReLU, conv, PReLU, conv to 3·2² channels) with random weights, which
    # ComfyUI's loader (spandrel) recognises by its keys.
    generator = torch.Generator().manual_seed(0)
    shapes = {"body.0.weight": (16, 3, 3, 3), "body.0.bias": (16,), "body.1.weight": (16,), "body.2.weight": (16, 16, 3, 3),
              "body.2.bias": (16,), "body.3.weight": (16,), "body.4.weight": (12, 16, 3, 3), "body.4.bias": (12,)}
    upscalers = comfy.workdir / "models" / "upscale_models"
    upscalers.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.randn(shape, generator=generator) * 0.1 for k, shape in shapes.items()}, str(upscalers / WORKFLOW_UPSCALER))
    return target[..., :3], target[..., 3] == 0


def _saved_images(comfy: ComfyServer, entry: dict) -> dict[str, np.ndarray]:
    """{SaveImage node id: its first image}."""
    from PIL import Image

    images = {}
    for node, output in entry["outputs"].items():
        for saved in output.get("images", [])[:1]:
            path = comfy.workdir / "output" / saved["subfolder"] / saved["filename"]
            images[node] = np.asarray(Image.open(path).convert("RGB"))
    return images


@pytest.mark.parametrize("name", OFFLINE)
def test_shipped_workflow_runs(comfy, workflow_images, name):
    from .workflow_specs import FACE_BOX, FACE_GROW

    workflow, prompt = _workflow_prompt(comfy, name)
    entry = comfy.run(prompt, workflow=workflow)
    _assert_success(entry)
    images = _saved_images(comfy, entry)
    saves = [k for k, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert sorted(images) == sorted(saves)
    final = images[saves[-1]]
    target, masked = workflow_images
    if name == "inpaint":
        # Outside the mask, the input's pixels (up to the float -> 8-bit rounding of the composite).
        assert np.abs(final[~masked].astype(int) - target[~masked]).max() <= 1
        assert np.abs(final[masked].astype(int) - target[masked]).mean() > 10
    if name.startswith("upscale"):
        base = images[saves[0]]
        assert final.shape == (2 * base.shape[0], 2 * base.shape[1], 3)
    if name == "faceswap":
        box, grow = {k: v // WORKFLOW_SCALE for k, v in FACE_BOX.items()}, FACE_GROW // WORKFLOW_SCALE
        outside = np.ones(final.shape[:2], bool)
        outside[max(0, box["y"] - grow): box["y"] + box["height"] + grow, max(0, box["x"] - grow): box["x"] + box["width"] + grow] = False
        assert np.abs(final[outside].astype(int) - target[outside]).max() <= 1
        assert np.abs(final[~outside].astype(int) - target[~outside]).mean() > 10


def test_the_node_snapshot_is_this_comfyuis(comfy):
    """tests/data/comfyui_object_info.json (what the tests without ComfyUI read) against the live server."""
    from .comfy_workflow import input_specs

    snapshot = json.loads((Path(__file__).parent / "data" / "comfyui_object_info.json").read_text())
    live = comfy.get("/object_info")
    assert set(snapshot["core_node_types"]) <= set(live)

    def inputs(object_info, node_type):   # names and types; a combo's choices are the files each install has
        return [(name, "COMBO" if isinstance(kind, list) else kind) for name, kind, _ in input_specs(object_info, node_type)]

    for node_type in snapshot["object_info"]:
        assert inputs(live, node_type) == inputs(snapshot["object_info"], node_type)


def test_no_lora_key_went_unloaded(comfy):
    # Runs last in this module: every graph above has loaded the LoRA by now.
    assert "lora key not loaded" not in comfy.log()
    assert "fewstep: denoising at timestep" in comfy.log()
