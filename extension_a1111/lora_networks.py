"""LoRA files in A1111 and Forge go through the host's own Lora extension (a ``<lora:...>`` tag per prompt): a file
outside its folder is registered for the run, and what it applied is counted."""

from __future__ import annotations

import os

from ..core.adapter_file import Adapter, AdapterFileError
from ..core.lora import KOHYA_TEXT_PREFIXES, KOHYA_UNET_PREFIX, detect_layout
from .run_state import pending_undo


def lora_networks():
    """The built-in Lora extension's ``networks`` module (it imports it under that name)."""
    import sys

    module = sys.modules.get("networks")
    if module is None or not hasattr(module, "available_network_aliases"):
        raise AdapterFileError("the built-in Lora extension is not loaded: enable it (Extensions tab) to use Flash LoRAs")
    return module


def register_lora(alias: str, path: str) -> None:
    """Make a file outside models/Lora known to the Lora extension under ``alias`` for this run."""
    networks = lora_networks()
    known = networks.available_network_aliases.get(alias)
    if known is not None and os.path.realpath(known.filename) == os.path.realpath(path):
        return
    import network

    entry = network.NetworkOnDisk(alias, path)
    saved = {table: getattr(networks, table).get(alias) for table in ("available_networks", "available_network_aliases")}
    for table in saved:
        getattr(networks, table)[alias] = entry

    def restore():
        for table, old in saved.items():
            if old is None:
                getattr(networks, table).pop(alias, None)
            else:
                getattr(networks, table)[alias] = old

    pending_undo.push(f"Lora entry {alias}", restore)


def lora_module_count(adapter: Adapter) -> int:
    """How many layers the file's LoRA patches (kohya module names; other layouts are counted the same way)."""
    prefixes = (KOHYA_UNET_PREFIX,) + tuple(KOHYA_TEXT_PREFIXES)
    if detect_layout(adapter.tensors) == "kohya":
        return len({k.split(".", 1)[0] for k in adapter.tensors if k.startswith(prefixes)})
    return len({k.rsplit(".", 2)[0] for k in adapter.tensors if "lora" in k})
