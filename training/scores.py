"""The proxy benchmark's scores of one set of images, each with its noise.

A set holds the proxy prompts, each class equally often, in one or more disjoint seed sets (``evaluation.prompt_set``).
It is scored against the class-balanced held-out reference (``REFERENCE_PER_CLASS`` real images of every class):

- ``fid``: FID on ImageNet EfficientNet-Lite0 features (``metrics.py``);
- ``fid_classifier``: FID on the proxy classifier's pooled penultimate features, a feature space trained on this
  domain (the standard practice on MNIST-like sets, where ImageNet features of upscaled 32-px images see little);
- ``class_fid``: the classifier-space FID of each class's samples against that class's reference images, averaged over
  the classes. It rises when images are of the wrong class even where the class mix, and so every unconditional FID,
  stays the same;
- ``precision`` / ``recall`` (Kynkaanniemi et al. 2019, k = 3) in the classifier space: the share of samples inside
  the reference's k-NN manifold (fidelity) and the share of reference images inside the samples' (diversity);
- ``prompt_accuracy``: the share of samples the classifier assigns to their prompt's class.

Noise, two ways. A stratified bootstrap over the samples (each class resampled within itself, ``RESAMPLES`` times,
with the same draws for every set of the same layout, so that two rows' replicates pair up) gives the interval
``value +- 1.96 se``: centred on the value, since resampling with repeats biases FID itself upwards but hardly its
spread. Checked on disjoint sets of real images (tests/test_scores.py): the interval's se is within about 1.1x of
their spread for most scores; it is conservative for the EfficientNet FID (1.6x at 500 images, 2.3x at 200: the
repeats a draw holds add a spread of their own in 1280 dimensions, which paired differences cancel, since they share
their draws) and about 1.4x narrow for recall (a draw's manifold is built from its distinct samples). And each disjoint seed set is scored on its own. ``compare`` calls two rows different only where the paired
bootstrap difference is beyond 1.96 of its se and every seed set's difference has the same sign.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import PROXY_CLASSES, balanced_indices, load_proxy_dataset
from .images import default_device
from .metrics import FeatureStatistics, get_feature_extractor

SCORES = ("fid", "fid_classifier", "class_fid", "precision", "recall", "prompt_accuracy")
LOWER_IS_BETTER = frozenset({"fid", "fid_classifier", "class_fid"})   # of every set's scores (attributes.py's too)
REFERENCE_PER_CLASS = 50   # the held-out split's digit classes have 50 images, its animal classes 100
RESAMPLES = 100
NEIGHBOURS = 3             # Kynkaanniemi et al.'s k
Z_95 = 1.96
BOOTSTRAP_SEED = 0
WITHIN_NOISE = "within noise"


@dataclass(frozen=True, eq=False)   # eq=False: tensors have no single truth value to compare
class Embedded:
    """A set of images as the scores see it: EfficientNet-Lite0 and classifier features (float64), the classifier's
    predicted class and the prompt's class of each image."""

    effnet: torch.Tensor
    domain: torch.Tensor
    predictions: np.ndarray
    labels: np.ndarray


def embed(images, labels, device: str | torch.device | None = None) -> Embedded:
    """Both feature sets of ``images`` (uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]); ``labels`` index PROXY_CLASSES."""
    from .proxy_classifier import embed_proxy_images, load_proxy_classifier

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    domain, predictions = embed_proxy_images(images, load_proxy_classifier(device=device))
    effnet = get_feature_extractor(device)(images)
    return Embedded(effnet.double(), domain.double(), predictions.numpy(), labels)


class _Reference:
    """The class-balanced held-out images in both feature spaces, with what every score needs of them."""

    def __init__(self, embedded: Embedded):
        self.embedded = embedded
        self.effnet = FeatureStatistics.from_features(embedded.effnet)
        self.domain = FeatureStatistics.from_features(embedded.domain)
        self.classes = [FeatureStatistics.from_features(embedded.domain[embedded.labels == c]) for c in range(len(PROXY_CLASSES))]
        self.radii = _kth_neighbour_distance(torch.cdist(embedded.domain, embedded.domain))


@functools.cache
def _reference_on(per_class: int, device: str) -> _Reference:
    heldout = load_proxy_dataset("heldout")
    picks = balanced_indices(heldout.labels, per_class)
    return _Reference(embed(heldout.images[picks], heldout.labels[picks], device))


def reference(per_class: int = REFERENCE_PER_CLASS, device: str | torch.device | None = None) -> _Reference:
    """The benchmark's reference, embedded once per process."""
    return _reference_on(per_class, str(torch.device(device) if device is not None else default_device()))


def _kth_neighbour_distance(distances: torch.Tensor) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point, from the square matrix of distances (self included at 0)."""
    return distances.kthvalue(NEIGHBOURS + 1, dim=1).values


class FrechetTo:
    """The Frechet distance of a weighted sample set (row i counted ``counts[i]`` times, as a bootstrap draw or a seed
    set selects it) to fixed statistics. The features are projected on the reference's covariance factor once, so a
    weighting costs one SVD of (rows drawn x reference rank): with S_a = F_a^T F_a, tr (S_a S_b)^(1/2) is the sum of the
    singular values of F_a F_b^T, as in ``metrics.frechet_distance``."""

    def __init__(self, features: torch.Tensor, to: FeatureStatistics):
        self.features, self.to = features, to
        self.projected = features @ to.factor.T
        self.squares = features.square().sum(dim=1)

    def __call__(self, counts: torch.Tensor) -> float:
        n = counts.sum()
        if n < 2:
            return math.nan   # no covariance from one sample
        weights = counts / n
        mean = weights @ self.features
        drawn = counts > 0
        factor_product = (self.projected[drawn] - weights @ self.projected) * torch.sqrt(counts[drawn] / (n - 1))[:, None]
        trace = (counts @ self.squares - n * mean.square().sum()) / (n - 1)
        trace_sqrt = torch.linalg.svdvals(factor_product).sum()
        return float((mean - self.to.mean).square().sum() + trace + self.to.cov.trace() - 2 * trace_sqrt)


class _Measures:
    """Every score of one embedded set under a weighting of its samples."""

    def __init__(self, embedded: Embedded, ref: _Reference):
        self.labels = torch.as_tensor(embedded.labels)
        self.correct = torch.as_tensor(embedded.predictions == embedded.labels, dtype=torch.float64)
        self.fid = FrechetTo(embedded.effnet, ref.effnet)
        self.fid_classifier = FrechetTo(embedded.domain, ref.domain)
        self.classes = [(self.labels == c, FrechetTo(embedded.domain[self.labels == c], ref.classes[c]))
                        for c in range(len(PROXY_CLASSES)) if (self.labels == c).any()]
        to_reference = torch.cdist(embedded.domain, ref.embedded.domain)          # (samples, reference)
        self.inside_reference = (to_reference <= ref.radii).any(dim=1).double()   # precision, per sample
        self.from_reference = to_reference.T
        self.between_samples = torch.cdist(embedded.domain, embedded.domain)

    def __call__(self, counts: torch.Tensor) -> dict[str, float]:
        n = counts.sum()
        drawn = torch.nonzero(counts > 0).squeeze(1)
        recall = math.nan
        if len(drawn) > NEIGHBOURS:
            # The samples' manifold from the distinct samples drawn: a repeat is not a neighbour.
            radii = _kth_neighbour_distance(self.between_samples[drawn][:, drawn])
            recall = float((self.from_reference[:, drawn] <= radii).any(dim=1).double().mean())
        return {"fid": self.fid(counts), "fid_classifier": self.fid_classifier(counts),
                "class_fid": float(np.mean([frechet(counts[members]) for members, frechet in self.classes])),
                "precision": float(counts @ self.inside_reference / n), "recall": recall,
                "prompt_accuracy": float(counts @ self.correct / n)}


def bootstrap_counts(labels: np.ndarray, resamples: int, seed: int = BOOTSTRAP_SEED) -> list[torch.Tensor]:
    """``resamples`` stratified bootstrap draws as counts per sample: every class drawn within itself, with repeats,
    as many times as it has samples. The same labels give the same draws."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    draws = []
    for _ in range(resamples):
        picks = np.concatenate([rng.choice(m, len(m)) for m in members])
        draws.append(torch.as_tensor(np.bincount(picks, minlength=len(labels)), dtype=torch.float64))
    return draws


def score(embedded: Embedded, seed_sets: Sequence[int] | np.ndarray | None = None, resamples: int = RESAMPLES,
          device: str | torch.device | None = None) -> dict:
    """Every score of the set with its noise (``with_noise``), the bootstrap stratified by class."""
    return with_noise(_Measures(embedded, reference(device=device)), SCORES, embedded.labels, seed_sets, resamples)


def with_noise(measures: Callable[[torch.Tensor], dict[str, float]], names: Sequence[str], strata: np.ndarray,
               seed_sets: Sequence[int] | np.ndarray | None = None, resamples: int = RESAMPLES) -> dict:
    """The scores ``names`` that ``measures`` gives a set under a weighting of its samples (counts per sample), each
    with its 95 % interval from ``resamples`` bootstrap draws stratified by ``strata`` (none with 0), each seed set's
    value (``per_seed_set``, where ``seed_sets`` names more than one) and the bootstrap replicates ``compare`` pairs."""
    values = measures(torch.ones(len(strata), dtype=torch.float64))
    result: dict = {name: _defined(values[name]) for name in names}
    if resamples:
        replicates = [measures(counts) for counts in bootstrap_counts(strata, resamples)]
        result["intervals"], result["replicates"] = {}, {}
        for name in names:
            column = np.array([r[name] for r in replicates])
            half = Z_95 * float(column.std(ddof=1))
            result["intervals"][name] = [_defined(values[name] - half), _defined(values[name] + half)]
            result["replicates"][name] = [_defined(float(f"{v:.6g}")) for v in column]
    if seed_sets is not None and len(np.unique(seed_sets)) > 1:
        seed_sets = np.asarray(seed_sets)
        per_set = [measures(torch.as_tensor(seed_sets == s, dtype=torch.float64)) for s in np.unique(seed_sets)]
        result["per_seed_set"] = {name: [_defined(r[name]) for r in per_set] for name in names}
    return result


def _defined(value: float) -> float | None:
    """None for a score a set too small cannot give (one sample of a class: no covariance), so JSON stays JSON."""
    return value if math.isfinite(value) else None


def score_images(images, labels, seed_sets: Sequence[int] | np.ndarray | None = None, resamples: int = RESAMPLES,
                 device: str | torch.device | None = None) -> dict:
    """``score`` of raw images."""
    return score(embed(images, labels, device), seed_sets, resamples, device)


def compare(row: dict, baseline: dict) -> dict[str, str]:
    """Per score, whether ``row`` is "better" or "worse" than ``baseline`` beyond the noise, or "within noise". Both
    must be scored on the same prompts and seeds (their bootstrap replicates pair up sample for sample)."""
    if "replicates" not in row or "replicates" not in baseline:
        raise ValueError("compare needs rows scored with bootstrap resamples")
    if len(row["replicates"]["fid"]) != len(baseline["replicates"]["fid"]) or row.get("samples") != baseline.get("samples"):
        raise ValueError(f"{row.get('name')} and {baseline.get('name')} were not scored on the same layout")
    verdicts = {}
    for name in row["replicates"]:
        paired = [(a, b) for a, b in zip(row["replicates"][name], baseline["replicates"][name]) if None not in (a, b)]
        sets = list(zip(row.get("per_seed_set", {}).get(name, ()), baseline.get("per_seed_set", {}).get(name, ())))
        if None in (row[name], baseline[name]) or len(paired) < 2 or any(None in pair for pair in sets):
            verdicts[name] = WITHIN_NOISE   # undefined for a set this small: nothing to tell apart
            continue
        delta = row[name] - baseline[name]
        spread = np.std([a - b for a, b in paired], ddof=1)
        agree = all(math.copysign(1, a - b) == math.copysign(1, delta) for a, b in sets)
        if not (abs(delta) > Z_95 * spread and agree):
            verdicts[name] = WITHIN_NOISE
        else:
            verdicts[name] = "better" if (delta < 0) == (name in LOWER_IS_BETTER) else "worse"
    return verdicts
