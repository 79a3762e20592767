"""``fewstep bench``, ``fewstep eval`` and ``fewstep quickstart``: the proxy benchmark's commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..options import count, finite, positive_int
from ..reproduce import RECIPES


BENCH_SET_HELP = (
    "'teacher' (50 steps with CFG 4 and with its best CFG on validation, 25/8/4/2 steps with CFG 4), 'cfg' (the teacher "
    "at 50 steps over CFG scales: run it on --split validation, where the best CFG is chosen), 'flash' (teacher 50/4/2 "
    "steps with CFG, Flash student 4/2/1 steps) or 'guided' (teacher with CFG vs a guided student at w = 3: 50 steps, "
    "8/4/2/1 steps with DDIM and stochastic sampling, and a sweep over w; needs --adapter) or 'sun' (teacher 50/8/4 steps "
    "with CFG vs a SUN adapter at 4/8/2 steps, and how a class named as negative prompt disappears; needs --adapter) or "
    "'gdd' (one step: teacher 50 and 1 steps with CFG, the Flash student, and each GDD variant given: full, gdd_i, lora; "
    "needs --adapter) or 'snapfusion' (8 steps: teacher 50 and 8 steps with CFG, the guided student, SnapFusion students "
    "with CFG: full-size, without CFG-aware distillation, slim; per-pass latency of their UNets and decoders; needs "
    "--adapter, and --plan for the block table) or 'data_free' (teacher 50 and 4 steps with CFG, the Flash student trained "
    "on the real images and one trained on a `fewstep synth` set, at 4/2/1 steps, and what synthesizing the set cost; "
    "needs --adapter). Every set also holds the teacher at 50 steps with CFG 4 and at its best CFG, the rows the others "
    "are compared with. On the attributes split (coloured items on coloured backgrounds, pairs side by side; scored by "
    "per-attribute accuracy), with its own teacher: 'attributes' (that teacher at 50/8/4/2 steps with CFG 4 and without "
    "CFG, and Flash and SUN students distilled from it at 4/2 steps, given with --adapter) and 'attributes_cfg' (its CFG "
    "sweep, for --split validation). Repeat --set to run several sets in one process: a configuration they share is "
    "sampled once.")


def add_split_options(p, split: str, per_class: int, seed_sets: int) -> None:
    """The prompt-set layout options `bench` and `eval` share."""
    from ..evaluation import SPLITS
    from ..scores import RESAMPLES

    p.add_argument("--split", default=split, choices=sorted(SPLITS),
                   help="prompts x seeds to sample: make every choice on 'validation', report 'test'")
    p.add_argument("--per-class", type=positive_int, default=per_class, help="samples per prompt class (20 classes) in each seed set")
    p.add_argument("--seed-sets", type=positive_int, default=seed_sets,
                   help="disjoint seed sets, each scored on its own too (the spread beside the bootstrap interval)")
    p.add_argument("--resamples", type=count, default=RESAMPLES, help="bootstrap draws for each score's 95 %% interval (0: none)")


def add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure a named set of configurations on the proxy benchmark",
        description="Sample every configuration of a bench set on the same prompts and seeds of one split; score FID against "
        "the class-balanced held-out real images in two feature spaces (EfficientNet-Lite0, the proxy classifier's), class "
        "FID, precision and recall, prompt accuracy (bundled classifier), each with its 95 %% interval, NFE and seconds per "
        "image; say which rows differ from the teacher baselines beyond the noise. Writes OUT_DIR/<set>.json (test split; "
        "<set>_validation.json for validation), the markdown table beside it and a PNG grid per configuration.",
    )
    p.add_argument("--set", action="append", default=None, choices=sorted(BENCH_SET_NAMES), help=BENCH_SET_HELP + " (default: teacher)")
    p.add_argument("--teacher", default=None, help="teacher pipeline folder (default: the bundled proxy teacher; for the "
                   "attributes sets, the bundled teacher trained on that split)")
    add_split_options(p, "test", 25, 2)
    p.add_argument("--batch-size", type=positive_int, default=250, help="samples generated at once")
    p.add_argument("--out-dir", default="bench/results", help="where results go")
    p.add_argument("--adapter", action="append", default=None,
                   help="a student file for the set's student rows; repeat it to give several (each row takes a file of its "
                   "method, GDD's of its variant: the one made for its step count, e.g. one per progressive round, else the "
                   "first; rows with none are left out); flash rows: default the bundled proxy LoRA")
    p.add_argument("--plan", default=None, help="snapfusion: the `fewstep snap plan --out` file whose block table to include")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the rows an earlier run saved in OUT_DIR/<set>-rows/ with the same teacher and adapter files "
                   "and options (a stopped bench continues; their s / image is that run's); --no-resume scores every row anew")
    p.add_argument("--reproduce", default=None, choices=sorted(RECIPES),
                   help="retrain a set's students with the options they were trained with (the bundled Flash and SUN files "
                   "too; --dry-run lists the commands), then bench them; every step is resumable: rerun to continue")
    p.add_argument("--runs-dir", default="runs/reproduce", help="--reproduce: where its training runs go")
    p.add_argument("--dry-run", action="store_true", help="--reproduce: print the commands it would run, run nothing")
    p.set_defaults(run=run_bench_command)



BENCH_SET_NAMES = ("teacher", "cfg", "flash", "guided", "sun", "gdd", "snapfusion", "data_free", "attributes", "attributes_cfg")
NEEDS_ADAPTER = {"guided": "a guided_student file from `fewstep train guided`", "sun": "a sun_adapter file from `fewstep train sun`",
                 "gdd": "gdd_student files from `fewstep train gdd` (one per --variant to compare)",
                 "data_free": "a flash_lora file trained on a `fewstep synth` set (`fewstep train flash --data-free` or --data)"}


def run_bench_command(args: argparse.Namespace) -> int:
    import torch

    from ..bench import BENCH_SETS, markdown_table, run_bench
    from ..pipelines import load_teacher

    if args.reproduce:
        return run_reproduce(args)
    if args.dry_run:
        print("error: --dry-run goes with --reproduce", file=sys.stderr)
        return 2
    sets = list(dict.fromkeys(args.set or ["teacher"]))
    for name in sets:
        if name in NEEDS_ADAPTER and not args.adapter:
            print(f"error: --set {name} needs --adapter: {NEEDS_ADAPTER[name]}", file=sys.stderr)
            return 2
    pipes, samples = {}, {}   # each teacher loaded once
    for name in sets:
        teacher = args.teacher or BENCH_SETS[name].teacher
        if teacher not in pipes:
            pipes[teacher] = load_teacher(teacher, device="cuda" if torch.cuda.is_available() else "cpu")
        document = run_bench(name, teacher, args.per_class, args.batch_size, args.out_dir, adapter=args.adapter, plan=args.plan,
                             split=args.split, seed_sets=args.seed_sets, resamples=args.resamples, samples=samples,
                             pipe=pipes[teacher], resume=args.resume)
        print(markdown_table(document), end="")
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    """Run a recipe's commands (its runs under --runs-dir), then its bench with the split and layout options given;
    stop at the first that fails. Each runs as its own process, as if typed at a shell. With --dry-run, print them only."""
    import shlex
    import subprocess

    if args.set or args.adapter or args.teacher or args.plan:
        print("error: --reproduce names its own --set, --adapter and --plan, on the bundled teacher; give it the split and "
              "layout options only", file=sys.stderr)
        return 2
    options = ["--split", args.split, "--per-class", str(args.per_class), "--seed-sets", str(args.seed_sets),
               "--resamples", str(args.resamples), "--batch-size", str(args.batch_size), "--out-dir", args.out_dir]
    recipe = RECIPES[args.reproduce]
    commands = recipe.commands(args.runs_dir)
    commands[-1] += options
    print(f"reproducing {recipe.what}", flush=True)
    for number, command in enumerate(commands, 1):
        print(f"[{number}/{len(commands)}] fewstep {shlex.join(command)}", flush=True)
        status = 0 if args.dry_run else subprocess.run([sys.executable, "-m", "fewstep.training.cli", *command]).returncode
        if status:
            return status
    return 0


def add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a model or a folder of images (FID, class FID, precision/recall, prompt accuracy, NFE, s/image)",
        description="Either sample a teacher pipeline at --steps/--cfg (or an --adapter on it) on the proxy prompt set of a "
        "split and score it, each score with its 95 %% interval, or score an existing folder of captioned images "
        "(--images) against the proxy held-out set or by FID against a --reference folder.",
    )
    p.add_argument("--teacher", default=None, help="pipeline folder to sample (default: the bundled proxy teacher)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: 25, or the adapter's own)")
    p.add_argument("--adapter", default=None, help="sample this adapter file on the teacher instead (no CFG, its sampler and timesteps)")
    p.add_argument("--cfg", type=finite, default=4.0, help="CFG scale (diffusers convention; 1 disables guidance)")
    add_split_options(p, "validation", 50, 1)
    p.add_argument("--images", default=None, help="score this folder of images with .txt captions / metadata.jsonl instead")
    p.add_argument("--reference", default=None, help="with --images: real images to compare with (default: proxy held-out set)")
    p.add_argument("--clip-model", default=None,
                   help="with --images: a local CLIP model folder (transformers layout) to also report the CLIP score")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.images:
        from ..data import PROXY_CLASSES, read_image_folder
        from ..metrics import fid
        from ..scores import score_images

        data = read_image_folder(args.images, size=32 if args.reference is None else None)
        result = {"images": len(data), "skipped": len(data.skipped)}
        if args.reference:
            result["fid"] = fid(data.images, read_image_folder(args.reference).images)
        elif set(data.captions) <= set(PROXY_CLASSES):
            result.update(score_images(data.images, [PROXY_CLASSES.index(c) for c in data.captions], resamples=args.resamples))
            result.pop("replicates", None)
        else:
            print("error: without --reference the images' captions must be proxy prompts (\"a handwritten digit seven\", ...); "
                  "give --reference REAL_FOLDER to score other images by FID", file=sys.stderr)
            return 2
        if args.clip_model:
            from ..clip_score import clip_score

            result["clip_score"] = clip_score(data.images, data.captions, args.clip_model)
    else:
        from ...core.adapter_file import AdapterFileError, read_header, describe
        from ..bundled import BUNDLED_TEACHER
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
            result = evaluate_entry(load_teacher(args.teacher or BUNDLED_TEACHER), entry, args.per_class, 250, split=args.split,
                                    seed_sets=args.seed_sets, resamples=args.resamples)
        except AdapterFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        result.pop("replicates", None)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        intervals = result.pop("intervals", {})
        for key, value in result.items():
            if key in intervals:
                low, high = intervals[key]
                print(f"{key:<18} {value:.4f} ± {(high - low) / 2:.4f}")
            elif isinstance(value, float):
                print(f"{key:<18} {value:.4f}")
            elif not isinstance(value, dict):
                print(f"{key:<18} {value}")
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
