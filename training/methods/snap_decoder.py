"""SnapFusion's efficient decoder, the training: the pruned VAE decoder (``training/pruned_decoder.py``, started from
the original weights sliced to the first channels of every layer) distilled from the original decoder by MSE on
latents the teacher generates (no images needed); the distillation repairs what slicing broke.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ...core.adapter_file import atomic_write
from ..pruned_decoder import PrunedDecoder, prune_decoder
from ..driver import start_run, train_and_export
from ..options import OptimiserOptions, load_options, option, positive_float, replace_options

log = logging.getLogger("fewstep")

DECODER_CONFIG_KEY = "fewstep.decoder_config"   # safetensors metadata of a decoder file: the Decoder's config (JSON)


@dataclass
class DecoderConfig(OptimiserOptions):
    """The efficient decoder's options (SnapFusion prunes half of the channels; the rest are ours)."""

    keep: float = option(0.5, "share of each level's channels kept")
    latents: int = option(2000, "teacher-generated latents to distil on")
    latent_steps: int = option(25, "DDIM steps of the teacher's latents")
    latent_cfg_scale: float = option(7.5, "CFG scale of the teacher's latents")
    steps: int = 5000
    lr: float = option(1e-4, "learning rate (the pruned decoder)", parse=positive_float)
    warmup_steps: int = 100

    def validate(self) -> None:
        problems = []
        if not 0.0 < self.keep <= 1.0:
            problems.append("keep must lie in (0, 1]")
        if min(self.latents, self.latent_steps, self.steps, self.batch_size) < 1 or self.lr <= 0:
            problems.append("latents, latent_steps, steps, batch_size and lr must be positive")
        if problems:
            raise ValueError("invalid decoder configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "DecoderConfig":
        return replace_options(self, "decoder", **changes)


PRESETS = {
    "paper": DecoderConfig(),
    "proxy": DecoderConfig(latents=1000, latent_cfg_scale=4.0, steps=1500, lr=1e-3, batch_size=32, warmup_steps=50),
}


def load_config(preset: str = "paper", config_file: Optional[str | Path] = None, **overrides) -> DecoderConfig:
    return load_options(PRESETS, "decoder", preset, config_file, **overrides)


class DecoderDistillation(torch.nn.Module):
    """The pruned decoder against the frozen original on the same latents: per-sample pixel MSE."""

    def __init__(self, vae, config: DecoderConfig):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.student = prune_decoder(vae, config.keep).requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        return self

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        z = batch["latents"] / self.vae.config.scaling_factor
        with torch.no_grad():
            target = self.vae.decode(z).sample
        return {"loss": (self.student(z).float() - target.float()).pow(2).flatten(1).mean(1)}


@torch.no_grad()
def teacher_latents(pipe, captions, count: int, steps: int, cfg_scale: float, batch_size: int = 250,
                    seed: int = 0, progress: bool = True) -> torch.Tensor:
    """``count`` latents the teacher samples (DDIM with CFG) for captions drawn in turn from ``captions``: sample i
    takes caption i (the list repeats) and seed ``seed`` + i, as `fewstep synth` does."""
    from tqdm.auto import tqdm

    from .. import synth

    chunks = []
    for start in tqdm(range(0, count, batch_size), desc="teacher latents", disable=not progress):
        chosen = range(start, min(start + batch_size, count))
        chunks.append(synth.teacher_latents(pipe, [captions[i % len(captions)] for i in chosen], [seed + i for i in chosen],
                                            steps, cfg_scale))
    return torch.cat(chunks)


def write_decoder(decoder: PrunedDecoder, path: str | Path, provenance: dict) -> None:
    """The pruned decoder as safetensors (fp16) with its config in the metadata; written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in decoder.state_dict().items()}
    metadata = {DECODER_CONFIG_KEY: json.dumps(decoder.config), "fewstep.provenance": json.dumps(provenance)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_decoder(path: str | Path) -> PrunedDecoder:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if DECODER_CONFIG_KEY not in metadata:
            raise ValueError(f"{Path(path).name}: not a fewstep decoder file (no {DECODER_CONFIG_KEY} metadata)")
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    decoder = PrunedDecoder(json.loads(metadata[DECODER_CONFIG_KEY]))
    decoder.load_state_dict(tensors)
    return decoder.eval()


def train_decoder(
    teacher: str | Path,                     # the pipeline whose VAE decoder is pruned and whose UNet makes the latents
    run_dir: str | Path,                     # checkpoints, logs, the latents
    out: str | Path,                         # the pruned decoder file
    config: DecoderConfig = DecoderConfig(),
    data="proxy",                            # only its captions are used: the prompts of the teacher's latents
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """Prune the decoder to ``config.keep`` of its channels and distil it on teacher-generated latents."""
    method = start_run(teacher, data, run_dir, out, config, resolution, teacher_config, **run_options)
    run_dir, run, setup, pipe = method.run_dir, method.run, method.setup, method.setup.pipe
    cached = run_dir / "teacher_latents.pt"
    if cached.is_file():
        latents = torch.load(cached, map_location="cpu", weights_only=True)   # a tensor: never unpickle
    else:
        latents = teacher_latents(pipe, setup.captions, config.latents, config.latent_steps, config.latent_cfg_scale,
                                  seed=run.seed, progress=run.progress)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, lambda tmp: torch.save(latents, tmp))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = DecoderDistillation(pipe.vae, config)
    full, pruned = (sum(p.numel() for p in m.parameters()) for m in (pipe.vae.decoder, model.student.decoder))
    log.info("pruned decoder: %s parameters (the original's %s)", f"{pruned:,}", f"{full:,}")

    def batch_fn(gen):
        return {"latents": latents[torch.randint(0, len(latents), (config.batch_size,), generator=gen)]}

    made = {"method": "snapfusion_decoder", "teacher": str(teacher), "keep": config.keep, "train_steps": config.steps,
            "latents": config.latents, "parameters": pruned, "original_parameters": full}
    return train_and_export(method, "decoder", model, lambda m: write_decoder(m.student, method.out, made), "decoder",
                            batch_fn=batch_fn)

