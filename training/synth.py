"""A training set written by the teacher itself, from prompts alone (``fewstep synth``, ``train <method> --data-free``).

Sample i takes prompt i (the prompt list repeats when it is shorter than the set) and seed ``seed + i``, so a set is
reproducible and a killed run continues where it stopped: a sample exists once its caption file is written, which
happens last and atomically. Under ``accelerate launch`` process k of P writes the chunks k, k + P, ... of the
missing samples.

Two layouts (``synth_sets`` describes and reads them), both read by every method through
``teacher_data.load_teacher_data``: ``images``, the folder-with-captions layout any trainer reads, and ``latents``, the
teacher's latents without the VAE round trip. A rerun with other settings into the same folder is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .synth_sets import COST_LOG, LAYOUTS, SETTINGS_FILE, SynthError, SynthSettings, done_indices

log = logging.getLogger("fewstep")

BUILTIN_PROMPTS = ("proxy", "proxy-classes")


def read_prompts(source: str) -> list[str]:
    """A text file with one prompt per line (blank lines and lines starting with # skipped), or a built-in set:
    ``proxy`` (the bundled training set's captions, in its order and class mix), ``proxy-classes`` (its 20 classes)."""
    from .data import PROXY_CLASSES, load_proxy_dataset

    if source == "proxy":
        return list(load_proxy_dataset("train").captions)
    if source == "proxy-classes":
        return list(PROXY_CLASSES)
    path = Path(source)
    if not path.is_file():
        raise SynthError(f"prompts {source!r}: no such file and not a built-in set ({', '.join(BUILTIN_PROMPTS)}); "
                         "pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SynthError(f"{path}: holds no prompts (one per line; blank lines and # comments are skipped)")
    return prompts


def synthesize(pipe, settings: SynthSettings, prompts: Sequence[str], out: str | Path, batch_size: int = 16,
               progress: bool = True) -> dict:
    """Write the samples of ``settings.count`` that ``out`` lacks; returns a report (written, already there, seconds)."""
    import time

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from ..core.adapter_file import atomic_write

    if settings.layout not in LAYOUTS:
        raise SynthError(f"layout {settings.layout!r} is not one of {', '.join(LAYOUTS)}")
    # PartialState only reads ACCELERATE_USE_CPU through an Accelerator; without it, CPU processes would each write
    # the whole set.
    out, state = Path(out), PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    _check_settings(out, settings)
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(asdict(settings), indent=2) + "\n"))
    state.wait_for_everyone()
    done = done_indices(out)
    missing = [i for i in range(settings.count) if i not in done]
    chunks = [missing[k:k + batch_size] for k in range(0, len(missing), batch_size)][state.process_index::state.num_processes]
    pipe.to(state.device)
    started = time.perf_counter()
    for chunk in tqdm(chunks, desc="synth", disable=not progress or not state.is_main_process):
        chunk_started = time.perf_counter()
        captions = [prompts[i % len(prompts)] for i in chunk]
        seeds = [settings.seed + i for i in chunk]
        latents = teacher_latents(pipe, captions, seeds, settings.steps, settings.cfg_scale, settings.negative)
        if settings.layout == "latents":
            _write_chunk(out, chunk, captions, seeds, latents)
        else:
            _write_images(out, chunk, captions, seeds, pipe, latents, settings)
        # What each chunk cost (a killed run keeps its share), for `fewstep bench --set data_free`; one line per
        # chunk, appended by whichever process wrote it.
        with open(out / COST_LOG, "a") as fh:
            fh.write(json.dumps({"written": len(chunk), "seconds": round(time.perf_counter() - chunk_started, 2),
                                 "device": str(state.device)}) + "\n")
    state.wait_for_everyone()
    report = {"written": len(missing), "already_there": len(done), "count": settings.count,
              "seconds": round(time.perf_counter() - started, 1)}
    log.info("synth: %(written)d samples written, %(already_there)d already there, in %(seconds)s s", report)
    return report


def _check_settings(out: Path, settings: SynthSettings) -> None:
    path = out / SETTINGS_FILE
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise SynthError(f"{out} holds files but no {SETTINGS_FILE}: write the synthesized set into a new folder")
        return
    before = SynthSettings(**json.loads(path.read_text()))
    differences = settings.differences(before)
    if differences:
        raise SynthError(f"{out} was written with {', '.join(differences)}; continue it with the same settings or "
                         "write into another folder")


@torch.no_grad()
def teacher_latents(pipe, captions: Sequence[str], seeds: Sequence[int], steps: int, cfg_scale: float,
                    negative: str = "") -> torch.Tensor:
    """The teacher's latents (as its UNet sees them) for ``captions``, DDIM with CFG at trailing timesteps."""
    from ..core.schedule import select_timesteps
    from .teacher_data import schedule_of
    from .pipelines import PromptEncoder
    from .students import sample_student

    prompts = PromptEncoder(pipe)
    if negative:
        cond, uncond = prompts(list(captions)), prompts([negative] * len(captions))
    else:
        cond, uncond = prompts.with_unconditional(list(captions))
    return sample_student(pipe.unet, schedule_of(pipe), cond, seeds, select_timesteps("trailing", steps), "ddim",
                          consistency_boundary=False, uncond=uncond, cfg_scale=cfg_scale).cpu()


def _write_chunk(out: Path, indices: list[int], captions: list[str], seeds: list[int], latents: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from ..core.adapter_file import atomic_write

    metadata = {"fewstep.synth": json.dumps({"indices": indices, "captions": captions, "seeds": seeds})}
    atomic_write(out / f"latents-{indices[0]:06d}.safetensors",
                 lambda tmp: save_file({"latents": latents.float().contiguous()}, tmp, metadata=metadata))


def _write_images(out: Path, indices: list[int], captions: list[str], seeds: list[int], pipe, latents: torch.Tensor,
                  settings: SynthSettings) -> None:
    from PIL import Image

    from ..core.adapter_file import atomic_write
    from .images import to_uint8

    vae = pipe.vae
    with torch.no_grad():
        images = to_uint8(vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample)
    for index, caption, seed, image in zip(indices, captions, seeds, images):
        stem = out / f"{index:06d}"
        record = {"index": index, "caption": caption, "seed": seed, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
                  "negative": settings.negative, "teacher": settings.teacher}
        atomic_write(stem.with_suffix(".png"), lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG"))
        atomic_write(stem.with_suffix(".json"), lambda tmp, record=record: Path(tmp).write_text(json.dumps(record) + "\n"))
        # The caption last: a sample counts as written (for readers and for resuming) once its .txt exists.
        atomic_write(stem.with_suffix(".txt"), lambda tmp, caption=caption: Path(tmp).write_text(caption + "\n", encoding="utf-8"))


