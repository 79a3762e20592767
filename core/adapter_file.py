"""fewstep's self-describing adapter file: one .safetensors whose metadata says how to sample with it.

Layout of the metadata (string -> string; ``docs/adapter_format.md`` lists every field):
``fewstep.format_version``, ``fewstep.kind``, ``fewstep.base``, ``fewstep.prediction``, ``fewstep.sampler``,
``fewstep.steps`` and ``fewstep.timesteps``, ``fewstep.guidance``, ``fewstep.provenance``, ``fewstep.extra``.
Plain strings are stored as is, numbers and structures as JSON.

Files without fewstep metadata (released Flash/LCM/TCD/Hyper-SD LoRAs, the released SUN adapter) are
read too: kind and base are inferred from keys and shapes, and ``Adapter.notes`` says what was inferred.
Every failure is an ``AdapterFileError`` with one line naming what was expected and what was found.
Loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .base_models import BASES, LARGEST_LAYER_NUMEL, MAX_ADAPTER_PARAMS, infer_base
from .lora import LoraKeyError, detect_layout, read_lora
from .samplers import SAMPLERS
from .schedule import NUM_TRAIN_TIMESTEPS, PREDICTIONS, distillation_timesteps, select_timesteps
from .sun import SunFileError, group_layer_tensors
from .unet_config import UnetConfigError, check_unet_config

FORMAT_VERSION = 1
KINDS: tuple[str, ...] = ("flash_lora", "sun_adapter", "guided_student", "gdd_student", "snap_student")
META_PREFIX = "fewstep."
W_EMBEDDING_KEY = "time_embedding.cond_proj.weight"  # a guided student's w projection (diffusers' time_cond_proj_dim)


def without_w_embedding(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A guided student's UNet weights or LoRA without its w projection (which hosts apply on their own)."""
    return {k: v for k, v in tensors.items() if k != W_EMBEDDING_KEY}
UNKNOWN_BASE = "unknown"

_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE in its Rust reader)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")   # what adapter weights are stored in; integer tensors are not weights
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_WEIGHT_TORCH_DTYPES = tuple(_TORCH_DTYPES[d] for d in WEIGHT_DTYPES)
SNAP_DECODER_PREFIX = "vae."   # a snap_student file's pruned VAE decoder: AutoencoderKL keys under this prefix
MAX_ABS_WEIGHT = 1e4    # trained weights stay far below; values near half precision's 65504 overflow its activations
MAX_GUIDANCE = 100.0     # bound on w and CFG scales in a file: far above any trained range, well below overflow


class AdapterFileError(ValueError):
    """An adapter file that cannot be used; the message is one line: what was expected, what was found."""


@dataclass
class AdapterMetadata:
    """What a host needs to sample with an adapter.

    Args:
        kind: one of KINDS.
        base: "sd15" | "sdxl" | "pixart" (UNKNOWN_BASE only for inferred files whose keys do not tell).
        prediction: what the adapted model predicts: "epsilon" | "v_prediction".
        sampler: a name from ``core.samplers.SAMPLERS``.
        steps: default number of steps.
        timesteps: the training timesteps for ``steps`` steps, highest first; None means "lcm" spacing.
        guidance: for w-conditioned students, ``{"convention": "imagen", "w_min", "w_max", "default_w"}``.
        provenance: how it was made: method, teacher, training steps, fewstep version, date.
        extra: kind-specific settings (LoRA rank/alpha/targets, SUN variant, ...).
    """

    kind: str
    base: str
    prediction: str = "epsilon"
    sampler: str = "consistency"
    steps: int = 4
    timesteps: Optional[list[int]] = None
    guidance: Optional[dict[str, Any]] = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def validate(self, allow_unknown_base: bool = False) -> None:
        """Every field by type and range; the one place a file's metadata is checked, so hosts can trust it."""
        _expect("fewstep.kind", self.kind, KINDS)
        _expect("fewstep.base", self.base, BASES + ((UNKNOWN_BASE,) if allow_unknown_base else ()))
        _expect("fewstep.prediction", self.prediction, PREDICTIONS)
        _expect("fewstep.sampler", self.sampler, tuple(SAMPLERS))
        if not _is_int(self.format_version) or self.format_version < 1:
            raise AdapterFileError(f"fewstep.format_version must be a positive integer; found {_short(self.format_version)}")
        if not _is_int(self.steps) or not 1 <= self.steps <= NUM_TRAIN_TIMESTEPS:
            raise AdapterFileError(f"fewstep.steps must be an integer from 1 to {NUM_TRAIN_TIMESTEPS}; found {_short(self.steps)}")
        if self.timesteps is not None:
            ts = self.timesteps
            if (not isinstance(ts, list) or len(ts) != self.steps or not all(_is_int(t) and 0 <= t < NUM_TRAIN_TIMESTEPS for t in ts)
                    or any(b >= a for a, b in zip(ts, ts[1:]))):
                raise AdapterFileError(f"fewstep.timesteps must list {self.steps} decreasing integers from "
                                       f"{NUM_TRAIN_TIMESTEPS - 1} to 0 (one per step); found {_short(ts)}")
        for field_name in ("provenance", "extra"):
            if not isinstance(getattr(self, field_name), dict):
                raise AdapterFileError(f"fewstep.{field_name} must be a JSON object; found {_short(getattr(self, field_name))}")
        if self.guidance is not None and not isinstance(self.guidance, dict):
            raise AdapterFileError(f"fewstep.guidance must be a JSON object; found {_short(self.guidance)}")
        guidance = self.guidance or {}
        for key in ("w_min", "w_max", "default_w", "cfg_scale"):
            if key in guidance:
                _expect_number(f"fewstep.guidance {key}", guidance[key], 0.0, MAX_GUIDANCE)
        if self.kind == "guided_student":
            lacking = [k for k in ("default_w", "w_min", "w_max") if k not in guidance]
            if lacking:
                raise AdapterFileError(f"a guided_student's fewstep.guidance needs {', '.join(lacking)}; found {_short(self.guidance)}")
            if guidance["w_min"] > guidance["w_max"]:
                raise AdapterFileError(f"fewstep.guidance w_min {guidance['w_min']:g} is above w_max {guidance['w_max']:g}")
        self._validate_extra()

    def _validate_extra(self) -> None:
        extra = self.extra
        if "cfg_scale" in extra:
            _expect_number("fewstep.extra cfg_scale", extra["cfg_scale"], 0.0, MAX_GUIDANCE)
        if "consistency_boundary" in extra and not isinstance(extra["consistency_boundary"], bool):
            raise AdapterFileError(f"fewstep.extra consistency_boundary must be true or false; found {_short(extra['consistency_boundary'])}")
        if "format" in extra and extra["format"] not in ("lora", "unet"):
            raise AdapterFileError(f"fewstep.extra format must be \"lora\" or \"unet\"; found {_short(extra['format'])}")
        if "alpha" in extra and not isinstance(extra["alpha"], dict):
            _expect_number("fewstep.extra alpha", extra["alpha"], 0.0, math.inf, open_low=True)
        for key in ("rank", "embedding_dim"):
            if key in extra and not (_is_int(extra[key]) and 0 < extra[key] <= 1 << 16):
                raise AdapterFileError(f"fewstep.extra {key} must be a positive integer; found {_short(extra[key])}")
        if self.kind == "gdd_student" and "format" not in extra:
            raise AdapterFileError('a gdd_student file needs fewstep.extra format ("lora" or "unet": how its weights are stored)')
        if self.kind == "guided_student" and "embedding_dim" not in extra:
            raise AdapterFileError("a guided_student file needs fewstep.extra embedding_dim (the width of its w-embedding)")
        if self.kind == "snap_student":
            if "unet_config" not in extra:
                raise AdapterFileError("a snap_student file needs its UNet's architecture (fewstep.extra unet_config)")
            try:
                check_unet_config(extra["unet_config"])
            except UnetConfigError as exc:
                raise AdapterFileError(f"fewstep.extra unet_config: {exc}") from None
            if "decoder_config" in extra:
                _check_decoder_config(extra["decoder_config"])

    def timesteps_for(self, steps: int) -> list[int]:
        """Timesteps for sampling in ``steps`` steps: the file's own list at its step count, else its spacing
        (LCM's when the file gives none, trailing otherwise: the grid consistency students are trained on)."""
        if self.timesteps is not None and steps == self.steps:
            return list(self.timesteps)
        return [int(t) for t in (select_timesteps("lcm", steps) if self.timesteps is None else distillation_timesteps(steps))]

    @property
    def lora_weights(self) -> bool:
        """Whether the file's UNet weights are a LoRA on the base model (kohya keys) rather than whole UNet tensors:
        Flash/LCM-style files, and guided or GDD students exported as a LoRA."""
        return self.kind == "flash_lora" or (self.kind in ("guided_student", "gdd_student") and self.extra.get("format") == "lora")

    @property
    def consistency_boundary(self) -> bool:
        """Whether the adapted model's output goes through LCM's boundary condition (Flash/LCM/TCD LoRAs)."""
        return bool(self.extra.get("consistency_boundary", self.kind == "flash_lora"))

    def to_strings(self) -> dict[str, str]:
        """The safetensors metadata dict: strings raw, everything else as JSON."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[META_PREFIX + f.name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return out

    @classmethod
    def from_strings(cls, raw: dict[str, str]) -> "AdapterMetadata":
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = META_PREFIX + f.name
            if key not in raw:
                continue
            if f.name in ("kind", "base", "prediction", "sampler"):
                values[f.name] = raw[key]
            else:
                values[f.name] = _parse_json(raw[key], f"metadata {key}")
        version = values.get("format_version", FORMAT_VERSION)
        if _is_int(version) and version > FORMAT_VERSION:
            raise AdapterFileError(
                f"fewstep.format_version {version!r} is newer than this fewstep reads ({FORMAT_VERSION}); update fewstep"
            )
        missing = [k for k in ("kind", "base") if k not in values]
        if missing:
            raise AdapterFileError(f"fewstep metadata lacks {', '.join(META_PREFIX + k for k in missing)}")
        return cls(**values)


@dataclass
class SafetensorsHeader:
    """A safetensors file's table of contents, read without loading any tensor."""

    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    data_bytes: int


@dataclass
class Adapter:
    """A loaded adapter: its tensors, its metadata, and whether (and how) the metadata was inferred."""

    path: str
    tensors: dict[str, torch.Tensor]
    metadata: AdapterMetadata
    inferred: bool
    notes: list[str]


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check a safetensors header; errors say whether the file is missing, not safetensors or truncated."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise AdapterFileError(f"{name}: no such file; expected a .safetensors adapter")
    size = os.path.getsize(name)
    with open(name, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{name}: not a safetensors file: {size} bytes, expected an 8-byte header length first")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise AdapterFileError(f"{name}: {_not_safetensors_reason(head)}; expected a .safetensors file")
        raw = fh.read(header_len)
    try:
        header = _parse_json(raw, "header")
    except AdapterFileError as exc:
        raise AdapterFileError(f"{name}: not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{name}: not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{name}: corrupt header: __metadata__ must map strings to strings")
    shapes, dtypes, spans = {}, {}, []
    for key, info in header.items():
        entry = _header_entry(info)
        if entry is None:
            raise AdapterFileError(f"{name}: corrupt header: malformed entry for {_short(key)} (expected dtype, shape "
                                   "and data_offsets)")
        shapes[key], dtypes[key], (start, end) = entry
        if end - start != math.prod(shapes[key]) * _DTYPE_BYTES[dtypes[key]]:
            raise AdapterFileError(f"{name}: corrupt header: {key!r} has shape {shapes[key]} but {end - start} bytes")
        spans.append((start, end, key))
    # As safetensors itself checks: the tensors tile the data area, in order, with no gap, overlap or tail.
    data_end = 0
    for start, end, key in sorted(spans):
        if start != data_end:
            raise AdapterFileError(f"{name}: corrupt header: {key!r} starts at byte {start}, expected {data_end} "
                                   "(tensors overlap or leave gaps)")
        data_end = end
    available = size - 8 - header_len
    if data_end > available:
        raise AdapterFileError(f"{name}: truncated: tensors need {data_end} bytes after the header, the file has {available}")
    if data_end < available:
        raise AdapterFileError(f"{name}: corrupt: {available - data_end} bytes after the last tensor belong to none")
    return SafetensorsHeader(shapes, dtypes, dict(metadata), data_end)


def _header_entry(info) -> Optional[tuple[list[int], str, tuple[int, int]]]:
    """(shape, dtype, (start, end)) of one header entry, or None when any part has the wrong type or range."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return None
    shape, dtype, offsets = info["shape"], info["dtype"], info["data_offsets"]
    if (not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape)
            or dtype not in _DTYPE_BYTES or not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        return None
    return shape, dtype, (offsets[0], offsets[1])


def _not_safetensors_reason(head: bytes) -> str:
    if head[:2] == b"PK":
        return "a PyTorch zip checkpoint (.pt/.ckpt/.bin), which fewstep never unpickles"
    if head[:1] == b"\x80":
        return "a Python pickle, which fewstep never unpickles"
    return "not a safetensors file (its header length field is larger than the file)"


def describe(
    header: SafetensorsHeader, name: str = "adapter", expected_base: Optional[str] = None
) -> tuple[AdapterMetadata, bool, list[str]]:
    """(metadata, inferred, notes) from a header: read fewstep metadata, or infer it from keys and shapes.

    Raises AdapterFileError when the metadata is invalid, disagrees with the weights, or the base differs
    from ``expected_base``.
    """
    keys = list(header.shapes)
    try:
        key_base, key_reason = infer_base(keys, header.shapes)
    except ValueError as exc:
        raise AdapterFileError(f"{name}: {exc}") from None
    notes: list[str] = []
    if any(k.startswith(META_PREFIX) for k in header.metadata):
        try:
            meta = AdapterMetadata.from_strings(header.metadata)
            meta.validate()
        except AdapterFileError as exc:
            raise AdapterFileError(f"{name}: {exc}") from None
        inferred = False
        if key_base is not None and key_base != meta.base:
            raise AdapterFileError(
                f"{name}: metadata says base {meta.base} but the weights are {key_base} ({key_reason}); the file is mislabelled"
            )
    else:
        meta = _infer_metadata(keys, name)
        meta.base = key_base or UNKNOWN_BASE
        meta.validate(allow_unknown_base=True)
        inferred = True
        notes.append(f"no fewstep metadata: inferred kind {meta.kind} from its keys ({meta.extra.get('layout', 'weights')})")
        notes.append(f"base {meta.base}: {key_reason}")
        notes.append(f"sampling defaults assumed: {meta.sampler} sampler, {meta.steps} steps, timesteps {meta.timesteps}")
    if expected_base is not None and meta.base == UNKNOWN_BASE:
        notes.append(f"the keys do not tell the base model; assuming it is {expected_base}, as the model is")
    elif expected_base is not None and meta.base != expected_base:
        why = f" ({key_reason})" if key_base == meta.base else ""
        raise AdapterFileError(f"{name}: adapter is for {meta.base}{why} but the model is {expected_base}; pick an adapter made for {expected_base}")
    check_structure(header_tensors(header), meta, name)
    return meta, inferred, notes


def _infer_metadata(keys: Sequence[str], name: str) -> AdapterMetadata:
    """Sampling defaults for files made elsewhere, as their authors publish them."""
    layout = detect_layout(keys)
    if layout is not None:
        # LCM-LoRA, TCD, Hyper-SD and released Flash LoRAs all sample as consistency models: 4 LCM steps, no CFG.
        return AdapterMetadata(kind="flash_lora", base=UNKNOWN_BASE, sampler="consistency", steps=4,
                               timesteps=[999, 759, 499, 259], extra={"layout": layout})
    if any(k.endswith("to_k_neg.weight") for k in keys):
        # The released SUN adapter samples with DPM-Solver++ (diffusers' default, 2nd order), 4 trailing steps, no CFG.
        return AdapterMetadata(kind="sun_adapter", base=UNKNOWN_BASE, sampler="dpmpp_2m", steps=4,
                               timesteps=[999, 749, 499, 249], extra={"layout": "sun_released"})
    if any(k.endswith(W_EMBEDDING_KEY) for k in keys):
        return AdapterMetadata(kind="guided_student", base=UNKNOWN_BASE, sampler="ddim", steps=8,
                               timesteps=None, extra={"layout": "diffusers_unet"})
    shown = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise AdapterFileError(
        f"{name}: cannot tell what this file holds ({len(keys)} tensors: {shown}…); expected LoRA keys "
        f"(lora_down/lora_up, lora_A/lora_B), a SUN adapter (to_k_neg) or fewstep metadata"
    )


def read_adapter(
    path: str | os.PathLike,
    expected_base: Optional[str] = None,
    expected_kinds: Optional[Sequence[str]] = None,
    device: str = "cpu",
) -> Adapter:
    """Load and check an adapter file; see the module docstring."""
    name = os.fspath(path)
    header = read_header(name)
    meta, inferred, notes = describe(header, os.path.basename(name), expected_base)
    if expected_kinds is not None and meta.kind not in expected_kinds:
        raise AdapterFileError(f"{os.path.basename(name)}: is a {meta.kind}; expected {' or '.join(expected_kinds)}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(name, device=device)
    except Exception as exc:  # safetensors raises its own error types; keep our one-line contract
        raise AdapterFileError(f"{os.path.basename(name)}: unreadable safetensors data: {exc}") from None
    check_tensors(tensors, meta, os.path.basename(name))
    return Adapter(name, tensors, meta, inferred, notes)


_last_read: dict[str, Any] = {}


def read_adapter_cached(path: str | os.PathLike, expected_base: str) -> Adapter:
    """``read_adapter`` for the hosts: the last file read stays in memory while it is unchanged (same size and
    modification time) and asked for the same base, so re-running a graph with a new seed does not re-read it."""
    stat = os.stat(path)
    key = (os.fspath(path), stat.st_mtime_ns, stat.st_size, expected_base)
    if _last_read.get("key") != key:
        _last_read.clear()
        _last_read.update(key=key, adapter=read_adapter(path, expected_base=expected_base))
    return _last_read["adapter"]


def check_tensors(tensors: dict[str, torch.Tensor], meta: AdapterMetadata, name: str = "adapter") -> None:
    """Structure (``check_structure``) and finite values: what every host needs before using the weights."""
    check_structure(tensors, meta, name)
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{name}: tensor {key!r} holds NaN/Inf values: the file is corrupt or its training diverged")
        if tensor.abs().amax() > MAX_ABS_WEIGHT:
            raise AdapterFileError(f"{name}: tensor {key!r} holds values up to {float(tensor.abs().amax()):.3g}, beyond any trained "
                                   f"weight (at most {MAX_ABS_WEIGHT:g}): the file is corrupt")


def check_structure(tensors: dict[str, torch.Tensor], meta: AdapterMetadata, name: str = "adapter") -> None:
    """Dtypes, sizes and a complete, well-formed set of weights for the kind, from shapes alone: ``describe`` runs it
    on the header (meta-device tensors) before any byte is loaded, ``check_tensors`` again on the loaded weights."""
    if not tensors:
        raise AdapterFileError(f"{name}: holds no tensors; expected {meta.kind} weights")
    largest = LARGEST_LAYER_NUMEL.get(meta.base, max(LARGEST_LAYER_NUMEL.values()))
    limit = MAX_ADAPTER_PARAMS.get(meta.base, max(MAX_ADAPTER_PARAMS.values()))
    for key, tensor in tensors.items():
        if tensor.dtype not in _WEIGHT_TORCH_DTYPES:
            raise AdapterFileError(f"{name}: tensor {_short(key)} is {tensor.dtype}; adapter weights are "
                                   f"{', '.join(WEIGHT_DTYPES)}")
        if tensor.numel() == 0:
            raise AdapterFileError(f"{name}: tensor {_short(key)} is empty (shape {list(tensor.shape)})")
        if tensor.numel() > largest:
            raise AdapterFileError(f"{name}: tensor {_short(key)} holds {tensor.numel():,} numbers, more than any layer of a "
                                   f"{meta.base} model ({largest:,}): the file is corrupt or not an adapter")
    total = sum(t.numel() for t in tensors.values())
    if total > limit:
        raise AdapterFileError(f"{name}: holds {total:,} parameters, more than a whole {meta.base} model ({limit:,})")
    if meta.lora_weights:
        try:
            modules, _ = read_lora(without_w_embedding(tensors), alpha=meta.extra.get("alpha"))
        except LoraKeyError as exc:
            raise AdapterFileError(f"{name}: {exc}") from None
        if not modules:
            raise AdapterFileError(f"{name}: a {meta.kind} file with no UNet LoRA modules (only text-encoder keys)")
    if meta.kind == "guided_student":
        embedding = tensors.get(W_EMBEDDING_KEY)
        if embedding is None:
            raise AdapterFileError(f"{name}: a guided_student file without its w-embedding ({W_EMBEDDING_KEY})")
        if embedding.ndim != 2 or embedding.shape[1] != meta.extra["embedding_dim"]:
            raise AdapterFileError(f"{name}: {W_EMBEDDING_KEY} has shape {list(embedding.shape)}; expected "
                                   f"(time-embedding width, {meta.extra['embedding_dim']})")
    elif meta.kind == "snap_student":
        expected = check_unet_config(meta.extra["unet_config"])   # validate() has checked it; this is its size
        found = sum(t.numel() for k, t in tensors.items() if not k.startswith(SNAP_DECODER_PREFIX))
        if found != expected:
            raise AdapterFileError(f"{name}: its UNet config describes {expected:,} parameters but the file holds {found:,}: "
                                   "the file is corrupt")
    elif meta.kind == "sun_adapter":
        try:
            group_layer_tensors(tensors)   # released files name layers by index ("1"), ours by module name
        except SunFileError as exc:
            raise AdapterFileError(f"{name}: {exc}") from None


def header_tensors(header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """The file's tensors as shapes and dtypes only, on the meta device: nothing is read or allocated."""
    return {key: torch.empty(shape, dtype=_TORCH_DTYPES[header.dtypes[key]], device="meta")
            for key, shape in header.shapes.items()}


def write_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: AdapterMetadata) -> None:
    """Validate and write atomically (temporary file in the same folder, then rename): no half-written adapters."""
    from safetensors.torch import save_file

    name = os.fspath(path)
    metadata.validate()
    check_tensors(tensors, metadata, os.path.basename(name))
    atomic_write(name, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata=metadata.to_strings()))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it: readers never see half a file.

    The file gets the permissions a plain ``open`` would give (mkstemp's are owner-only, which hides adapters
    from a UI running as another user).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(os.fspath(path))[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _expect(field_name: str, value, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise AdapterFileError(f"unknown {field_name} {_short(value)}; expected one of {', '.join(allowed)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    """A value for a one-line message: repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _expect_number(field_name: str, value, lo: float, hi: float, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or value > hi or (open_low and value == lo):
        bound = f"above {lo:g}" if open_low else f"from {lo:g}"
        raise AdapterFileError(f"{field_name} must be a finite number {bound}{f' to {hi:g}' if math.isfinite(hi) else ''}; "
                               f"found {_short(value)}")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_json(text, what: str):
    """json.loads with NaN/Infinity refused and deep nesting reported, not raised as RecursionError."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise AdapterFileError(f"{what} is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        shown = text[:40] if isinstance(text, str) else text[:40].decode("utf-8", "replace")
        raise AdapterFileError(f"{what} should be JSON ({str(exc).splitlines()[0][:60]}); found {shown!r}") from None


# Bounds on a pruned VAE decoder's architecture: SD's VAE decoder (4 levels of up to 512 channels) is the largest one.
_DECODER_FIELDS = {"in_channels": (1, 16), "out_channels": (1, 4), "layers_per_block": (1, 4), "norm_num_groups": (1, 512)}


def _check_decoder_config(config) -> None:
    """A snap_student's pruned decoder config (``training.methods.snap_decoder.decoder_config``), bounded by SD's VAE."""
    def fail(why: str):
        raise AdapterFileError(f"fewstep.extra decoder_config: {why}")
    if not isinstance(config, dict):
        fail(f"must be a JSON object; found {_short(config)}")
    allowed = set(_DECODER_FIELDS) | {"up_block_types", "block_out_channels", "act_fn", "mid_block_add_attention"}
    if set(config) - allowed or set(_DECODER_FIELDS) - set(config):
        fail(f"expected the fields {', '.join(sorted(allowed))}; found {', '.join(sorted(config))}")
    for key, (lo, hi) in _DECODER_FIELDS.items():
        if not _is_int(config[key]) or not lo <= config[key] <= hi:
            fail(f"{key} must be an integer from {lo} to {hi}; found {_short(config[key])}")
    widths, blocks = config.get("block_out_channels"), config.get("up_block_types")
    if (not isinstance(widths, list) or not 0 < len(widths) <= 4
            or not all(_is_int(w) and 0 < w <= 512 and w % config["norm_num_groups"] == 0 for w in widths)):
        fail(f"block_out_channels must be 1 to 4 widths up to 512, in whole norm groups; found {_short(widths)}")
    if not isinstance(blocks, list) or len(blocks) != len(widths) or any(b != "UpDecoderBlock2D" for b in blocks):
        fail(f"up_block_types must be one UpDecoderBlock2D per level; found {_short(blocks)}")
    if config.get("act_fn", "silu") != "silu" or not isinstance(config.get("mid_block_add_attention", True), bool):
        fail("act_fn must be \"silu\" and mid_block_add_attention true or false")
