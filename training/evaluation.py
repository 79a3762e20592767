"""The benchmark's evaluation entries: a configuration (the teacher at some steps and CFG, or a student file) sampled
on the proxy prompt set and scored. ``fewstep eval``, ``fewstep bench`` and the methods' own tables (the SnapFusion
block table) all score through ``evaluate_entry``.

Prompts times seeds come in two disjoint splits. Every choice (presets, sampler defaults written into files, learning
rates, CFG and w defaults, the teacher's best CFG) is made on ``validation``; the README's tables report ``test``. A
split holds every proxy class ``per_class`` times in each of ``seed_sets`` disjoint seed sets: the k-th sample of a
class takes seed base + k (validation's base 0 gives the seeds every earlier table used, and every earlier choice was
made on; test's base is far from any seed used before). ``scores.score`` scores a set in both feature spaces, with
its bootstrap interval and each seed set's value. A ``PromptSuite`` bundles a prompt set with its scores: ``PROXY``
(the 20 classes), or the attributes split's (``attributes.SUITE``).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .bundled import BUNDLED_FLASH
from .data import PROXY_CLASSES
from .images import save_grid
from .scores import RESAMPLES, SCORES, score_images
from .teacher import sample_images

log = logging.getLogger("fewstep")

DEFAULT_CFG_SCALE = 4.0
# The teacher's best CFG on the validation split (lowest class FID of `fewstep bench --set cfg --split validation`,
# bench/results/cfg_validation.json): the teacher baseline at its best, next to CFG 4, in every bench set.
BEST_CFG_SCALE = 2.0
# The attributes teacher's (attributes.py) best CFG on validation: the lowest FID (the split has no classifier-space
# FID) of `fewstep bench --set attributes_cfg --split validation` (bench/results/attributes_cfg_validation.json; 1 to 2
# lie within noise of each other there, and every accuracy rises with CFG up to 4).
ATTRIBUTES_BEST_CFG_SCALE = 2.0
GRID_SEEDS = 4
SPLITS = {"validation": 0, "test": 1_000_000}   # each split's first seed


@dataclass(frozen=True)
class TeacherEntry:
    """The teacher with CFG and DDIM (trailing timesteps: the stronger choice at few steps) at a step count."""

    steps: int
    cfg_scale: float = DEFAULT_CFG_SCALE

    @property
    def name(self) -> str:
        return f"teacher-{self.steps}steps-cfg{self.cfg_scale:g}"

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.cfg_scale != 1.0 else 1)

    def generate(self, pipe, captions: Sequence[str], seeds: Sequence[int], batch_size: int, negative: str = "") -> np.ndarray:
        chunks = []
        for start in range(0, len(captions), batch_size):
            chunks.append(sample_images(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, captions[start:start + batch_size],
                                        seeds[start:start + batch_size], steps=self.steps, cfg_scale=self.cfg_scale,
                                        spacing="trailing", negative=negative))
        return np.concatenate(chunks)


@dataclass(frozen=True)
class StudentEntry:
    """A distilled adapter file on the teacher, one pass per step without CFG (or with CFG at ``cfg_scale``, for
    students distilled to sample with it: SnapFusion's): its own sampler and timesteps unless ``sampler`` is given;
    ``w`` is a guided student's guidance input (None: the file's default)."""

    steps: int
    adapter: str | None = str(BUNDLED_FLASH)
    label: str = "flash"
    w: float | None = None
    sampler: str | None = None
    cfg_scale: float = 1.0

    @property
    def name(self) -> str:
        return (f"{self.label}-{self.steps}steps" + (f"-w{self.w:g}" if self.w is not None else "")
                + (f"-cfg{self.cfg_scale:g}" if self.cfg_scale != 1.0 else "") + (f"-{self.sampler}" if self.sampler else ""))

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.cfg_scale != 1.0 else 1)

    def load(self, pipe):
        """The student on ``pipe``, loaded once (the last one loaded is kept)."""
        from .students import load_student

        if self.adapter is None:
            raise ValueError(f"{self.name}: this bench set needs a student file: pass --adapter")
        key = (id(pipe), self.adapter)
        if key not in _LOADED:
            _LOADED.clear()
            _LOADED[key] = load_student(pipe, self.adapter)
        return _LOADED[key]

    @property
    def _cfg_scale(self) -> float | None:
        return None if self.cfg_scale == 1.0 else self.cfg_scale   # 1: as the file says (no CFG for these students)

    def plan(self, pipe):
        """core's plan for this row's settings on the student (its ``notes``: a w outside the trained range, ...)."""
        return self.load(pipe).plan(self.steps, self.w, self.sampler, self._cfg_scale)

    def generate(self, pipe, captions: Sequence[str], seeds: Sequence[int], batch_size: int, negative: str | None = None) -> np.ndarray:
        student = self.load(pipe)
        return np.concatenate([student.images(captions[i:i + batch_size], seeds[i:i + batch_size], self.steps, self.w, self.sampler,
                                              negative, self._cfg_scale) for i in range(0, len(captions), batch_size)])


_LOADED: dict = {}


@dataclass(frozen=True)
class PromptSet:
    """The prompts and seeds one configuration is sampled on: sample i is ``captions[i]`` with ``seeds[i]``, and
    belongs to seed set ``seed_sets[i]``; ``labels[i]`` is its stratum in the bootstrap (its proxy class; on the
    attributes split its kind, with its attributes in ``attributes[i]``)."""

    captions: list[str]
    labels: np.ndarray
    seeds: list[int]
    seed_sets: np.ndarray
    split: str
    attributes: tuple = ()


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")


def class_major(per_class: int, seed_sets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The proxy benchmark's layout: (class, k, seed set) of each sample, every class ``per_class`` times in each
    seed set, class by class; the k-th sample of a class is in seed set k // per_class."""
    per_split = per_class * seed_sets
    within_class = np.tile(np.arange(per_split), len(PROXY_CLASSES))
    return np.repeat(np.arange(len(PROXY_CLASSES)), per_split), within_class, within_class // per_class


def prompt_set(per_class: int, split: str = "validation", seed_sets: int = 1) -> PromptSet:
    """Every proxy class ``per_class`` times per seed set (``class_major``); a class's k-th sample takes the split's
    first seed + k."""
    check_split(split)
    labels, within_class, sets = class_major(per_class, seed_sets)
    return PromptSet([PROXY_CLASSES[i] for i in labels], labels, [SPLITS[split] + int(k) for k in within_class], sets, split)


@functools.cache   # bench sets run together share it (callers copy it into their document, never change it)
def real_and_noise(per_class: int, seed_sets: int, resamples: int) -> dict:
    """The scores of real training images in the benchmark's layout (disjoint sets of ``per_class`` per class: the
    floor, and the real-vs-real spread) and of uniform noise (the ceiling; values only)."""
    from .data import balanced_indices, load_proxy_dataset

    train = load_proxy_dataset("train")
    picks = balanced_indices(train.labels, per_class * seed_sets, seed=1)
    labels, _, sets = class_major(per_class, seed_sets)
    noise = np.random.default_rng(0).integers(0, 256, size=(len(picks), 32, 32, 3), dtype=np.uint8)
    return {"real_train_images": {"name": "real training images", "samples": len(picks),
                                  **score_images(train.images[picks], labels, sets, resamples)},
            "uniform_noise": {"name": "uniform noise", "samples": len(picks), **score_images(noise, labels, resamples=0)}}


@dataclass(frozen=True)
class PromptSuite:
    """What a bench set samples and how it scores it: ``prompts(per_class, split, seed_sets)`` the prompt set (20
    classes' worth of samples ``per_class`` times per seed set), ``score(images, prompts, resamples)`` its scores,
    ``grid(images, prompts, path)`` its preview, ``sanity(per_class, seed_sets, resamples)`` the rows real images and
    noise give; ``reference`` says what the FIDs compare with."""

    name: str
    scores: tuple[str, ...]
    prompts: Callable[[int, str, int], PromptSet]
    score: Callable[[np.ndarray, PromptSet, int], dict]
    grid: Callable[[np.ndarray, PromptSet, Path], None]
    sanity: Callable[[int, int, int], dict]
    reference: str


def _score_proxy(images: np.ndarray, prompts: PromptSet, resamples: int) -> dict:
    return score_images(images, prompts.labels, prompts.seed_sets, resamples)


def _proxy_grid(images: np.ndarray, prompts: PromptSet, path: Path) -> None:
    save_class_grid(images, prompts.labels, path)


def evaluate_entry(pipe, entry: TeacherEntry | StudentEntry, per_class: int, batch_size: int, grid_path: Path | None = None,
                   split: str = "validation", seed_sets: int = 1, resamples: int = RESAMPLES, samples: dict | None = None,
                   suite: PromptSuite | None = None) -> dict:
    """Sample one configuration on a split's prompt set of ``suite`` (default: the proxy classes) and score it
    (``resamples`` bootstrap draws for the intervals; 0: values only); optionally save its grid. ``samples``: a cache
    of generated images, and of their scores, shared by the calls given it (bench sets run together sample and score a
    configuration they share once)."""
    suite = suite or PROXY
    prompts = suite.prompts(per_class, split, seed_sets)
    notes = entry.plan(pipe).notes if isinstance(entry, StudentEntry) else ()   # loads the file: s / image is sampling's
    for note in notes:
        log.warning("%s: %s", entry.name, note)
    key = (id(pipe), entry, tuple(prompts.seeds), tuple(prompts.captions))
    if samples is not None and key in samples:
        images, seconds, _ = samples[key]
    else:
        start = time.perf_counter()
        with torch.no_grad():
            images = entry.generate(pipe, prompts.captions, prompts.seeds, batch_size)
        seconds = time.perf_counter() - start
        if samples is not None:
            samples[key] = images, seconds, pipe   # holding the pipe: its id cannot be another pipe's while cached
    scored_key = (key, suite.name, resamples)
    scored = samples.get(scored_key) if samples is not None else None
    if scored is None:
        scored = suite.score(images, prompts, resamples)
        if samples is not None:
            samples[scored_key] = scored
    row = {**asdict(entry), "name": entry.name, "nfe": entry.nfe, "split": split, "samples": len(images), "per_class": per_class,
           "seed_sets": seed_sets, **scored, "seconds_per_image": seconds / len(images)}
    if notes:
        row["notes"] = list(notes)
    if grid_path is not None:
        suite.grid(images, prompts, grid_path)
        row["grid"] = str(grid_path)
    return row


def save_class_grid(images: np.ndarray, labels: np.ndarray, path: Path, seeds: int = GRID_SEEDS) -> None:
    """One column per class, one row per seed (the first ``seeds`` samples of each class)."""
    shown = min(seeds, int(np.bincount(labels).min()))
    grid_idx = np.concatenate([np.flatnonzero(labels == c)[:shown] for c in range(len(PROXY_CLASSES))])
    grid = images[grid_idx].reshape(len(PROXY_CLASSES), shown, *images.shape[1:]).transpose(1, 0, 2, 3, 4)
    save_grid(grid.reshape(-1, *images.shape[1:]), path, columns=len(PROXY_CLASSES))


PROXY = PromptSuite("proxy", SCORES, prompt_set, _score_proxy, _proxy_grid, real_and_noise,
                    "class-balanced proxy held-out split (50 real images per class, 1,000 in all)")
