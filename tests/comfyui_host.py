"""A real ComfyUI for host tests: where it is, a tiny SD1.5 checkpoint it detects, a headless server on loopback.

ComfyUI is never installed into the project: COMFYUI_PATH points at a checkout (see ../shared/hosts/README.md),
COMFYUI_PYTHON at an interpreter that has its requirements (default: this one), COMFYUI_STUBS at the
torchvision/torchaudio import stubs, which go on the ComfyUI processes' PYTHONPATH only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .host_server import HostServer, free_port

STUBS_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "hosts" / "stubs"

# The tiny checkpoint's UNet: what ComfyUI's SD15 detection pins (model_channels 320, context 768, conv
# proj_in), one level with one res block. LDM unet_config for comfy.utils.unet_to_diffusers.
TINY_SD15_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320,), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                      cross_attention_dim=768, attention_head_dim=8)
TINY_SD15_LDM = dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                     transformer_depth_middle=1)


SETUP = ("set COMFYUI_PATH to a ComfyUI checkout, COMFYUI_STUBS to shared/hosts/stubs (the torchvision/torchaudio "
         f"import stubs; default {STUBS_DEFAULT}) and, if this interpreter lacks ComfyUI's requirements, COMFYUI_PYTHON "
         "to one that has them; shared/hosts/README.md says how to set ComfyUI up offline")


def comfyui() -> tuple[str, str, Path] | str:
    """(checkout, python, stubs), or the reason host tests skip, naming what to set."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return f"COMFYUI_PATH is not set: no ComfyUI to test in; {SETUP}"
    if not (Path(path) / "main.py").is_file():
        return f"COMFYUI_PATH={path} holds no ComfyUI main.py; {SETUP}"
    stubs = Path(os.environ.get("COMFYUI_STUBS", STUBS_DEFAULT))
    if not stubs.is_dir():
        where = f"COMFYUI_STUBS={stubs}" if "COMFYUI_STUBS" in os.environ else f"COMFYUI_STUBS is not set and {stubs}"
        return f"{where} is no folder (this checkout is not beside shared/?); {SETUP}"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    if shutil.which(python) is None:
        return f"COMFYUI_PYTHON={python} is no interpreter; {SETUP}"
    return path, python, stubs


def comfy_env(path: str, stubs: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{stubs}", "PYTHONDONTWRITEBYTECODE": "1"}


def build_tiny_sd15_teacher(folder: Path) -> Path:
    """A diffusers SD1.5 pipeline with the tiny checkpoint's UNet and the real CLIP-L text encoder shape (random
    weights: ComfyUI always builds all 12 layers and leaves missing ones uninitialised)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fewstep.training.tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**TINY_SD15_UNET).eval()
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID, hidden_act="quick_gelu")).eval()
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)
    pipe.save_pretrained(folder)
    return folder


# Runs in a ComfyUI process: the teacher's UNet under ComfyUI's own LDM names, its text encoder, a TAESD VAE.
_TO_CHECKPOINT = """
import json, sys
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch, comfy.utils, comfy.taesd.taesd
from safetensors.torch import load_file, save_file
folder, out, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
unet = load_file(folder + "/unet/diffusion_pytorch_model.safetensors")
ldm = comfy.utils.unet_to_diffusers(config)
missing = sorted(set(unet) - set(ldm))
assert not missing, missing[:5]
sd = {"model.diffusion_model." + ldm[k]: v for k, v in unet.items()}
sd.update({"cond_stage_model.transformer." + k: v for k, v in load_file(folder + "/text_encoder/model.safetensors").items()})
# ComfyUI builds layers uninitialised: give TAESD scaled random convolutions, zero biases and a mid-grey output.
torch.manual_seed(0)
vae = {}
for k, v in comfy.taesd.taesd.TAESD().state_dict().items():
    v = torch.randn(v.shape) / v[0].numel() ** 0.5 if v.ndim == 4 else torch.zeros(v.shape)
    vae[k] = v
vae["vae_scale"], vae["taesd_decoder.19.bias"] = torch.tensor(1.0), vae["taesd_decoder.19.bias"] + 0.5
sd.update({"first_stage_model." + k: v for k, v in vae.items()})
save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}, out)
print(len(sd))
"""


def write_checkpoint(teacher: Path, out: Path, path: str, python: str, stubs: Path) -> Path:
    done = subprocess.run([python, "-c", _TO_CHECKPOINT, str(teacher), str(out), json.dumps(TINY_SD15_LDM)], cwd=path,
                          env=comfy_env(path, stubs), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


class ComfyServer(HostServer):
    """ComfyUI headless on CPU on 127.0.0.1, with this repository linked as custom_nodes/fewstep."""

    name, ready_route = "ComfyUI", "/system_stats"

    def __init__(self, workdir: Path, path: str, python: str, stubs: Path):
        self.workdir = workdir
        (workdir / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = workdir / "custom_nodes" / "fewstep"
        if not link.exists():
            link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
        port = free_port()
        self.start([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
                    "--base-directory", str(workdir), "--database-url", "sqlite:///:memory:", "--verbose", "DEBUG"],
                   path, comfy_env(path, stubs), workdir / "comfyui.log", port, timeout=240.0)

    def run(self, graph: dict, timeout: float = 300.0, workflow: dict | None = None) -> dict:
        """Queue an API-format graph and wait for its history entry; with ``workflow`` (its UI format), the saved
        PNGs carry it, as when the canvas queues a prompt."""
        body = {"prompt": graph}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        status, answer = self.post("/prompt", body)
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the graph:\n{self.log()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"graph did not finish in {timeout:.0f} s:\n{self.log()[-3000:]}")


def copy_into(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, folder / src.name))
