"""``fewstep bench``, ``fewstep eval`` and ``fewstep quickstart``: the proxy benchmark's commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..options import finite, positive_int


def add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure a named set of configurations on the proxy benchmark",
        description="Sample every configuration of a bench set on the same prompts and seeds; score FID against the held-out "
        "real images (EfficientNet-Lite0 features), prompt accuracy (bundled classifier), NFE and seconds per image. Writes "
        "OUT_DIR/<set>.json, OUT_DIR/<set>.md and a PNG grid per configuration.",
    )
    p.add_argument("--set", default="teacher", choices=["teacher", "flash", "guided", "sun", "gdd", "snapfusion", "data_free"],
                   help="'teacher' (50/25/8/4/2 steps with CFG), 'flash' (teacher 50/4/2 steps with CFG, Flash student 4/2/1 "
                   "steps), 'guided' (teacher with CFG vs a guided student at w = 3: 50 steps, 8/4/2/1 steps with DDIM and "
                   "stochastic sampling, and a sweep over w; needs --adapter) or 'sun' (teacher 50/8/4 steps with CFG vs a SUN "
                   "adapter at 4/8/2 steps, and how a class named as negative prompt disappears; needs --adapter) or 'gdd' "
                   "(one step: teacher 50 and 1 steps with CFG, the Flash student, and each GDD variant given: full, gdd_i, "
                   "lora; needs --adapter) or 'snapfusion' (8 steps: teacher 50 and 8 steps with CFG, the guided student, "
                   "SnapFusion students with CFG: full-size, without CFG-aware distillation, slim; per-pass latency of their "
                   "UNets and decoders; needs --adapter, and --plan for the block table) or 'data_free' (teacher 50 and 4 steps with "
                   "CFG, the Flash student trained on the real images and one trained on a `fewstep synth` set, at 4/2/1 "
                   "steps, and what synthesizing the set cost; needs --adapter)")
    p.add_argument("--teacher", default=None, help="teacher pipeline folder (default: the bundled proxy teacher)")
    p.add_argument("--per-class", type=positive_int, default=50, help="samples per prompt class (20 classes)")
    p.add_argument("--batch-size", type=positive_int, default=250, help="samples generated at once")
    p.add_argument("--out-dir", default="bench/results", help="where results go")
    p.add_argument("--adapter", action="append", default=None,
                   help="a student file for the set's student rows; repeat it to give several (each row takes a file of its "
                   "method, GDD's of its variant: the one made for its step count, e.g. one per progressive round, else the "
                   "first; rows with none are left out); flash rows: default the bundled proxy LoRA")
    p.add_argument("--plan", default=None, help="snapfusion: the `fewstep snap plan --out` file whose block table to include")
    p.set_defaults(run=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from ..bench import markdown_table, run_bench
    from ..evaluation import BUNDLED_TEACHER

    needs = {"guided": "a guided_student file from `fewstep train guided`", "sun": "a sun_adapter file from `fewstep train sun`",
             "gdd": "gdd_student files from `fewstep train gdd` (one per --variant to compare)",
             "data_free": "a flash_lora file trained on a `fewstep synth` set (`fewstep train flash --data-free` or --data)"}
    if args.set in needs and not args.adapter:
        print(f"error: --set {args.set} needs --adapter: {needs[args.set]}", file=sys.stderr)
        return 2
    document = run_bench(args.set, args.teacher or BUNDLED_TEACHER, args.per_class, args.batch_size, args.out_dir, adapter=args.adapter,
                         plan=args.plan)
    print(markdown_table(document), end="")
    return 0


def add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a model or a folder of images (FID, prompt accuracy, NFE, seconds per image)",
        description="Either sample a teacher pipeline at --steps/--cfg on the proxy prompt set and score it, or score an "
        "existing folder of captioned images (--images) by FID against the proxy held-out set or a --reference folder.",
    )
    p.add_argument("--teacher", default=None, help="pipeline folder to sample (default: the bundled proxy teacher)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: 25, or the adapter's own)")
    p.add_argument("--adapter", default=None, help="sample this adapter file on the teacher instead (no CFG, its sampler and timesteps)")
    p.add_argument("--cfg", type=finite, default=4.0, help="CFG scale (diffusers convention; 1 disables guidance)")
    p.add_argument("--per-class", type=positive_int, default=50, help="samples per prompt class")
    p.add_argument("--images", default=None, help="score this folder of images with .txt captions / metadata.jsonl instead")
    p.add_argument("--reference", default=None, help="with --images: real images to compare with (default: proxy held-out set)")
    p.add_argument("--clip-model", default=None,
                   help="with --images: a local CLIP model folder (transformers layout) to also report the CLIP score")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.images:
        from ..data import PROXY_CLASSES, read_image_folder
        from ..metrics import fid, fid_to_heldout
        from ..proxy_classifier import prompt_accuracy

        data = read_image_folder(args.images, size=32 if args.reference is None else None)
        result = {"images": len(data), "skipped": len(data.skipped)}
        if args.reference:
            result["fid"] = fid(data.images, read_image_folder(args.reference).images)
        else:
            result["fid"] = fid_to_heldout(data.images)
        if set(data.captions) <= set(PROXY_CLASSES):
            result["prompt_accuracy"] = prompt_accuracy(data.images, [PROXY_CLASSES.index(c) for c in data.captions])
        if args.clip_model:
            from ..clip_score import clip_score

            result["clip_score"] = clip_score(data.images, data.captions, args.clip_model)
    else:
        from ...core.adapter_file import AdapterFileError, read_header, describe
        from ..evaluation import BUNDLED_TEACHER
        from ..evaluation import StudentEntry, TeacherEntry, evaluate_entry
        from ..pipelines import load_teacher

        if args.adapter:
            try:
                steps = args.steps if args.steps is not None else describe(read_header(args.adapter), args.adapter)[0].steps
            except AdapterFileError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            entry = StudentEntry(steps, args.adapter, label=os.path.splitext(os.path.basename(args.adapter))[0])
        else:
            entry = TeacherEntry(args.steps if args.steps is not None else 25, args.cfg)
        try:
            result = evaluate_entry(load_teacher(args.teacher or BUNDLED_TEACHER), entry, args.per_class, 250)
        except AdapterFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:<18} {value:.4f}" if isinstance(value, float) else f"{key:<18} {value}")
    return 0


def add_quickstart(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="the main job end to end on the bundled teacher, in minutes on a CPU",
        description="Sample the bundled teacher at 25 and 4 steps, distil a Flash student for a short budget, sample it and the "
        "bundled fully trained Flash student at 4 steps, and write OUT_DIR/grid.png (one row per configuration), "
        "OUT_DIR/metrics.md and the quickstart's adapter file OUT_DIR/flash_lora.safetensors. A stopped quickstart "
        "continues where it stopped when rerun with the same options.",
    )
    p.add_argument("--out-dir", default="quickstart", help="where the grid, metrics and adapter go")
    p.add_argument("--per-class", type=positive_int, default=10, help="samples per prompt class used for the metrics")
    p.add_argument("--student-steps", type=positive_int, default=80, help="training steps of the quickstart's Flash student")
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing a stopped quickstart in OUT_DIR")
    p.set_defaults(run=run_quickstart_command)


def run_quickstart_command(args: argparse.Namespace) -> int:
    from ..data import DATA_PACKAGES, require_packages

    require_packages(DATA_PACKAGES)   # all of them, before the heavy imports below
    from ..bench import markdown_table
    from ..quickstart import run_quickstart

    document = run_quickstart(args.out_dir, per_class=args.per_class, student_steps=args.student_steps,
                              resume=not args.no_resume)
    print(markdown_table(document), end="")
    names = ", ".join(r["name"] for r in document["results"])
    print(f"grid: {args.out_dir}/grid.png (rows: {names}; columns: the 20 prompts)")
    print(f"adapter: {args.out_dir}/flash_lora.safetensors (fewstep inspect it; load it in ComfyUI or A1111 on an SD1.5-architecture model)")
    return 0
