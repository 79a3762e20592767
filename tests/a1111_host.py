"""A real AUTOMATIC1111 WebUI for host tests: where it is, a tiny SD1.5 checkpoint it accepts, a headless API server on
loopback, and a probe extension that records every UNet pass.

The WebUI is never installed into the project (../shared/hosts/a1111/README.md says how to set one up offline):
A1111_PATH points at the webui tree, A1111_PYTHON at its venv's interpreter, A1111_STUBS at the merged torchvision
import stubs (server process only), A1111_HF_HOME at the offline CLIP tokenizer cache, A1111_TOOLS at the folder
holding make_tiny_sd15.py (default ../shared/hosts/a1111).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import yaml

from .host_server import HostServer, free_port

SHARED_HOSTS = Path(__file__).resolve().parents[2] / "shared" / "hosts"
REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = "tiny_sd15"

# What the probe extension records: one line per UNet forward (batch size, timesteps, latent size).
PROBE = '''
import json, os
from modules import scripts, shared

hook = []   # a failed request never reaches postprocess: the next one removes its hook


class UnetPassProbe(scripts.Script):
    def title(self):
        return "unet pass probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        while hook:
            hook.pop().remove()
        unet = shared.sd_model.model.diffusion_model

        def record(module, args, kwargs):
            x = args[0]
            timesteps = args[1] if len(args) > 1 else kwargs.get("timesteps")
            with open(os.environ["UNET_PROBE_LOG"], "a") as f:
                f.write(json.dumps({"batch": x.shape[0], "size": list(x.shape[-2:]),
                                    "timesteps": [round(float(t)) for t in timesteps]}) + "\\n")

        hook.append(unet.register_forward_pre_hook(record, with_kwargs=True))

    def postprocess(self, p, processed, *args):
        while hook:
            hook.pop().remove()
'''


def a1111() -> dict | str:
    """The WebUI's locations, or the reason host tests skip."""
    env = {name: os.environ.get(name) for name in ("A1111_PATH", "A1111_PYTHON", "A1111_STUBS", "A1111_HF_HOME")}
    missing = [name for name, value in env.items() if not value]
    if missing:
        return (f"{', '.join(missing)} not set: no A1111 WebUI to test in (../shared/hosts/a1111/README.md says how to "
                "set one up offline)")
    if not (Path(env["A1111_PATH"]) / "launch.py").is_file():
        return f"A1111_PATH={env['A1111_PATH']} holds no launch.py"
    tools = Path(os.environ.get("A1111_TOOLS", SHARED_HOSTS / "a1111"))
    if not (tools / "make_tiny_sd15.py").is_file():
        return f"make_tiny_sd15.py is not in {tools}; set A1111_TOOLS"
    return {**env, "A1111_TOOLS": str(tools)}


def build_checkpoint(host: dict, models: Path) -> Path:
    """models/Stable-diffusion/tiny_sd15.safetensors (+ .yaml, + tiny_sd15-clip/), written by the WebUI's own LDM code."""
    folder = models / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    webui = Path(host["A1111_PATH"])
    env = {**os.environ, "HF_HOME": host["A1111_HF_HOME"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": f"{webui / 'repositories' / 'stable-diffusion-stability-ai'}{os.pathsep}{host['A1111_STUBS']}"}
    done = subprocess.run([host["A1111_PYTHON"], str(Path(host["A1111_TOOLS"]) / "make_tiny_sd15.py"), str(folder / CHECKPOINT),
                           "--clip-layers", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / f"{CHECKPOINT}.safetensors"


def diffusers_config_for(checkpoint: Path, out: Path) -> Path:
    """A diffusers pipeline folder with the tiny checkpoint's architecture (read from its .yaml), whose configs and
    tokenizer let fewstep load the single file as a teacher (weights here are random and unused)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fewstep.training.tiny_models import sd_scheduler_config

    params = yaml.safe_load(checkpoint.with_suffix(".yaml").read_text())["model"]["params"]
    unet, vae = params["unet_config"]["params"], params["first_stage_config"]["params"]["ddconfig"]
    levels = len(unet["channel_mult"])
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            sample_size=8, block_out_channels=tuple(unet["model_channels"] * m for m in unet["channel_mult"]),
            layers_per_block=unet["num_res_blocks"], cross_attention_dim=unet["context_dim"], attention_head_dim=unet["num_heads"],
            down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels),
        vae=AutoencoderKL(block_out_channels=tuple(vae["ch"] * m for m in vae["ch_mult"]), layers_per_block=vae["num_res_blocks"],
                          down_block_types=("DownEncoderBlock2D",) * len(vae["ch_mult"]),
                          up_block_types=("UpDecoderBlock2D",) * len(vae["ch_mult"]), latent_channels=vae["z_channels"],
                          sample_size=64),
        text_encoder=CLIPTextModel(CLIPTextConfig(**json.loads((checkpoint.parent / f"{CHECKPOINT}-clip" / "config.json").read_text())["text_config"])),
        tokenizer=CLIPTokenizer.from_pretrained(checkpoint.parent / f"{CHECKPOINT}-clip", model_max_length=77),
        scheduler=DDIMScheduler(**sd_scheduler_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


class A1111Server(HostServer):
    """``launch.py --api --nowebui`` on 127.0.0.1 with WORKDIR as its data dir; fewstep's extension linked in."""

    name, ready_route = "A1111", "/sdapi/v1/sd-models"

    def __init__(self, host: dict, workdir: Path, checkpoint: Path):
        self.workdir = workdir
        extensions = workdir / "extensions"
        (extensions / "unet_probe" / "scripts").mkdir(parents=True, exist_ok=True)
        (extensions / "unet_probe" / "scripts" / "unet_probe.py").write_text(PROBE)
        (extensions / "fewstep").symlink_to(REPO / "extension_a1111", target_is_directory=True)
        self.probe_log = workdir / "unet_passes.jsonl"
        env = {**os.environ, "HF_HOME": host["A1111_HF_HOME"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": host["A1111_STUBS"], "UNET_PROBE_LOG": str(self.probe_log)}
        port = free_port()
        self.start([host["A1111_PYTHON"], "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-version-check",
                    "--skip-python-version-check", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half",
                    "--no-download-sd-model", "--api", "--nowebui", "--server-name", "127.0.0.1", "--port", str(port),
                    "--data-dir", str(workdir), "--ckpt", str(checkpoint)],
                   host["A1111_PATH"], env, workdir / "a1111.log", port)

    def unet_passes(self) -> list[dict]:
        return [json.loads(line) for line in self.probe_log.read_text().splitlines()] if self.probe_log.exists() else []


def decode_image(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
