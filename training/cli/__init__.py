"""The ``fewstep`` command line, one module per command group: ``adapters`` (inspect, export), ``train`` (train,
synth), ``snap`` (SnapFusion's steps), ``measure`` (bench, eval, quickstart); what several commands take is written once
in ``arguments``, each method's own options once in its config dataclass. Heavy imports stay inside the commands."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional, Sequence

from ... import __version__
from . import adapters, measure, snap, train


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help says its default (unless it has none, or the help already says it)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or "default" in text:
            return text
        return text + " (default: %(default)s)"


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error: `error: argument --lr: must be positive (got 0)`; ``--help``
    shows defaults (the subcommands' parsers are of this class too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="fewstep",
        description="Few-step diffusion: train, export and inspect adapters that sample SD1.5/SDXL in 1-8 steps.",
    )
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    adapters.add_inspect(subparsers)
    train.add_train(subparsers)
    measure.add_bench(subparsers)
    measure.add_eval(subparsers)
    adapters.add_export(subparsers)
    measure.add_quickstart(subparsers)
    snap.add_snap(subparsers)
    train.add_synth(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        if int(os.environ.get("RANK", "0")) != 0:
            # One report per run under accelerate launch / torchrun: the other processes keep only stderr (errors).
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                code = args.run(args)
        else:
            code = args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()) or os.environ.get("FEWSTEP_DEBUG"):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    from ..loop import end_process_group

    end_process_group()
    return code


def _user_errors() -> tuple[type, ...]:
    """What main reports as one `error:` line (set FEWSTEP_DEBUG=1 for the traceback): bad inputs, and the operating
    system's refusals (a missing file, a read-only or full folder). Anything else is a bug and keeps its traceback."""
    from ...core.adapter_file import AdapterFileError
    from ...core.lora import LoraKeyError
    from ..errors import UserError
    from ..pipelines import TeacherError
    from ..synth_sets import SynthError

    return UserError, TeacherError, SynthError, AdapterFileError, LoraKeyError, OSError


def _one_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or exc.__class__.__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
