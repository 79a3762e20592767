"""The ``fewstep`` command line. Each subcommand lives in its own ``add_*`` function; heavy imports stay inside."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .. import __version__


def add_inspect(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show what an adapter file is and how to sample with it",
        description="Print an adapter file's kind, base model, sampler, steps, timesteps, guidance range and provenance. "
        "Files without fewstep metadata (LCM/TCD/Hyper-SD/Flash LoRAs, the released SUN adapter) are identified from "
        "their keys. Exits 1 with a one-line reason if the file cannot be used.",
    )
    p.add_argument("file", help="path to a .safetensors adapter file")
    p.add_argument("--base", choices=["sd15", "sdxl", "pixart"], default=None,
                   help="the base model you want to use it with; a mismatch is reported as an error")
    p.add_argument("--check", action="store_true",
                   help="also load every tensor and check values (NaN/Inf) and completeness; slower on large files")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from ..core.adapter_file import AdapterFileError, describe, read_adapter, read_header

    name = os.path.basename(args.file)
    try:
        header = read_header(args.file)
        meta, inferred, notes = describe(header, name, args.base)
        if args.check:
            read_adapter(args.file, expected_base=args.base)
    except AdapterFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    params = sum(_numel(s) for s in header.shapes.values())
    if args.json:
        print(json.dumps({"file": args.file, "metadata": meta.to_strings(), "inferred": inferred, "notes": notes,
                          "tensors": len(header.shapes), "parameters": params, "bytes": header.data_bytes}, indent=2))
        return 0
    rows = [
        ("file", args.file),
        ("kind", meta.kind + ("  (inferred)" if inferred else "")),
        ("base", meta.base),
        ("prediction", meta.prediction),
        ("sampler", meta.sampler),
        ("steps", str(meta.steps)),
        ("timesteps", ", ".join(map(str, meta.timesteps)) if meta.timesteps else "lcm spacing"),
    ]
    if meta.guidance:
        rows.append(("guidance", ", ".join(f"{k}={v}" for k, v in sorted(meta.guidance.items()))))
    for key, value in sorted(meta.provenance.items()):
        rows.append((f"provenance.{key}", str(value)))
    for key, value in sorted(meta.extra.items()):
        rows.append((f"extra.{key}", str(value)))
    dtypes = sorted(set(header.dtypes.values()))
    rows.append(("tensors", f"{len(header.shapes)} ({', '.join(dtypes)}), {params:,} parameters, {header.data_bytes / 2**20:.1f} MiB"))
    if args.check:
        rows.append(("check", "all tensors finite and complete"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for note in notes:
        print(f"note: {note}")
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewstep",
        description="Few-step diffusion: train, export and inspect adapters that sample SD1.5/SDXL in 1-8 steps.",
    )
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_inspect(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
