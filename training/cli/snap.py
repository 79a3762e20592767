"""``fewstep snap``: SnapFusion step by step (robust, plan, slim, distill, decoder)."""

from __future__ import annotations

import argparse
import json
import sys

from ..options import finite, positive_int
from ..methods import snap_decoder, snapfusion
from .arguments import add_method_command, method_overrides
from .train import run_distillation


def add_snap(subparsers) -> None:
    snap = subparsers.add_parser(
        "snap", help="SnapFusion: train a UNet to tolerate skipped blocks, measure each block, plan a slimmer UNet",
        description="SnapFusion (Li et al. 2023), step by step: `robust` fine-tunes the teacher with blocks skipped at "
        "random; `plan` measures what each block costs (latency, on this machine) and is worth (proxy FID and prompt "
        "accuracy when it alone is skipped) and proposes a slimmer architecture under a latency budget; `slim` builds "
        "that UNet from the teacher's weights and distils it from the full teacher (learning v-prediction); `distill` "
        "halves its steps round by round with CFG-aware distillation and writes a snap_student file; `decoder` "
        "prunes the VAE decoder and distils it, to ship in the student file.")
    steps = snap.add_subparsers(title="step", metavar="STEP")
    add_method_command(
        steps, "robust", "fine-tune the teacher with cross-attention and ResNet blocks skipped at random",
        "Robust training: every step skips each ResNet and cross-attention block with --skip-probability (a skipped block "
        "passes its input through its residual shortcut), and trains on the data's denoising loss plus --distill-weight "
        "times the loss against the full teacher's prediction. Writes a diffusers pipeline folder with the same "
        "architecture and keys.",
        config_class=snapfusion.SnapConfig, presets=snapfusion.PRESETS, command="finetune", run_dir="snap-robust",
        out_name="pipeline", label="SnapFusion", out_what="the robust pipeline folder",
        sample_help="steps between 25-step sample grids of the full UNet (RUN_DIR/samples)", run=run_snap_robust)

    p = steps.add_parser(
        "plan", help="measure every block's latency and quality cost and propose which to remove",
        description="For each ResNet and cross-attention block: the share of a UNet pass it costs on this machine (the pass "
        "timed with and without it) and, on the proxy benchmark, FID and prompt accuracy with it alone skipped (DDIM with "
        "CFG). Then, greedily by cost (FID increase plus --accuracy-weight per accuracy point lost) per latency saved, "
        "the blocks to remove for a pass within --budget of the teacher's, in the units a standard diffusers/ComfyUI UNet "
        "config can express (a layer per level, a level's cross-attention, the mid block). Run it on the output of `fewstep snap robust`: a plain teacher has never learnt "
        "to miss a block.")
    p.add_argument("--teacher", default=None, help="pipeline folder to measure (default: the bundled proxy teacher)")
    p.add_argument("--budget", type=finite, default=0.7, help="target latency as a fraction of the full UNet pass")
    p.add_argument("--accuracy-weight", type=finite, default=1.0,
                   help="FID a removal may cost per point of prompt accuracy it loses, when ranking removals")
    p.add_argument("--per-class", type=positive_int, default=10, help="proxy samples per prompt class (20 classes) per block")
    p.add_argument("--steps", type=positive_int, default=25, help="sampling steps of the quality measurement")
    p.add_argument("--cfg-scale", type=finite, default=4.0, help="CFG scale of the quality measurement")
    p.add_argument("--latency-batch", type=positive_int, default=2, help="UNet batch timed (2: one image with CFG)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed passes per configuration (medians)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of the timed passes (on a GPU, float16 is how the UIs run SD); quality is measured in float32")
    p.add_argument("--latency-only", action="store_true",
                   help="time the blocks only (any SD1.5/SDXL UNet; quality needs a proxy-sized teacher)")
    p.add_argument("--out", default=None, help="also write the table and proposal as JSON here")
    p.set_defaults(run=run_snap_plan)

    p = add_method_command(
        steps, "slim", "build the planned slim UNet from the teacher's weights and distil it from the full teacher",
        "Builds the architecture of a `fewstep snap plan --out` file as a standard diffusers UNet config, copies every kept "
        "block's weights from the teacher, and trains it on the data's denoising loss plus --distill-weight times the loss "
        "against the full teacher's prediction. Writes the teacher's pipeline with the slim UNet.",
        config_class=snapfusion.SnapConfig, presets=snapfusion.PRESETS, command="finetune", run_dir="snap-slim",
        out_name="pipeline", label="SnapFusion", out_what="the slim pipeline folder",
        sample_help="steps between 25-step sample grids of the slim UNet (RUN_DIR/samples)", run=run_snap_slim)
    p.add_argument("--plan", required=True, help="JSON written by `fewstep snap plan --out` (its proposal's architecture)")

    p = add_method_command(
        steps, "distill", "distil the slim UNet to few steps: progressive rounds with CFG-aware distillation",
        "SnapFusion's step distillation on a `fewstep snap slim` pipeline (v-prediction): rounds in which the student "
        "learns to take in one DDIM step what its teacher (the previous round's student) takes in two, from --start-steps "
        "down to --target-steps. A share --cfg-probability of the batches applies CFG at a scale drawn in "
        "[--cfg-scale-min, --cfg-scale-max] to both teacher and student, plus --cfg-original-weight times the plain loss. "
        "Each round writes a snap_student file; the last is --out.",
        config_class=snapfusion.SnapConfig, presets=snapfusion.PRESETS, command="distill", run_dir="snap-distill",
        out_name="snap_student.safetensors", label="SnapFusion",
        sample_help="steps between sample grids of the round's student with CFG (RUN_DIR/round-*/samples)", run=run_snap_distill)
    p.add_argument("--decoder", default=None, help="a pruned decoder file (`fewstep snap decoder`) to ship in the student files")

    add_method_command(
        steps, "decoder", "prune the VAE decoder's channels and distil it from the original on teacher latents",
        "SnapFusion's efficient decoder: the VAE decoder with each level's channels cut to --keep (in whole GroupNorm "
        "groups), initialised from the original's first channels, trained to match the original decoder's images on "
        "latents the teacher samples from the dataset's captions (DDIM with CFG; no images needed). Writes a decoder file "
        "for `fewstep snap distill --decoder`.",
        config_class=snap_decoder.DecoderConfig, presets=snap_decoder.PRESETS, run_dir="snap-decoder",
        out_name="decoder.safetensors", label="decoder", out_what="the pruned decoder file",
        sample_help="unused: the decoder's run writes no sample grids", run=run_snap_decoder)


def run_snap_distill(args: argparse.Namespace) -> int:
    overrides = method_overrides(args, snapfusion.SnapConfig, command="distill")
    return run_distillation(args, "snapfusion", snapfusion.load_config, overrides, "snap_student.safetensors",
                            lambda **kw: snapfusion.train_step_distillation(decoder=args.decoder, **kw),
                            "snap_student written to {out}; sample it with FewStep KSampler (ComfyUI) or `fewstep eval`")


def run_snap_robust(args: argparse.Namespace) -> int:
    overrides = method_overrides(args, snapfusion.SnapConfig, command="finetune")
    return run_distillation(args, "snapfusion", snapfusion.load_config, overrides, "pipeline", snapfusion.train_robust,
                            "robust teacher written to {out}; next: fewstep snap plan --teacher {out}")


def run_snap_decoder(args: argparse.Namespace) -> int:
    overrides = method_overrides(args, snap_decoder.DecoderConfig)
    return run_distillation(args, "decoder", snap_decoder.load_config, overrides, "decoder.safetensors", snap_decoder.train_decoder,
                            "pruned decoder written to {out}; ship it with `fewstep snap distill --decoder {out}`")


def run_snap_slim(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..methods.snap_architecture import SlimArchitecture

    try:
        plan = json.loads(Path(args.plan).read_text())
        architecture = SlimArchitecture.from_dict(plan["proposal"]["architecture"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {args.plan} is not a plan with a proposed architecture (write one with `fewstep snap plan --out`): "
              f"{exc}", file=sys.stderr)
        return 2
    args.teacher = args.teacher or plan.get("teacher")
    overrides = method_overrides(args, snapfusion.SnapConfig, command="finetune")
    return run_distillation(args, "snapfusion", snapfusion.load_config, overrides, "pipeline",
                            lambda **kw: snapfusion.train_slim(architecture=architecture, **kw),
                            "slim pipeline written to {out}")


def run_snap_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..bundled import BUNDLED_TEACHER
    from ..methods import snap_blocks
    from ..methods.snap_architecture import propose_architecture
    from ..pipelines import TeacherError, load_teacher

    try:
        if not 0.0 < args.budget <= 1.0:
            raise ValueError(f"--budget is a fraction of the full pass, in (0, 1]; got {args.budget}")
        pipe = load_teacher(args.teacher or BUNDLED_TEACHER, device="cuda" if _cuda() else "cpu")
    except (ValueError, TeacherError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = snap_blocks.block_table(pipe, args.per_class, args.steps, args.cfg_scale, args.latency_batch, args.repeats,
                                    quality=not args.latency_only, dtype=getattr(torch, args.dtype))
    table["teacher"] = str(Path(args.teacher or BUNDLED_TEACHER).resolve())
    quality = table.get("quality")
    print(f"full UNet: {1000 * table['unet_seconds_per_pass']:.2f} ms per pass (batch {table['latency_batch']}, "
          f"{table['device']}, {table['dtype']})" + (f"; FID {quality['fid']:.2f}, prompt accuracy {quality['prompt_accuracy']:.3f} "
                                                    f"({quality['steps']} steps, CFG {quality['cfg_scale']:g}, {quality['samples']} samples)" if quality else ""))
    print("| block | kind | latency saved | " + ("FID skipped | FID increase | prompt accuracy |" if quality else ""))
    print("|---|---|---|" + ("---|---|---|" if quality else ""))
    for r in table["blocks"]:
        print(f"| {r['block']} | {r['kind']} | {100 * r['latency_saved']:.1f} % |" +
              (f" {r['fid']:.2f} | {r['fid_increase']:+.2f} | {r['prompt_accuracy']:.3f} |" if quality else ""))
    if quality:
        table["proposal"] = proposal = propose_architecture(table, args.budget, pipe.unet.config, args.accuracy_weight)
        print(f"for a pass within {args.budget:g} of the full one, remove: {'; '.join(proposal['steps']) or 'nothing'}; estimated "
              f"pass {proposal['estimated_latency']:.2f}, FID {proposal['estimated_fid_increase']:+.2f} before distillation"
              + ("" if proposal["met"] else " (the budget is out of reach: every unit that saves time is removed)"))
        if args.out:
            print(f"next: fewstep snap slim --plan {args.out} --teacher {args.teacher or BUNDLED_TEACHER}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=2) + "\n")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
