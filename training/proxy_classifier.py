"""The proxy benchmark's prompt accuracy: the share of generated images that a small CNN trained on the proxy train
split assigns to the class their prompt named. Its weights ship in ``training/assets/proxy_classifier.safetensors``;
``python -m fewstep.training.metrics --train-classifier`` rebuilds them."""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import PROXY_CLASSES, PROXY_SIZE, load_proxy_dataset
from .images import default_device, unit_nchw

log = logging.getLogger("fewstep")

CLASSIFIER_PATH = Path(__file__).with_name("assets") / "proxy_classifier.safetensors"
CLASSIFIER_KIND = "proxy_classifier"


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
        return self.head(self.features(x * 2.0 - 1.0))   # embed_proxy_images splits this in two


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
    device = torch.device(device) if device is not None else default_device()
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
    return _classifier_on(str(path), str(torch.device(device) if device is not None else default_device()))


@torch.no_grad()
def embed_proxy_images(images, classifier: ProxyClassifier | None = None,
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predictions) of each image: the classifier's pooled penultimate features (float32, (N, 2 * width),
    the benchmark's domain feature space) and its predicted proxy class index (int64), both on the CPU. Images of
    another size are resized to 32x32."""
    classifier = classifier if classifier is not None else load_proxy_classifier()
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        x = unit_nchw(images[start:start + batch_size], device)
        if x.shape[-2:] != (PROXY_SIZE, PROXY_SIZE):
            x = F.interpolate(x, size=(PROXY_SIZE, PROXY_SIZE), mode="bilinear", align_corners=False, antialias=True)
        pooled = classifier.features(x * 2.0 - 1.0)
        features.append(pooled.float().cpu())
        predictions.append(classifier.head(pooled).argmax(dim=1).cpu())
    classifier.train(was_training)
    if not features:
        return torch.empty(0, classifier.head.in_features), torch.empty(0, dtype=torch.int64)
    return torch.cat(features), torch.cat(predictions)


def classify_proxy_images(images, classifier: ProxyClassifier | None = None, batch_size: int = 256) -> torch.Tensor:
    """Predicted proxy class index (CPU int64) of each image; images of another size are resized to 32x32."""
    return embed_proxy_images(images, classifier, batch_size)[1]


def prompt_accuracy(images, labels, classifier: ProxyClassifier | None = None, batch_size: int = 256) -> float:
    """Share of images that the proxy classifier assigns to their prompt's class (``labels`` index PROXY_CLASSES)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    return float((classify_proxy_images(images, classifier, batch_size) == labels).double().mean())
