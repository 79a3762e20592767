"""``fewstep inspect`` and ``fewstep export``: what an adapter file is, and the same LoRA in another layout."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..options import finite, int_list, positive_int


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
                   help="also load every tensor and run the checks every host runs: values finite and in range, weights "
                        "complete and well-formed for the file's kind; slower on large files")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="with --check: also put the adapter on this diffusers model folder (e.g. your teacher) as "
                        "fewstep eval would, so a pass means it loads on that model (default: the fit is not checked)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from ...core.adapter_file import AdapterFileError, describe, read_adapter, read_header
    from ..pipelines import TeacherError

    name = os.path.basename(args.file)
    if args.model and not args.check:
        print("error: --model needs --check (it checks the adapter against that model)", file=sys.stderr)
        return 2
    try:
        header = read_header(args.file)
        meta, inferred, notes = describe(header, name, args.base)
        if args.check:
            read_adapter(args.file, expected_base=args.base)
        if args.model:
            from ..pipelines import load_teacher
            from ..students import load_student  # diffusers: imported only when a model is named

            load_student(load_teacher(args.model), args.file)
    except (AdapterFileError, TeacherError) as exc:
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
        rows.append(("check", f"loads on {args.model}" if args.model else
                     f"all tensors finite, in range and complete for a {meta.kind} (fit to a model: add --model DIR)"))
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


def add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="convert a LoRA adapter: to fewstep's file, to diffusers, or to a PEFT folder",
        description="Read a fewstep adapter, any LoRA .safetensors (kohya, PEFT or diffusers keys: released Flash, LCM, TCD, "
        "Hyper-SD files) or a PEFT folder, and write it as: 'fewstep' (kohya keys + fewstep metadata, for the ComfyUI nodes and "
        "the A1111 extension), 'diffusers' (for pipe.load_lora_weights; rank and alpha kept in the file) or 'peft' (a folder for "
        "PeftModel.from_pretrained). Alpha always travels with the weights.",
    )
    p.add_argument("source", help="adapter file or PEFT folder")
    p.add_argument("--to", required=True, choices=["fewstep", "diffusers", "peft"], help="target layout")
    p.add_argument("--out", required=True, help="output file (fewstep, diffusers) or folder (peft)")
    p.add_argument("--alpha", type=finite, default=None, help="LoRA alpha for sources that do not store it (default: the rank)")
    p.add_argument("--base", default=None, choices=["sd15", "sdxl", "pixart"], help="base model, when the keys do not tell")
    p.add_argument("--steps", type=positive_int, default=None, help="with --to fewstep: default steps recorded in the file")
    p.add_argument("--timesteps", type=int_list, default=None, help="with --to fewstep: timesteps for --steps, e.g. 999,749,499,249")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    import dataclasses

    from ...core.adapter_file import AdapterFileError
    from ...core.lora import LoraKeyError
    from ..export import export_lora, read_any_lora

    try:
        modules, meta, notes = read_any_lora(args.source, alpha=args.alpha)
        changes = {k: v for k, v in {"base": args.base, "steps": args.steps, "timesteps": args.timesteps}.items() if v is not None}
        if args.steps is not None and args.timesteps is None and meta.timesteps is not None:
            changes["timesteps"] = meta.timesteps_for(args.steps)
        meta = dataclasses.replace(meta, **changes)
        if args.to == "fewstep" and meta.base == "unknown":
            raise AdapterFileError(f"{args.source}: the keys do not tell the base model; pass --base sd15|sdxl|pixart")
        meta.extra = {k: v for k, v in meta.extra.items() if k != "layout"}
        out = export_lora(modules, meta, args.to, args.out)
    except (AdapterFileError, LoraKeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {len(modules)} LoRA modules as {args.to}: {out}")
    return 0
