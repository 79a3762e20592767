"""The on-disk format of a set the teacher synthesized (``fewstep synth``): its settings file, its latent chunks, and
reading it back. ``synth.py`` writes such sets; ``data``, the training data loader and ``bench`` read them.

Two layouts: ``images`` (``000000.png`` with ``000000.txt``, its caption, and ``000000.json``, its seed and
settings) and ``latents`` (``latents-<first index>.safetensors`` per chunk: tensor ``latents``, scaled as the UNet
sees them; metadata: the samples' indices, captions and seeds). ``fewstep_synth.json`` records the settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SETTINGS_FILE = "fewstep_synth.json"
COST_LOG = "synth_log.jsonl"
LAYOUTS = ("images", "latents")


class SynthError(ValueError):
    """A synthesized set cannot be written or read as asked (prompts, folder, settings)."""


@dataclass(frozen=True)
class SynthSettings:
    """What a synthesized set is made with; two runs into one folder must agree on all of it but ``count``."""

    teacher: str
    base: str
    prompts: str            # the prompt file or built-in set the captions came from
    count: int              # samples in the set
    steps: int = 25         # teacher sampling steps (DDIM, trailing timesteps)
    cfg_scale: float = 7.5  # diffusers convention (1: no guidance)
    negative: str = ""      # the unconditional prompt of CFG
    seed: int = 0           # sample i has seed seed + i
    layout: str = "images"  # images | latents

    def differences(self, other: "SynthSettings") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{k} {theirs[k]!r} (now {mine[k]!r})" for k in mine if k != "count" and mine[k] != theirs[k]]


def done_indices(out: Path) -> set[int]:
    """The samples already in ``out`` (complete ones only)."""
    done = {int(p.stem) for p in out.glob("[0-9]*.txt") if p.with_suffix(".png").is_file()}
    for chunk in out.glob("latents-*.safetensors"):
        done.update(_chunk_metadata(chunk)["indices"])
    return done


def _chunk_metadata(path: Path) -> dict:
    from ..core.adapter_file import read_header

    return json.loads(read_header(path).metadata["fewstep.synth"])


def synth_cost(path: str | Path) -> dict:
    """Samples written and device-seconds spent on them, over every chunk that went into the set at ``path``."""
    chunks = [json.loads(line) for line in (Path(path) / COST_LOG).read_text().splitlines() if line.strip()]
    written, seconds = sum(c["written"] for c in chunks), sum(c["seconds"] for c in chunks)
    return {"samples": written, "seconds": round(seconds, 1), "seconds_per_sample": round(seconds / written, 4) if written else None,
            "devices": sorted({c["device"] for c in chunks})}


@dataclass
class SynthLatents:
    """A synthesized set in the latents layout: ``latents`` (N, C, H, W) as the UNet sees them, one caption each."""

    latents: torch.Tensor
    captions: list[str]
    settings: SynthSettings

    def __len__(self) -> int:
        return len(self.captions)


def synth_settings(path: str | Path) -> dict | None:
    """The settings of a ``fewstep synth`` folder and the folder itself (``path``); None for any other dataset."""
    settings = Path(path) / SETTINGS_FILE
    return {**json.loads(settings.read_text()), "path": str(path)} if settings.is_file() else None


def read_latent_set(path: str | Path) -> SynthLatents:
    """Every chunk of a latents-layout folder, in sample order; a gap (an unfinished run) is named, not skipped."""
    from safetensors.torch import load_file

    path = Path(path)
    settings = SynthSettings(**json.loads((path / SETTINGS_FILE).read_text()))
    by_index: dict[int, tuple[torch.Tensor, str]] = {}
    for chunk in sorted(path.glob("latents-*.safetensors")):
        meta = _chunk_metadata(chunk)
        latents = load_file(str(chunk))["latents"]
        by_index.update({i: (z, c) for i, z, c in zip(meta["indices"], latents, meta["captions"])})
    missing = settings.count - len(by_index)
    if missing:
        raise SynthError(f"{path}: {missing} of {settings.count} samples are not written yet: rerun the same "
                         "`fewstep synth` command to finish the set")
    order = sorted(by_index)
    return SynthLatents(torch.stack([by_index[i][0] for i in order]), [by_index[i][1] for i in order], settings)
