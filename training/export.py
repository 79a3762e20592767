"""`fewstep export`: LoRA adapters between fewstep's file and the layouts other tools read.

Sources: a fewstep adapter file, any LoRA ``.safetensors`` (kohya, PEFT, diffusers keys; released Flash,
LCM, TCD, Hyper-SD files), or a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).
Targets:

- ``fewstep``: kohya keys plus fewstep metadata (what the ComfyUI nodes and the A1111 extension read);
  metadata comes from the source when it has ours, else from what the keys tell plus the user's flags.
- ``diffusers``: ``unet.``-prefixed PEFT keys with diffusers' ``lora_adapter_metadata`` (rank, alpha and
  targets), which ``pipe.load_lora_weights`` reads, so alpha survives.
- ``peft``: a PEFT folder for ``PeftModel.from_pretrained`` / ``unet.load_adapter``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

from ..core.adapter_file import AdapterFileError, AdapterMetadata, atomic_write, describe, read_header, write_adapter
from ..core.lora import LoraModules, read_lora, write_lora

TARGETS = ("fewstep", "diffusers", "peft")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def read_any_lora(source: str | Path, alpha: Optional[float] = None) -> tuple[LoraModules, AdapterMetadata, list[str]]:
    """(modules, metadata, notes) from any supported source; alpha from the file when it stores one."""
    from safetensors.torch import load_file

    source = Path(source)
    notes: list[str] = []
    if source.is_dir():
        config_path, weights_path = source / PEFT_CONFIG, source / PEFT_WEIGHTS
        if not config_path.exists() or not weights_path.exists():
            raise AdapterFileError(f"{source}: a folder source must be a PEFT adapter ({PEFT_CONFIG} + {PEFT_WEIGHTS})")
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
        modules, _ = read_lora(tensors, alpha=_peft_alphas(config, tensors))
        meta, _, notes = describe(read_header(weights_path), source.name)
        notes.append(f"PEFT folder: rank/alpha from {PEFT_CONFIG}")
        return modules, meta, notes
    header = read_header(source)
    meta, inferred, notes = describe(header, source.name)
    if meta.kind != "flash_lora":
        raise AdapterFileError(f"{source.name}: is a {meta.kind}; export converts LoRA adapters only")
    tensors = load_file(str(source))
    stored = header.metadata.get(DIFFUSERS_METADATA_KEY)
    if stored and alpha is None:
        config = {k.removeprefix("unet."): v for k, v in json.loads(stored).items() if k.startswith("unet.")}
        modules, _ = read_lora(tensors, alpha=_peft_alphas(config, tensors, prefix="unet."))
        notes.append(f"rank/alpha from the file's {DIFFUSERS_METADATA_KEY}")
    else:
        modules, ignored = read_lora(tensors, alpha=alpha)
        if ignored:
            notes.append(f"left out {len(ignored)} text-encoder tensors (fewstep adapters patch the UNet only)")
        if not any(k.endswith(".alpha") for k in tensors) and alpha is None:
            notes.append("the file stores no alpha: taken equal to each module's rank (pass --alpha if it was trained otherwise)")
    return modules, meta, notes


def _peft_alphas(config: dict, tensors: dict, prefix: str = "") -> dict[str, float]:
    """Per-module alpha from a LoraConfig dict: ``alpha_pattern`` entries, else ``lora_alpha``."""
    modules, _ = read_lora(tensors, alpha=1.0)
    patterns = config.get("alpha_pattern") or {}
    default = float(config.get("lora_alpha", 8))
    out = {}
    for m in modules:
        match = next((v for k, v in patterns.items() if m == k or m.endswith("." + k)), None)
        out[m] = float(match if match is not None else default)
    return out


def lora_config_dict(modules: LoraModules) -> dict:
    """A PEFT ``LoraConfig`` as a dict that reproduces these modules exactly (rank and alpha patterns per module)."""
    from peft import LoraConfig

    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted(modules),
        rank_pattern={k: m.rank for k, m in modules.items() if m.rank != rank},
        alpha_pattern={k: m.alpha for k, m in modules.items() if m.alpha != alpha},
    ).to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def export_lora(modules: LoraModules, meta: AdapterMetadata, to: str, out: str | Path) -> Path:
    """Write ``modules`` in the ``to`` layout (see the module docstring); atomic for files."""
    from safetensors.torch import save_file

    out = Path(out)
    if to == "fewstep":
        write_adapter(out, write_lora(modules, "kohya"), meta)
        return out
    config = lora_config_dict(modules)
    if to == "diffusers":
        packed = {f"unet.{k}": v for k, v in config.items()}
        atomic_write(out, lambda tmp: save_file(write_lora(modules, "diffusers"), tmp, metadata={
            "format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True), **_fewstep_metadata(meta)}))
        return out
    if to == "peft":
        out.mkdir(parents=True, exist_ok=True)
        weights = {f"base_model.model.{k}": v for k, v in write_lora(modules, "peft").items()}
        atomic_write(out / PEFT_WEIGHTS, lambda tmp: save_file(weights, tmp, metadata={"format": "pt", **_fewstep_metadata(meta)}))
        (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out
    raise ValueError(f"unknown export target {to!r}; expected one of {', '.join(TARGETS)}")


def _fewstep_metadata(meta: AdapterMetadata) -> dict[str, str]:
    """Our metadata rides along in every layout (other tools ignore it), so a round trip keeps the sampling settings."""
    if meta.base == "unknown":
        return {}
    meta.validate()
    return meta.to_strings()
