"""fewstep's A1111 extension inside a real AUTOMATIC1111 WebUI and a real Forge: headless API server on loopback,
requests through /sdapi/v1/txt2img and /img2img with ``alwayson_scripts``. Every test runs in both.

Each host runs only when A1111_PATH / FORGE_PATH (and the other variables tests/a1111_host.py names) point at one;
skips with the reason otherwise. The checkpoint is a tiny SD1.5 written by the host's own network code; the Flash
LoRA, the SUN adapter and the guided student come from `fewstep train` on that very single-file checkpoint. A probe
extension records every UNet pass.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from fewstep.core.adapter_file import AdapterMetadata, read_adapter, write_adapter
from fewstep.core.lora import LoraModule, write_lora
from fewstep.extension_a1111.lora_networks import lora_module_count
from fewstep.training.cli import main

from .adapter_fuzz import PROJECT_ERRORS, host_cases
from .a1111_host import (A1111Server, ForgeServer, a1111, build_checkpoint, build_forge_checkpoint, decode_image,
                         diffusers_config_for, forge, forge_diffusers_config)

pytestmark = [pytest.mark.host, pytest.mark.slow]

FLASH, SUN, GUIDED, GDD = "tiny_flash.safetensors", "tiny_sun.safetensors", "tiny_guided.safetensors", "tiny_gdd.safetensors"
GUIDED_LORA = "tiny_guided_lora.safetensors"
WRONG_BASE = "sdxl_flash.safetensors"
SUN_LAYERS = 4   # the tiny UNet's cross-attention layers: input block 1, the middle block, output blocks 0 and 1


@pytest.fixture(scope="module", params=["a1111", "forge"])
def webui(request, tmp_path_factory):
    host = a1111() if request.param == "a1111" else forge()
    if isinstance(host, str):
        pytest.skip(host)
    root = tmp_path_factory.mktemp(request.param)
    work = root / "work"
    if request.param == "a1111":
        checkpoint = build_checkpoint(host, work / "models")
        config = diffusers_config_for(checkpoint, root / "teacher-config")
    else:
        checkpoint = build_forge_checkpoint(host, work / "models")
        config = forge_diffusers_config(host, root / "teacher-config")
    teacher = ["--teacher", str(checkpoint), "--teacher-config", str(config), "--resolution", "64",
               "--data", str(_small_dataset(root / "data"))]
    # Short runs at a high learning rate, so that the adapters visibly change the model.
    assert main(["train", "flash", *teacher, "--run-dir", str(root / "flash"), "--phase-steps", "1,1,1,1", "--batch-size", "2",
                 "--lora-rank", "4", "--teacher-steps", "4", "--sample-every", "0", "--lr", "1e-2",
                 "--out", str(work / "models" / "Lora" / FLASH)]) == 0
    assert main(["train", "sun", *teacher, "--run-dir", str(root / "sun"), "--steps", "3", "--batch-size", "2",
                 "--msc-batch-size", "1", "--msc-teacher-steps", "4", "--sample-every", "0", "--lr", "1e-2", "--ema-decay", "0",
                 "--out", str(work / "models" / "fewstep" / SUN)]) == 0
    assert main(["train", "guided", *teacher, "--run-dir", str(root / "guided"), "--steps", "4", "--batch-size", "2",
                 "--sample-every", "0", "--lr", "1e-2", "--ema-decay", "0", "--sample-steps", "4",
                 "--out", str(work / "models" / "fewstep" / GUIDED)]) == 0
    assert main(["train", "guided", *teacher, "--run-dir", str(root / "guided-lora"), "--steps", "4", "--batch-size", "2",
                 "--sample-every", "0", "--lr", "1e-2", "--ema-decay", "0", "--sample-steps", "4", "--lora-rank", "4",
                 "--out", str(work / "models" / "fewstep" / GUIDED_LORA)]) == 0
    assert main(["train", "gdd", *teacher, "--run-dir", str(root / "gdd"), "--steps", "2", "--batch-size", "2",
                 "--sample-every", "0", "--lr", "1e-2", "--ema-decay", "0", "--variant", "gdd_i",
                 "--out", str(work / "models" / "fewstep" / GDD)]) == 0
    sdxl = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": LoraModule(torch.zeros(4, 2048), torch.zeros(640, 4), 4.0)}
    write_adapter(work / "models" / "fewstep" / WRONG_BASE, write_lora(sdxl), AdapterMetadata(kind="flash_lora", base="sdxl"))
    server = (A1111Server if request.param == "a1111" else ForgeServer)(host, work, checkpoint)
    yield server
    server.close()
    shutil.rmtree(root / "flash", ignore_errors=True)


def _small_dataset(folder, n=16):
    """A few proxy images with .txt captions: the trainings take a few steps, and encoding the whole proxy set through
    Forge's full-size SD VAE would take most of the test's time."""
    from PIL import Image

    from fewstep.training.data import load_proxy_dataset

    folder.mkdir()
    proxy = load_proxy_dataset("train")
    for i in np.linspace(0, len(proxy) - 1, n).astype(int):
        Image.fromarray(proxy.images[i]).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(proxy.captions[i])
    return folder


def _payload(seed=1, fewstep=None, **overrides) -> dict:
    payload = {"prompt": "a silhouette of a cat", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64,
               "cfg_scale": 7, "sampler_name": "Euler", "seed": seed, "send_images": True, "save_images": False}
    if fewstep is not None:
        payload["alwayson_scripts"] = {"fewstep": {"args": fewstep}}
    return {**payload, **overrides}


def _run(webui: A1111Server, payload: dict, route: str = "txt2img") -> tuple[np.ndarray, str, list[dict], str]:
    """(image, infotext, the UNet passes of this request, its log lines)."""
    passes, log = len(webui.unet_passes()), len(webui.log())
    status, answer = webui.post(f"/sdapi/v1/{route}", payload)
    assert status == 200, (answer, webui.log()[-3000:])
    return (decode_image(answer["images"][0]), json.loads(answer["info"])["infotexts"][0], webui.unet_passes()[passes:],
            webui.log()[log:])


def _options(webui: A1111Server) -> dict:
    """The WebUI's settings, less the checkpoint's hash and hash-suffixed title, which it fills in on its own once the
    checkpoint's hash is computed."""
    return {k: v for k, v in webui.get("/sdapi/v1/options").items() if k not in ("sd_checkpoint_hash", "sd_model_checkpoint")}


def test_the_accordion_script_and_the_samplers_are_registered(webui):
    scripts = webui.get("/sdapi/v1/scripts")
    assert "fewstep" in scripts["txt2img"] and "fewstep" in scripts["img2img"]
    samplers = {s["name"] for s in webui.get("/sdapi/v1/samplers")}
    assert {"FewStep consistency", "FewStep ddim", "FewStep dpmpp_2m"} <= samplers


def test_flash_lora_run_uses_the_files_steps_one_pass_each_and_leaks_nothing(webui):
    options = _options(webui)
    before, before_info, before_passes, _ = _run(webui, _payload())      # before fewstep was ever used
    assert [p["batch"] for p in before_passes] == [2] * 4                 # A1111's CFG: positive and negative together
    image, info, passes, log = _run(webui, _payload(fewstep=[True, FLASH]))
    meta = read_adapter(webui.workdir / "models" / "Lora" / FLASH).metadata
    assert [p["timesteps"] for p in passes] == [[t] for t in meta.timesteps]   # one pass per step, at the file's timesteps
    assert all(p["batch"] == 1 for p in passes)                               # no negative pass
    expected = lora_module_count(read_adapter(webui.workdir / "models" / "Lora" / FLASH))
    assert f"fewstep: LoRA tiny_flash: {expected} of {expected} modules applied" in log
    assert "fewstep: tiny_flash.safetensors" in info and "Sampler: FewStep consistency" in info
    assert "Skip Early CFG" not in info and re.search(r"CFG scale: 1(\.0)?,", info)
    assert (image.astype(int) - before.astype(int)).any()
    after, after_info, after_passes, _ = _run(webui, _payload())
    assert np.array_equal(after, before) and after_info == before_info and len(after_passes) == 4
    assert _options(webui) == options


def test_sun_adapter_reads_the_negative_prompt_in_one_pass(webui):
    weak, _, _, _ = _run(webui, _payload(fewstep=[True, SUN, 1.0, 0, 0.0]))
    image, info, passes, log = _run(webui, _payload(fewstep=[True, SUN, 1.0, 0, 1.5]))
    assert [p["timesteps"] for p in passes] == [[999], [749], [499], [249]] and all(p["batch"] == 1 for p in passes)
    assert f"fewstep: SUN adapter ran on {SUN_LAYERS} cross-attention layers with the negative prompt" in log
    assert "fewstep negative strength: 1.5" in info and "Sampler: FewStep dpmpp_2m" in info
    assert (image.astype(int) - weak.astype(int)).any()     # the negative prompt, through the adapter, changes the image


@pytest.mark.parametrize("name", [GUIDED, GUIDED_LORA])
def test_a_guided_student_takes_w_and_leaves_the_weights_as_they_were(webui, name):
    before, before_info, _, _ = _run(webui, _payload(seed=5))
    low, info, passes, log = _run(webui, _payload(seed=5, fewstep=[True, name, 1.0, 0, 1.0, 2.0]))
    high, _, _, _ = _run(webui, _payload(seed=5, fewstep=[True, name, 1.0, 0, 1.0, 8.0]))
    adapter = read_adapter(webui.workdir / "models" / "fewstep" / name)
    meta = adapter.metadata
    if meta.lora_weights:   # the host's own LoRA loader applies every module; the w projection is ours
        count = lora_module_count(adapter)
        assert f"fewstep: LoRA {name[:-12]}: {count} of {count} modules applied" in log
    assert [p["timesteps"] for p in passes] == [[t] for t in meta.timesteps_for(meta.steps)]
    assert all(p["batch"] == 1 for p in passes)
    assert "fewstep w: 2.0" in info and f"Sampler: FewStep {meta.sampler}" in info
    assert (low.astype(int) - high.astype(int)).any()       # w is an input of the student
    assert (low.astype(int) - before.astype(int)).any()
    after, after_info, _, _ = _run(webui, _payload(seed=5))
    assert np.array_equal(after, before) and after_info == before_info   # the UNet's own weights are back


def test_a_gdd_generator_samples_in_one_pass_and_leaves_the_weights_as_they_were(webui):
    before, before_info, _, _ = _run(webui, _payload(seed=6))
    image, info, passes, _ = _run(webui, _payload(seed=6, fewstep=[True, GDD]))
    assert [p["timesteps"] for p in passes] == [[999]] and passes[0]["batch"] == 1
    assert "Sampler: FewStep onestep" in info and (image.astype(int) - before.astype(int)).any()
    after, after_info, _, _ = _run(webui, _payload(seed=6))
    assert np.array_equal(after, before) and after_info == before_info


def test_hires_fix_and_img2img_keep_few_steps(webui):
    # Forge's API leaves the hires pass's module choice at None, which its hires pass cannot read: the UI's default.
    forge_default = {"hr_additional_modules": ["Use same choices"]} if isinstance(webui, ForgeServer) else {}
    hires, info, passes, log = _run(webui, _payload(fewstep=[True, FLASH], enable_hr=True, hr_scale=2,
                                                    hr_upscaler="Latent", denoising_strength=0.5, **forge_default))
    assert hires.shape == (128, 128, 3)
    first, second = [p for p in passes if p["size"] == [8, 8]], [p for p in passes if p["size"] == [16, 16]]
    assert len(first) == 4 and 1 <= len(second) <= 4 and all(p["batch"] == 1 for p in passes)
    assert log.count("fewstep: LoRA tiny_flash:") == 2 and "match no layer" not in log   # both passes carry the LoRA
    import base64
    import io

    from PIL import Image

    def png(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    source = hires[:64, :64].copy()
    init = png(source)
    _, info, passes, _ = _run(webui, _payload(fewstep=[True, FLASH], init_images=[init], denoising_strength=0.5), "img2img")
    assert 1 <= len(passes) < 4 and all(p["batch"] == 1 for p in passes)
    assert passes[0]["timesteps"][0] < 999
    # Inpainting: the left half repainted in a few passes, the right half the source's pixels (the WebUI's overlay).
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    inpainted, _, passes, _ = _run(webui, _payload(fewstep=[True, FLASH], init_images=[init], mask=png(mask), mask_blur=0,
                                                   inpainting_fill=1, denoising_strength=0.75), "img2img")
    assert 1 <= len(passes) <= 4 and all(p["batch"] == 1 for p in passes)
    assert np.array_equal(inpainted[:, 32:], source[:, 32:])
    assert (inpainted[:, :32].astype(int) - source[:, :32].astype(int)).any()


def test_an_adapter_for_another_base_stops_the_run_with_the_reason(webui):
    status, answer = webui.post("/sdapi/v1/txt2img", _payload(fewstep=[True, WRONG_BASE]))
    assert status != 200
    assert re.search(r"sdxl", json.dumps(answer)), answer
    # The next request without fewstep is unaffected.
    _, _, passes, _ = _run(webui, _payload())
    assert len(passes) == 4 and passes[0]["batch"] == 2


def test_broken_and_hostile_adapter_files_stop_the_run_with_one_line(webui):
    """One file of every tensor mutation and every kind (tests/adapter_fuzz.py) made from this host's own Flash LoRA and
    SUN adapter: each run gives an image or stops with the project's one-line error, and leaves nothing behind."""
    options = _options(webui)
    models = webui.workdir / "models"
    outcomes = {}
    for label, path in host_cases({"flash": models / "Lora" / FLASH, "sun": models / "fewstep" / SUN}, models / "fewstep"):
        status, answer = webui.post("/sdapi/v1/txt2img", _payload(fewstep=[True, path.name]))
        if status == 200:
            assert np.isfinite(decode_image(answer["images"][0])).all(), label
            outcomes[label] = "samples"
        else:
            # The extension reports every refusal as its RunError, "fewstep: <the reason>".
            assert answer.get("error") in ("RunError", *PROJECT_ERRORS) and str(answer.get("errors")).startswith("fewstep: "), (label, answer)
            assert "\n" not in str(answer.get("errors", "")).strip(), (label, answer)
            outcomes[label] = "refused"
        path.unlink()
    print(f"{len(outcomes)} files: {list(outcomes.values()).count('samples')} sample, {list(outcomes.values()).count('refused')} refused")
    assert set(outcomes.values()) == {"samples", "refused"}
    assert _options(webui) == options
    _, _, passes, _ = _run(webui, _payload())
    assert [p["batch"] for p in passes] == [2] * 4


def test_a_run_that_fails_after_set_up_leaves_the_settings_as_saved(webui):
    """A fewstep run that fails after set-up (a bad hires upscaler fails in p.init; an out-of-memory would in sampling)
    must leave skip_early_cond as the user saved it: saving the settings then would write it to config.json, and every
    plain run after a restart would ignore the negative prompt."""
    options = _options(webui)
    status, answer = webui.post("/sdapi/v1/txt2img", _payload(fewstep=[True, FLASH], enable_hr=True, hr_scale=2,
                                                              hr_upscaler="no such upscaler", denoising_strength=0.5))
    assert status != 200 and "no such upscaler" in json.dumps(answer), answer
    assert _options(webui) == options
    # Saving the settings now (any change, from the UI or the API) writes what the WebUI holds to config.json.
    status, answer = webui.post("/sdapi/v1/options", {"samples_format": options["samples_format"]})
    assert status == 200, answer
    saved = json.loads((webui.workdir / "config.json").read_text())
    assert saved.get("skip_early_cond", 0.0) == options["skip_early_cond"] == 0.0
    # And a plain run still runs the negative pass on every step.
    _, _, passes, _ = _run(webui, _payload())
    assert [p["batch"] for p in passes] == [2] * 4
