"""A method's options: its config dataclass from a preset, then a JSON file, then flags (each layer validated), and
the options of the run itself (``RunOptions``), whatever it learns."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TypeVar

Config = TypeVar("Config")


def replace_options(config: Config, label: str, **changes) -> Config:
    """A copy of a method's config dataclass with some options changed; JSON lists become tuples. Unknown names
    raise a ValueError with a "did you mean" and the valid names."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - names)
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, 1)) else u for u in unknown]
        raise ValueError(f"unknown {label} option(s) {', '.join(hints)}; valid options: {', '.join(sorted(names))}")
    return dataclasses.replace(config, **{k: _as_tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


def _as_tuple(value):
    return tuple(_as_tuple(v) if isinstance(v, list) else v for v in value)


def load_options(presets: dict[str, Config], label: str, preset: str, config_file: Optional[str | Path] = None,
                 **overrides) -> Config:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored); validated."""
    if preset not in presets:
        raise ValueError(f"unknown {label} preset {preset!r}; expected one of {', '.join(presets)}")
    config = presets[preset]
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        try:
            options = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise ValueError(f"config file {path} must hold a JSON object of {label} options ({{\"name\": value, ...}}); "
                             f"found a JSON {type(options).__name__}")
        config = replace_options(config, label, **options)
    config = replace_options(config, label, **{k: v for k, v in overrides.items() if v is not None})
    nonfinite = [f.name for f in dataclasses.fields(config) if _has_nonfinite(getattr(config, f.name))]
    if nonfinite:
        raise ValueError(f"{label} option(s) {', '.join(nonfinite)} must be finite numbers (not NaN or infinity)")
    config.validate()
    return config


def _has_nonfinite(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_has_nonfinite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


@dataclass(frozen=True)
class RunOptions:
    """How a training run runs, whatever it learns: the training loop's mechanics. Every ``train_*`` takes them as
    keywords (``**run_options``) and the CLI's run flags set them."""

    mixed_precision: str = "no"
    checkpoint_every: int = 250
    sample_every: int = 250
    log_every: int = 25
    seed: int = 0
    resume: bool = True
    progress: bool = True
    stop_after: Optional[int] = None   # stop, as if killed, after this many steps (resume later)

    def stops_before(self, total_steps: int) -> bool:
        """Whether ``stop_after`` ends the run before ``total_steps``: then nothing is exported."""
        return self.stop_after is not None and self.stop_after < total_steps
