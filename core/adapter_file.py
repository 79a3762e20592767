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

from .base_models import BASES, infer_base
from .lora import LoraKeyError, detect_layout, read_lora
from .samplers import SAMPLERS
from .schedule import PREDICTIONS, select_timesteps
from .sun import SunFileError, group_layer_tensors

FORMAT_VERSION = 1
KINDS: tuple[str, ...] = ("flash_lora", "sun_adapter", "guided_student", "gdd_student", "snap_student")
META_PREFIX = "fewstep."
W_EMBEDDING_KEY = "time_embedding.cond_proj.weight"  # a guided student's w projection (diffusers' time_cond_proj_dim)


def without_w_embedding(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A guided student's UNet weights or LoRA without its w projection (which hosts apply on their own)."""
    return {k: v for k, v in tensors.items() if k != W_EMBEDDING_KEY}
UNKNOWN_BASE = "unknown"

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


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
        _expect("fewstep.kind", self.kind, KINDS)
        _expect("fewstep.base", self.base, BASES + ((UNKNOWN_BASE,) if allow_unknown_base else ()))
        _expect("fewstep.prediction", self.prediction, PREDICTIONS)
        _expect("fewstep.sampler", self.sampler, tuple(SAMPLERS))
        if not isinstance(self.steps, int) or self.steps < 1:
            raise AdapterFileError(f"fewstep.steps must be a positive integer; found {self.steps!r}")
        if self.timesteps is not None:
            ts = self.timesteps
            if len(ts) != self.steps or any(not isinstance(t, int) for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
                raise AdapterFileError(
                    f"fewstep.timesteps must list {self.steps} decreasing integers (one per step); found {ts!r}"
                )

    def timesteps_for(self, steps: int) -> list[int]:
        """Timesteps for sampling in ``steps`` steps: the file's own list at its step count, else its spacing
        (LCM's when the file gives none, trailing otherwise: the grid consistency students are trained on)."""
        if self.timesteps is not None and steps == self.steps:
            return list(self.timesteps)
        return [int(t) for t in select_timesteps("lcm" if self.timesteps is None else "trailing", steps)]

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
                try:
                    values[f.name] = json.loads(raw[key])
                except json.JSONDecodeError:
                    raise AdapterFileError(f"metadata {key} should be JSON; found {raw[key][:60]!r}") from None
        version = values.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
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
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise AdapterFileError(f"{name}: not a safetensors file: its header is not JSON") from None
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes, data_end = {}, {}, 0
    for key, info in header.items():
        try:
            start, end = info["data_offsets"]
            shapes[key], dtypes[key] = list(info["shape"]), info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(f"{name}: not a safetensors file: malformed entry for {key!r}") from None
        if dtypes[key] in _DTYPE_BYTES and end - start != math.prod(shapes[key]) * _DTYPE_BYTES[dtypes[key]]:
            raise AdapterFileError(f"{name}: corrupt header: {key!r} has shape {shapes[key]} but {end - start} bytes")
        data_end = max(data_end, end)
    available = size - 8 - header_len
    if data_end > available:
        raise AdapterFileError(f"{name}: truncated: tensors need {data_end} bytes after the header, the file has {available}")
    return SafetensorsHeader(shapes, dtypes, {str(k): str(v) for k, v in metadata.items()}, data_end)


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


def check_tensors(tensors: dict[str, torch.Tensor], meta: AdapterMetadata, name: str = "adapter") -> None:
    """Finite values and a complete set of weights for the kind."""
    if not tensors:
        raise AdapterFileError(f"{name}: holds no tensors; expected {meta.kind} weights")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{name}: tensor {key!r} holds NaN/Inf values: the file is corrupt or its training diverged")
    if meta.kind == "flash_lora":
        try:
            modules, _ = read_lora(tensors)
        except LoraKeyError as exc:
            raise AdapterFileError(f"{name}: {exc}") from None
        if not modules:
            raise AdapterFileError(f"{name}: a flash_lora file with no UNet LoRA modules (only text-encoder keys)")
    elif meta.kind == "guided_student" and W_EMBEDDING_KEY not in tensors:
        raise AdapterFileError(f"{name}: a guided_student file without its w-embedding ({W_EMBEDDING_KEY})")
    elif meta.kind == "snap_student" and not isinstance(meta.extra.get("unet_config"), dict):
        raise AdapterFileError(f"{name}: a snap_student file without its UNet's architecture (fewstep.extra unet_config)")
    elif meta.kind == "sun_adapter":
        try:
            group_layer_tensors(tensors)   # released files name layers by index ("1"), ours by module name
        except SunFileError as exc:
            raise AdapterFileError(f"{name}: {exc}") from None


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
    if value not in allowed:
        raise AdapterFileError(f"unknown {field_name} {value!r}; expected one of {', '.join(allowed)}")
