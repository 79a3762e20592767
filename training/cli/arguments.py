"""What several commands take, written once: the teacher and data a method trains on, the run's mechanics, and each
method's own options, generated from its config dataclass (``options.option`` fields) with the presets' values."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..options import command_line_options, count, finite, positive_int


def add_teacher_source(p) -> None:
    p.add_argument("--teacher", default=None,
                   help="diffusers pipeline folder or single-file checkpoint, SD1.5 or SDXL (default: the bundled proxy teacher)")
    p.add_argument("--teacher-config", default=None,
                   help="for a single-file teacher: a diffusers folder of the same base model to take configs and tokenizer from")


def add_teacher_args(p, method: str, out_name: str, label: str, out_what: str = "the adapter file") -> None:
    """What every distillation command takes: teacher, data, where to write, preset and config file."""
    add_teacher_source(p)
    p.add_argument("--data", default=None,
                   help="'proxy' (bundled digits + animals, the default), 'proxy-attributes' (the same coloured and in "
                   "pairs: the default for the bundled attributes teacher), a folder of images with .txt captions / "
                   "metadata.jsonl (a `fewstep synth` folder too, images or latents), or webdataset shards ('shards/*.tar')")
    p.add_argument("--data-free", default=None, metavar="PROMPTS",
                   help="no dataset: the teacher first writes its own (latents) into RUN_DIR/synth from these prompts "
                   "(a text file, one per line, or a built-in set: proxy, proxy-classes), then the method trains on it; "
                   "a rerun continues both")
    p.add_argument("--synth-count", type=positive_int, default=10000, help="--data-free: samples in the set")
    p.add_argument("--synth-steps", type=positive_int, default=25, help="--data-free: teacher sampling steps, DDIM")
    p.add_argument("--synth-cfg", type=finite, default=None,
                   help="--data-free: the teacher's CFG scale (default: 4 for the bundled teachers and fine-tunes of them, 7.5 otherwise)")
    p.add_argument("--resolution", type=positive_int, default=None, help="training image size (default: the teacher's native size)")
    p.add_argument("--run-dir", default=f"runs/{method}", help="checkpoints, logs (metrics.jsonl, TensorBoard) and sample grids")
    p.add_argument("--out", default=None, help=f"{out_what} to write (default: RUN_DIR/{out_name})")
    p.add_argument("--preset", default=None, choices=["paper", "proxy"],
                   help="option defaults: the paper's SD setup, or the CPU-sized proxy setup (default: proxy for the bundled "
                   "teachers, paper otherwise)")
    p.add_argument("--config", default=None, help=f"JSON file of {label} options (field names as in `--dry-run` output)")


def add_run_args(p, sample_help: str, checkpoint_every: int = 250, sample_every: int = 250,
                 stop_help: str = "stop after this many steps (resume later)") -> None:
    """Run mechanics every training command shares (``options.RunOptions``)."""
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="accelerate mixed precision; auto = bf16 on CUDA (frozen teacher in bf16), off on CPU")
    p.add_argument("--checkpoint-every", type=positive_int, default=checkpoint_every,
                   help="steps between checkpoints")
    p.add_argument("--sample-every", type=count, default=sample_every, help=sample_help)
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and noise")
    p.add_argument("--resume", dest="no_resume", action="store_false", default=False,
                   help="continue from RUN_DIR's newest checkpoint (the default)")
    p.add_argument("--no-resume", dest="no_resume", action="store_true", help="start over, removing RUN_DIR's checkpoints")
    p.add_argument("--stop-after", type=positive_int, default=None, help=stop_help)
    p.add_argument("--dry-run", action="store_true", help="print and save the configuration, train nothing")


PRECEDENCE = "Option precedence: preset < --config FILE < flags. Rerun the same command to resume."


def add_method_command(commands, name: str, help: str, description: str, *, config_class, presets: dict, out_name: str,
                       label: str, sample_help: str, run, run_dir: Optional[str] = None, command: Optional[str] = None,
                       out_what: str = "the adapter file"):
    """A distillation command: its teacher and data, its method's options, the run's mechanics; returns the parser for
    the arguments that are its own."""
    p = commands.add_parser(name, help=help, description=f"{description} {PRECEDENCE}")
    add_teacher_args(p, run_dir or name, out_name, label, out_what)
    add_method_options(p, config_class, presets, command)
    add_run_args(p, sample_help)
    p.set_defaults(run=run)
    return p


def add_method_options(p, config_class, presets: dict, command: Optional[str] = None) -> None:
    """One flag per option field of ``config_class`` (``--lora-rank`` for ``lora_rank``), its help followed by the
    presets' values; a flag left out keeps the preset's (or --config's) value."""
    group = p.add_argument_group("method options (override preset and --config)")
    for option in command_line_options(config_class, command):
        text = (option.help + _preset_values(option.name, presets)).replace("%", "%%")
        if option.parse is None:
            group.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(option.flag, type=option.parse, choices=option.choices, default=None, help=text)


def method_overrides(args: argparse.Namespace, config_class, command: Optional[str] = None) -> dict:
    """The method options given as flags (None: not given)."""
    return {option.name: getattr(args, option.name) for option in command_line_options(config_class, command)}


def _preset_values(name: str, presets: dict) -> str:
    values = {label: _shown(getattr(config, name)) for label, config in presets.items()}
    if len(set(values.values())) == 1:
        return f" (default: {next(iter(values.values()))})"
    return " (" + ", ".join(f"{label}: {value}" for label, value in values.items()) + ")"


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "bf16" if torch.cuda.is_available() else "no"


def announce(run_dir: str, options: dict, dry_run: bool) -> bool:
    """Print a run's resolved options and save them as RUN_DIR/training_options.json; True for a dry run."""
    print(json.dumps(options, indent=2))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "training_options.json").write_text(json.dumps(options, indent=2) + "\n")
    return dry_run
