"""A method's options: its config dataclass from a preset, then a JSON file, then flags (each layer validated), and
the options of the run itself (``RunOptions``), whatever it learns.

Each option is written once, as a config field declared with ``option`` (its default and help); the command line's
flag for it is generated from the field. The option groups several methods share (the optimiser's, a student LoRA's)
are small dataclasses the methods' configs inherit, re-declaring only the defaults that differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

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


# --- what a command-line option reads -----------------------------------------------------------------------------
# argparse types: a bad value is a one-line usage error before any work starts.

def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what} (got {value})")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
count = _int_at_least(0, "0 or more")


def finite(text: str) -> float:
    """A finite number (float() also takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1) (a dropout rate, an EMA decay)."""
    value = finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (got {text})")
    return value


def positive_float(text: str) -> float:
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text})")
    return value


def str_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    return [int(t) for t in str_list(text)]


def float_list(text: str) -> list[float]:
    return [finite(t) for t in str_list(text)]


# --- options defined once: a config field with its help -----------------------------------------------------------

def option(default, help: str, *, parse: Optional[Callable[[str], Any]] = None, choices: Optional[Sequence[str]] = None,
           command: Optional[str] = None):
    """A config field that is also a command-line option: the ``--flag`` is generated from the field
    (``cli.arguments.add_method_options``), with ``help`` and the presets' values as its defaults. ``parse`` reads the
    flag's text (default: by the default's type: a positive integer, a finite number, a comma-separated list);
    ``command``: only that subcommand takes the flag (one config serving several)."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "choices": choices, "command": command})


@dataclass(frozen=True)
class CommandLineOption:
    name: str
    help: str
    parse: Optional[Callable[[str], Any]]   # None: an on/off flag
    choices: Optional[Sequence[str]]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def command_line_options(config_class, command: Optional[str] = None) -> list[CommandLineOption]:
    """The options of ``config_class`` that ``command`` takes, in field order. A field that a subclass declares again
    with its own default keeps the help of the class that made it an option."""
    found = []
    for field in dataclasses.fields(config_class):
        meta = next((c.__dataclass_fields__[field.name].metadata for c in config_class.__mro__
                     if field.name in getattr(c, "__dataclass_fields__", {}) and c.__dataclass_fields__[field.name].metadata), None)
        if meta is None or meta["command"] not in (None, command):
            continue
        found.append(CommandLineOption(field.name, meta["help"], _parser_for(field.default, meta["parse"]), meta["choices"]))
    return found


def _parser_for(default, parse):
    if parse is not None or isinstance(default, bool):
        return parse
    if isinstance(default, tuple) and default:
        return {str: str_list, int: int_list, float: float_list}[type(default[0])]
    return {int: positive_int, float: finite, str: str}[type(default)]


# --- the option groups several methods share ----------------------------------------------------------------------

@dataclass
class OptimiserOptions:
    """A method trained on one objective for a number of steps on the shared loop."""

    steps: int = option(10000, "optimiser steps")
    lr: float = option(1e-5, "learning rate", parse=positive_float)
    warmup_steps: int = option(0, "linear learning-rate warm-up", parse=count)
    batch_size: int = option(8, "images per step per GPU")
    ema_decay: Optional[float] = option(0.999, "EMA decay of the exported weights", parse=fraction)
    grad_clip: float = 1.0   # max gradient norm; 0 disables


@dataclass
class CheckpointingOption:
    gradient_checkpointing: bool = option(False, "trade compute for memory (recompute activations in the backward pass)")


@dataclass
class LoraOptions:
    """A student LoRA (PEFT) on the teacher UNet's attention projections."""

    lora_rank: int = option(64, "LoRA rank", parse=count)
    lora_alpha: Optional[float] = option(None, "LoRA alpha (none: the rank)", parse=positive_float)
    lora_targets: tuple[str, ...] = option(("to_q", "to_k", "to_v", "to_out.0"), "comma-separated module names")

    @property
    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)
