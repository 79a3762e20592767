"""The "attributes" split of the proxy benchmark: prompts whose words must be bound to the right part of the image.

Its images (``data.attribute_dataset``) are the proxy set's digits and silhouettes as a coloured item on a background
of another colour ("a red digit seven on a blue background") or as a digit and an animal side by side at half size
("a digit three left of a cat"). Each attribute a prompt names is read back from the image by a fixed reader, so
per-attribute accuracy tells which part of a prompt a model follows:

- ``colour``: background and item colour from pixel statistics (the border's median colour; the mean of the pixels
  farthest from it), each the nearest of ``COLOURS``; both must be right;
- ``class``: the bundled proxy classifier on the item's mask (each pixel's position between the two read colours);
- ``pair``: both halves of a pair read as their named item;
- ``position``: of a pair, whether the classifier puts the two named items in the named order (the left half's
  logits plus the right half's favour the named order over its swap), apart from whether it reads each right.

``read_attributes`` reads every attribute of a set; tests check each reader against real images with the right and
with wrong prompts. ``SUITE`` is the split as `fewstep bench` samples and scores it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .data import COLOURED, COLOURS, COLOUR_NAMES, HALF, ITEM_NAMES, PAIR, PROXY_SIZE, AttributePrompt, all_prompts, attribute_dataset
from .evaluation import SPLITS, PromptSet, PromptSuite, check_split
from .images import default_device, save_grid
from .metrics import FeatureStatistics, get_feature_extractor
from .scores import RESAMPLES, FrechetTo, with_noise

# --- reading the attributes back --------------------------------------------------------------------------------

BORDER = 2   # pixels of frame the background colour is read from


def read_colours(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item colour, background colour) of each image, float (N, 3) RGB: the border's median, and the mean of the
    pixels at least half as far from it as the farthest (the item's stroke, without its anti-aliased edge)."""
    x = images.astype(np.float64).reshape(len(images), PROXY_SIZE, PROXY_SIZE, 3)
    frame = np.concatenate([x[:, :BORDER].reshape(len(x), -1, 3), x[:, -BORDER:].reshape(len(x), -1, 3),
                            x[:, :, :BORDER].reshape(len(x), -1, 3), x[:, :, -BORDER:].reshape(len(x), -1, 3)], axis=1)
    background = np.median(frame, axis=1)
    pixels = x.reshape(len(x), -1, 3)
    distance = np.linalg.norm(pixels - background[:, None], axis=2)
    stroke = distance >= 0.5 * distance.max(axis=1, keepdims=True)
    item = (pixels * stroke[..., None]).sum(axis=1) / np.maximum(stroke.sum(axis=1), 1)[:, None]
    return item, background


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index in COLOUR_NAMES of the palette colour nearest each RGB row."""
    palette = np.array([COLOURS[name] for name in COLOUR_NAMES], dtype=np.float64)
    return np.linalg.norm(rgb[:, None] - palette[None], axis=2).argmin(axis=1)


def item_masks(images: np.ndarray, item: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Each pixel's position between the background and item colour, as a white-on-black uint8 image: what the proxy
    classifier was trained on."""
    x = images.astype(np.float64)
    direction = item - background
    level = ((x - background[:, None, None]) * direction[:, None, None]).sum(-1) / np.maximum(
        (direction ** 2).sum(-1), 1e-6)[:, None, None]
    grey = np.rint(np.clip(level, 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


@torch.no_grad()
def _logits(images: np.ndarray) -> torch.Tensor:
    from .proxy_classifier import load_proxy_classifier
    from .images import unit_nchw

    classifier = load_proxy_classifier()
    device = next(classifier.parameters()).device
    out = []
    for start in range(0, len(images), 256):
        x = unit_nchw(images[start:start + 256], device)
        if x.shape[-2:] != (PROXY_SIZE, PROXY_SIZE):
            x = torch.nn.functional.interpolate(x, size=(PROXY_SIZE, PROXY_SIZE), mode="bilinear", align_corners=False, antialias=True)
        out.append(classifier(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(ITEM_NAMES))


ATTRIBUTES = ("class", "colour", "pair", "position")


def read_attributes(images: np.ndarray, prompts: list[AttributePrompt]) -> dict[str, np.ndarray]:
    """Per sample, whether each attribute its prompt names is in the image: float arrays of 1 / 0, NaN where the prompt
    names no such attribute (a pair has no colour); ``all``: every attribute it names."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    kinds = np.array([p.kind for p in prompts])
    first = np.array([p.first for p in prompts])
    second = np.array([p.second for p in prompts])
    found = {name: np.full(len(prompts), np.nan) for name in ATTRIBUTES}
    coloured, pairs = np.flatnonzero(kinds == COLOURED), np.flatnonzero(kinds == PAIR)
    if len(coloured):
        item, background = read_colours(images[coloured])
        named = np.array([(prompts[i].colour, prompts[i].background) for i in coloured])
        found["colour"][coloured] = (nearest_colour(item) == named[:, 0]) & (nearest_colour(background) == named[:, 1])
        masks = item_masks(images[coloured], item, background)
        found["class"][coloured] = _logits(masks).argmax(1).numpy() == first[coloured]
    if len(pairs):
        top = HALF // 2
        left = _logits(np.ascontiguousarray(images[pairs, top:top + HALF, :HALF]))
        right = _logits(np.ascontiguousarray(images[pairs, top:top + HALF, HALF:]))
        rows = torch.arange(len(pairs))
        a, b = torch.as_tensor(first[pairs]), torch.as_tensor(second[pairs])
        found["pair"][pairs] = ((left.argmax(1) == a) & (right.argmax(1) == b)).numpy()
        named_order = left[rows, a] + right[rows, b]
        found["position"][pairs] = (named_order > left[rows, b] + right[rows, a]).numpy()
    named = np.stack([found[name] for name in ATTRIBUTES])
    found["all"] = np.where(np.isnan(named), 1.0, named).min(axis=0)
    return found


# --- the benchmark on it ----------------------------------------------------------------------------------------

SCORES = ("fid", "class_accuracy", "colour_accuracy", "pair_accuracy", "position_accuracy", "prompt_accuracy")
REFERENCE_PER_CLASS = 25   # coloured held-out items per class, and as many pairs: 1,000 images


def prompt_set(per_class: int, split: str = "validation", seed_sets: int = 1) -> PromptSet:
    """As many samples as the proxy prompt set's (``per_class`` x 20 per seed set), half coloured items, half pairs.
    Each seed set runs through every prompt of a kind in an order drawn for the split and the set (so each caption
    comes about equally often); sample i takes the split's first seed + i."""
    check_split(split)
    per_kind = per_class * len(ITEM_NAMES) // 2
    prompts, sets = [], []
    for seed_set in range(seed_sets):
        rng = np.random.default_rng([SPLITS[split], seed_set])
        for kind in (COLOURED, PAIR):
            options = all_prompts(kind)
            prompts += [options[i] for i in np.resize(rng.permutation(len(options)), per_kind)]
        sets += [seed_set] * (2 * per_kind)
    return PromptSet([p.caption for p in prompts], np.array([p.kind for p in prompts]),
                     [SPLITS[split] + i for i in range(len(prompts))], np.array(sets), split, tuple(prompts))


@functools.cache
def _reference_on(device: str) -> FeatureStatistics:
    data, _ = attribute_dataset("heldout", REFERENCE_PER_CLASS)
    return FeatureStatistics.from_features(get_feature_extractor(device)(data.images).double())


class _Measures:
    """Every score of a set under a weighting of its samples: FID to the held-out attribute images, and the share of
    samples (of those whose prompt names it) that show each attribute."""

    def __init__(self, images: np.ndarray, prompts: Sequence[AttributePrompt], device: str | None):
        found = read_attributes(images, list(prompts))
        self.shown = {f"{name}_accuracy": torch.as_tensor(found[name]) for name in ATTRIBUTES}
        self.shown["prompt_accuracy"] = torch.as_tensor(found["all"])
        device = str(torch.device(device) if device is not None else default_device())
        self.fid = FrechetTo(get_feature_extractor(device)(images).double(), _reference_on(device))

    def __call__(self, counts: torch.Tensor) -> dict[str, float]:
        values = {"fid": self.fid(counts)}
        for name, shown in self.shown.items():
            named = counts * ~shown.isnan()
            values[name] = float(named @ shown.nan_to_num() / named.sum()) if named.sum() else math.nan
        return values


def score_images(images: np.ndarray, prompts: PromptSet, resamples: int = RESAMPLES, device: str | None = None) -> dict:
    """``SCORES`` of a set sampled on ``prompt_set``'s prompts, with their noise (the bootstrap stratified by kind)."""
    return with_noise(_Measures(images, prompts.attributes, device), SCORES, prompts.labels, prompts.seed_sets, resamples)


@functools.cache   # as evaluation.real_and_noise
def real_and_noise(per_class: int, seed_sets: int, resamples: int) -> dict:
    """The scores of real training images with their own prompts (what the readers get right of real images: the
    ceiling of every accuracy) in the benchmark's layout, and of uniform noise (values only)."""
    per_kind = per_class * len(ITEM_NAMES) // 2
    data, prompts = attribute_dataset("train", math.ceil(per_class * seed_sets / 2))
    coloured = [i for i, p in enumerate(prompts) if p.kind == COLOURED][:per_kind * seed_sets]
    pairs = [i for i, p in enumerate(prompts) if p.kind == PAIR][:per_kind * seed_sets]
    picks = [i for s in range(seed_sets) for kind in (coloured, pairs) for i in kind[s * per_kind:(s + 1) * per_kind]]
    layout = PromptSet([data.captions[i] for i in picks], np.array([prompts[i].kind for i in picks]), list(range(len(picks))),
                       np.repeat(np.arange(seed_sets), 2 * per_kind), "train", tuple(prompts[i] for i in picks))
    noise = np.random.default_rng(0).integers(0, 256, size=(len(picks), PROXY_SIZE, PROXY_SIZE, 3), dtype=np.uint8)
    return {"real_train_images": {"name": "real training images", "samples": len(picks),
                                  **score_images(data.images[picks], layout, resamples)},
            "uniform_noise": {"name": "uniform noise", "samples": len(picks), **score_images(noise, layout, 0)}}


GRID_COLUMNS = 20


def save_prompt_grid(images: np.ndarray, prompts: PromptSet, path: Path) -> None:
    """Two rows of coloured items, two of pairs: the first samples of each kind."""
    shown = [np.flatnonzero(prompts.labels == kind)[:2 * GRID_COLUMNS] for kind in (COLOURED, PAIR)]
    save_grid(images[np.concatenate(shown)], path, columns=GRID_COLUMNS)


SUITE = PromptSuite("attributes", SCORES, prompt_set, score_images, save_prompt_grid, real_and_noise,
                    f"held-out proxy images in the attributes layout ({REFERENCE_PER_CLASS} coloured items per class and "
                    f"as many pairs, {2 * REFERENCE_PER_CLASS * len(ITEM_NAMES):,} in all)")
