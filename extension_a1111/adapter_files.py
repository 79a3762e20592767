"""Where the A1111 extension finds adapter files: models/fewstep, then the Lora extension's folder; names as the dropdown
and the API give them, confined to those folders."""

from __future__ import annotations

import os
from typing import Optional

from ..core.adapter_file import Adapter, AdapterFileError, read_adapter_cached

FEWSTEP_FOLDER = "fewstep"  # models/fewstep, next to models/Lora


def lora_folder() -> Optional[str]:
    """The Lora extension's folder (models/Lora unless --lora-dir says otherwise); None without the extension."""
    from modules import shared

    return getattr(shared.cmd_opts, "lora_dir", None)


def adapter_folders() -> list[str]:
    """models/fewstep first, then the Lora extension's folder."""
    from modules import paths_internal

    return [os.path.join(paths_internal.models_path, FEWSTEP_FOLDER)] + [f for f in [lora_folder()] if f]


def list_adapters() -> list[str]:
    """Every .safetensors under the adapter folders, as paths relative to its folder (only safetensors: loading never
    unpickles)."""
    names: list[str] = []
    for folder in adapter_folders():
        for root, _, files in os.walk(folder, followlinks=True):
            for file in sorted(files):
                if file.lower().endswith(".safetensors"):
                    name = os.path.relpath(os.path.join(root, file), folder).replace(os.sep, "/")
                    if name not in names:
                        names.append(name)
    return sorted(names, key=str.lower)


def adapter_path(name: str) -> str:
    """The file ``name`` (as ``list_adapters`` gives it) in the first adapter folder that holds it. The name comes from
    the API as well as the dropdown: it must stay inside the folders (no absolute path, no ``..``)."""
    if not name:
        raise AdapterFileError("no adapter selected: put a .safetensors in models/fewstep or models/Lora and press the "
                               "refresh button")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or parts[0] == "" or ".." in parts:
        raise AdapterFileError(f"{name!r}: not an adapter name; expected a file name relative to models/fewstep or "
                               "models/Lora, as the adapter dropdown lists it")
    if not name.lower().endswith(".safetensors"):
        raise AdapterFileError(f"{name!r}: not a .safetensors file; adapters load from safetensors only")
    for folder in adapter_folders():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise AdapterFileError(f"{name}: not found in {' or '.join(adapter_folders())}; press the refresh button")


def load_adapter(path: str, base: str) -> Adapter:
    """The adapter file, checked against the model's base and read once while it is unchanged."""
    return read_adapter_cached(path, base)
