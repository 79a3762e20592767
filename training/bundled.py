"""The files fewstep ships in ``training/assets``: paths only, so the light modules (the CLI's recipes) can name them."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUNDLED_TEACHER = ASSETS / "proxy_teacher"
BUNDLED_FLASH = ASSETS / "proxy_flash_lora.safetensors"
BUNDLED_SUN = ASSETS / "proxy_sun_adapter.safetensors"
BUNDLED_ATTRIBUTES_TEACHER = ASSETS / "proxy_attributes_teacher"   # attributes.py's split
BUNDLED_TEACHER_DATA = {BUNDLED_TEACHER: "proxy", BUNDLED_ATTRIBUTES_TEACHER: "proxy-attributes"}   # the data each was trained on


def bundled_teacher_data(teacher: str | Path) -> str | None:
    """The dataset (a ``data.load_dataset`` spec) a bundled teacher was trained on; None for any other teacher."""
    resolved = Path(teacher).resolve()
    return next((data for path, data in BUNDLED_TEACHER_DATA.items() if path.resolve() == resolved), None)
