"""Real AUTOMATIC1111 and Forge WebUIs for host tests: where they are, a tiny SD1.5 checkpoint each accepts, a headless
API server on loopback, and a probe extension that records every UNet pass.

The WebUIs are never installed into the project (../shared/hosts/a1111/README.md and ../shared/hosts/forge/README.md
say how to set them up offline). A1111: A1111_PATH points at the webui tree, A1111_PYTHON at its venv's interpreter,
A1111_STUBS at the merged torchvision import stubs (server process only), A1111_HF_HOME at the offline CLIP tokenizer
cache, A1111_TOOLS at the folder holding make_tiny_sd15.py (default ../shared/hosts/a1111). Forge: FORGE_PATH,
FORGE_PYTHON, FORGE_STUBS, FORGE_HF_GUESS (the folder holding the huggingface_guess package), FORGE_TOOLS (the folder
holding make_tiny_sd15_forge.py, default ../shared/hosts/forge).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
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
        model = shared.sd_model
        unet = model.forge_objects.unet.model.diffusion_model if hasattr(model, "forge_objects") else model.model.diffusion_model

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


_MEANING = {"PATH": "the webui tree", "PYTHON": "its venv's interpreter", "STUBS": "the merged torchvision import stubs",
            "HF_HOME": "the offline CLIP tokenizer cache", "HF_GUESS": "the folder holding the huggingface_guess package"}


def _setup(prefix: str, names: tuple[str, ...], folder: str, tool: str, tools: Path) -> str:
    """What to set for ``prefix``'s host tests, in one line."""
    wanted = ", ".join(f"{prefix}_{n} ({_MEANING[n]})" for n in names)
    return (f"set {wanted}, and {prefix}_TOOLS (the folder holding {tool}; default {tools}, beside this checkout); "
            f"shared/hosts/{folder}/README.md says how to set one up offline")


def _locate(prefix: str, names: tuple[str, ...], folder: str, tool: str) -> dict | str:
    """The host's locations from PREFIX_* variables, or the reason host tests skip, naming what to set."""
    env = {name: os.environ.get(name) for name in (f"{prefix}_{n}" for n in names)}
    tools = Path(os.environ.get(f"{prefix}_TOOLS", SHARED_HOSTS / folder))
    setup = _setup(prefix, names, folder, tool, SHARED_HOSTS / folder)
    missing = [name for name, value in env.items() if not value]
    if missing:
        return f"{', '.join(missing)} not set: no {folder} WebUI to test in; {setup}"
    if not (Path(env[f"{prefix}_PATH"]) / "launch.py").is_file():
        return f"{prefix}_PATH={env[f'{prefix}_PATH']} holds no launch.py; {setup}"
    absent = [f"{prefix}_{n}={env[f'{prefix}_{n}']}" for n in names if n != "PATH"
              and not (shutil.which(env[f"{prefix}_{n}"]) if n == "PYTHON" else Path(env[f"{prefix}_{n}"]).exists())]
    if absent:
        return f"{', '.join(absent)}: no such file or folder; {setup}"
    if not (tools / tool).is_file():
        where = f"{prefix}_TOOLS={tools}" if f"{prefix}_TOOLS" in os.environ else f"{prefix}_TOOLS is not set and {tools}"
        return f"{where} holds no {tool} (this checkout is not beside shared/?); {setup}"
    return {**env, f"{prefix}_TOOLS": str(tools)}


def a1111() -> dict | str:
    return _locate("A1111", ("PATH", "PYTHON", "STUBS", "HF_HOME"), "a1111", "make_tiny_sd15.py")


def forge() -> dict | str:
    return _locate("FORGE", ("PATH", "PYTHON", "STUBS", "HF_GUESS"), "forge", "make_tiny_sd15_forge.py")


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


def build_forge_checkpoint(host: dict, models: Path) -> Path:
    """models/Stable-diffusion/tiny_sd15.safetensors built with Forge's own network classes: a one-level UNet, the real
    SD VAE and CLIP-L shapes (Forge builds those two from the configs in its tree)."""
    folder = models / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FORGE_DIR": host["FORGE_PATH"], "HF_GUESS_DIR": host["FORGE_HF_GUESS"],
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": host["FORGE_STUBS"]}
    done = subprocess.run([host["FORGE_PYTHON"], str(Path(host["FORGE_TOOLS"]) / "make_tiny_sd15_forge.py"),
                           str(folder / CHECKPOINT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / f"{CHECKPOINT}.safetensors"


def _tiny_unet(unet: dict):
    from diffusers import UNet2DConditionModel

    levels = len(unet["channel_mult"])
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=tuple(unet["model_channels"] * m for m in unet["channel_mult"]),
        layers_per_block=unet["num_res_blocks"], cross_attention_dim=unet["context_dim"], attention_head_dim=unet["num_heads"],
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels)


def _save_pipeline(out: Path, unet, vae, text_encoder, tokenizer) -> Path:
    """A diffusers pipeline folder whose configs and tokenizer let fewstep load a single-file checkpoint of the same
    architecture as a teacher (the weights written here are random and unused)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from fewstep.training.tiny_models import sd_scheduler_config

    StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**sd_scheduler_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(out)
    return out


def diffusers_config_for(checkpoint: Path, out: Path) -> Path:
    """The pipeline folder for A1111's tiny checkpoint: its architecture read from its .yaml."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    params = yaml.safe_load(checkpoint.with_suffix(".yaml").read_text())["model"]["params"]
    unet, vae = params["unet_config"]["params"], params["first_stage_config"]["params"]["ddconfig"]
    torch.manual_seed(0)
    clip = checkpoint.parent / f"{CHECKPOINT}-clip"
    return _save_pipeline(
        out, _tiny_unet(unet),
        AutoencoderKL(block_out_channels=tuple(vae["ch"] * m for m in vae["ch_mult"]), layers_per_block=vae["num_res_blocks"],
                      down_block_types=("DownEncoderBlock2D",) * len(vae["ch_mult"]),
                      up_block_types=("UpDecoderBlock2D",) * len(vae["ch_mult"]), latent_channels=vae["z_channels"],
                      sample_size=64),
        CLIPTextModel(CLIPTextConfig(**json.loads((clip / "config.json").read_text())["text_config"])),
        CLIPTokenizer.from_pretrained(clip, model_max_length=77))


def forge_diffusers_config(host: dict, out: Path) -> Path:
    """The pipeline folder for Forge's tiny checkpoint: make_tiny_sd15_forge.py's UNet, and the SD1.5 VAE, text encoder
    and tokenizer configs Forge ships in its tree."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd15 = Path(host["FORGE_PATH"]) / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
    torch.manual_seed(0)
    unet = {"model_channels": 320, "channel_mult": [1], "num_res_blocks": 1, "context_dim": 768, "num_heads": 8}
    return _save_pipeline(out, _tiny_unet(unet), AutoencoderKL.from_config(AutoencoderKL.load_config(sd15 / "vae")),
                          CLIPTextModel(CLIPTextConfig.from_pretrained(sd15 / "text_encoder")),
                          CLIPTokenizer.from_pretrained(sd15 / "tokenizer"))


LAUNCH = ["launch.py", "--skip-prepare-environment", "--skip-install", "--skip-version-check", "--skip-python-version-check",
          "--skip-torch-cuda-test", "--api", "--nowebui", "--server-name", "127.0.0.1"]


class A1111Server(HostServer):
    """``launch.py --api --nowebui`` on 127.0.0.1 with WORKDIR as its data dir; fewstep's extension linked in. Forge
    starts the same way (``ForgeServer``)."""

    name, ready_route = "A1111", "/sdapi/v1/sd-models"

    def __init__(self, host: dict, workdir: Path, checkpoint: Path):
        port = free_port()
        env = {**os.environ, "HF_HOME": host["A1111_HF_HOME"], "PYTHONPATH": host["A1111_STUBS"]}
        self.launch([host["A1111_PYTHON"], *LAUNCH, "--use-cpu", "all", "--no-half", "--no-download-sd-model",
                     "--port", str(port), "--data-dir", str(workdir), "--ckpt", str(checkpoint)],
                    host["A1111_PATH"], env, workdir, port)

    def launch(self, command: list[str], webui: str, env: dict, workdir: Path, port: int) -> None:
        self.workdir = workdir
        extensions = workdir / "extensions"
        (extensions / "unet_probe" / "scripts").mkdir(parents=True, exist_ok=True)
        (extensions / "unet_probe" / "scripts" / "unet_probe.py").write_text(PROBE)
        (extensions / "fewstep").symlink_to(REPO / "extension_a1111", target_is_directory=True)
        self.probe_log = workdir / "unet_passes.jsonl"
        env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
               "UNET_PROBE_LOG": str(self.probe_log)}
        self.start(command, webui, env, workdir / f"{self.name.lower()}.log", port)

    def unet_passes(self) -> list[dict]:
        return [json.loads(line) for line in self.probe_log.read_text().splitlines()] if self.probe_log.exists() else []


class ForgeServer(A1111Server):
    """Forge: CPU through its own flag; huggingface_guess (which Forge clones at install) on the path; Gradio's
    temporary files in WORKDIR."""

    name = "Forge"

    def __init__(self, host: dict, workdir: Path, checkpoint: Path):
        port = free_port()
        env = {**os.environ, "HF_HOME": str(workdir / "hf"), "GRADIO_TEMP_DIR": str(workdir / "gradio"),
               "PYTHONPATH": os.pathsep.join([host["FORGE_STUBS"], host["FORGE_HF_GUESS"]])}
        self.launch([host["FORGE_PYTHON"], *LAUNCH, "--always-cpu", "--port", str(port), "--data-dir", str(workdir),
                     "--ckpt", str(checkpoint)], host["FORGE_PATH"], env, workdir, port)


def decode_image(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
