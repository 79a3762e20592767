"""The ``fewstep`` command line. Each subcommand lives in its own ``add_*`` function; heavy imports stay inside."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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
                   help="also load every tensor and run the checks every host runs: values finite and in range, weights "
                        "complete and well-formed for the file's kind; slower on large files")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="with --check: also put the adapter on this diffusers model folder (e.g. your teacher) as "
                        "fewstep eval would, so a pass means it loads on that model (default: the fit is not checked)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from ..core.adapter_file import AdapterFileError, describe, read_adapter, read_header
    from .pipelines import TeacherError

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
            from .pipelines import load_teacher
            from .students import load_student  # diffusers: imported only when a model is named

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


def add_train(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a teacher or distil a few-step adapter",
                                  description="Training commands. Every run is resumable: rerun the same command to continue.")
    methods = train.add_subparsers(title="what to train", metavar="KIND")
    p = methods.add_parser(
        "teacher",
        help="train an SD-architecture text-to-image teacher from scratch (the proxy benchmark's teacher)",
        description="Train a small Stable-Diffusion-architecture model (AutoencoderKL, frozen CLIP text encoder with the real "
        "tokenizer, cross-attention UNet, SD noise schedule, eps-prediction) in two resumable stages, and save it as a "
        "diffusers pipeline folder that every fewstep command loads like SD1.5.",
    )
    p.add_argument("--data", default="proxy",
                   help="'proxy' (the bundled digits + animal silhouettes), a folder of images with .txt captions / metadata.jsonl, "
                   "or webdataset shards ('shards/*.tar'); images are resized to 32x32")
    p.add_argument("--run-dir", default="runs/teacher", help="checkpoints, logs (metrics.jsonl, TensorBoard) and sample grids")
    p.add_argument("--out", default=None, help="where to write the pipeline folder (default: RUN_DIR/pipeline)")
    p.add_argument("--preset", default="proxy", choices=["proxy", "tiny"], help="network sizes: proxy (bundled teacher) or tiny (tests)")
    p.add_argument("--vae-steps", type=_positive_int, default=3000, help="autoencoder training steps")
    p.add_argument("--unet-steps", type=_positive_int, default=12000, help="UNet training steps")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per step")
    p.add_argument("--vae-lr", type=_positive_float, default=1e-3, help="autoencoder learning rate")
    p.add_argument("--unet-lr", type=_positive_float, default=5e-4, help="UNet learning rate")
    p.add_argument("--caption-dropout", type=_fraction, default=0.1, help="fraction of captions replaced by the empty prompt (for CFG)")
    p.add_argument("--ema-decay", type=_fraction, default=0.999, help="EMA decay of the exported UNet weights")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="accelerate mixed precision; auto = bf16 on CUDA, off on CPU")
    p.add_argument("--checkpoint-every", type=_positive_int, default=500, help="steps between checkpoints")
    p.add_argument("--sample-every", type=_count, default=1000, help="steps between sample grids (RUN_DIR/samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and noise")
    p.add_argument("--resume", dest="no_resume", action="store_false", default=False,
                   help="continue each stage from its newest checkpoint in RUN_DIR (the default)")
    p.add_argument("--no-resume", dest="no_resume", action="store_true", help="start over, removing RUN_DIR's checkpoints")
    p.add_argument("--stop-after", type=_positive_int, default=None, help="stop the UNet stage after this many steps (resume later)")
    p.add_argument("--dry-run", action="store_true", help="print and save the configuration, train nothing")
    p.set_defaults(run=run_train_teacher)
    add_train_finetune(methods)
    add_train_flash(methods)
    add_train_guided(methods)
    add_train_sun(methods)
    add_train_gdd(methods)


def add_train_finetune(methods) -> None:
    p = methods.add_parser(
        "finetune",
        help="fine-tune a teacher's UNet on a dataset (a style or subject), as users fine-tune SD1.5 models",
        description="Fine-tune the UNet of an SD1.5-architecture pipeline on captioned images (VAE and text encoder frozen, "
        "captions dropped 10%% of the time so CFG keeps working) and save the result as a pipeline folder. It makes the "
        "fine-tuned models that plug-in adapters (SUN) must carry over to, and the teachers of data-free distillation.",
    )
    p.add_argument("--teacher", default=None, help="pipeline folder or single-file checkpoint (default: the bundled proxy teacher)")
    p.add_argument("--teacher-config", default=None, help="for a single-file teacher: a diffusers folder with its configs")
    p.add_argument("--data", default="proxy-mirrored",
                   help="'proxy', 'proxy-mirrored' / 'proxy-inverted' (the bundled set mirrored or in inverted colours: a "
                   "style), a folder of images with .txt captions / metadata.jsonl, or webdataset shards")
    p.add_argument("--run-dir", default="runs/finetune", help="checkpoints, logs and sample grids")
    p.add_argument("--out", default=None, help="the fine-tuned pipeline folder (default: RUN_DIR/pipeline)")
    p.add_argument("--steps", type=_positive_int, default=1000, help="UNet training steps")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per step")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="UNet learning rate")
    p.add_argument("--caption-dropout", type=_fraction, default=0.1, help="fraction of captions replaced by the empty prompt")
    p.add_argument("--ema-decay", type=_fraction, default=0.999, help="EMA decay of the exported UNet weights")
    _add_run_args(p, sample_help="steps between sample grids (RUN_DIR/samples)")
    p.set_defaults(run=run_train_finetune)


def run_train_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation import BUNDLED_TEACHER
    from .data import check_dataset
    from .loop import lock_run_dir
    from .pipelines import TeacherError

    options = {"teacher": args.teacher or str(BUNDLED_TEACHER), "data": args.data, "run_dir": args.run_dir,
               "out": args.out or str(Path(args.run_dir) / "pipeline"), "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "caption_dropout": args.caption_dropout, "ema_decay": args.ema_decay,
               "mixed_precision": _mixed_precision(args.mixed_precision), "seed": args.seed}
    check_dataset(args.data)
    with lock_run_dir(args.run_dir):
        if _announce(args.run_dir, options, args.dry_run):
            return 0
        from .teacher import finetune_teacher

        try:
            out = finetune_teacher(teacher_config=args.teacher_config, checkpoint_every=args.checkpoint_every,
                                   sample_every=args.sample_every, resume=not args.no_resume, stop_after=args.stop_after,
                                   **options)
        except (TeacherError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"fine-tuned pipeline written to {out}" if out else f"stopped after step {args.stop_after}; rerun to continue")
    return 0


def add_train_flash(methods) -> None:
    p = methods.add_parser(
        "flash",
        help="distil a teacher into a Flash Diffusion LoRA (1-4 steps, no CFG)",
        description="Flash Diffusion (Chadebec et al. 2024): train a LoRA on the teacher UNet so that it samples in 1-4 "
        "consistency steps without CFG, from the teacher's own multistep CFG rollouts, a DMD term and an adversarial term on "
        "the frozen teacher's features. Writes one adapter file (kohya keys + fewstep metadata) that the ComfyUI nodes, the "
        "A1111 extension and `fewstep bench --adapter` load. Options default to the paper's SD1.5 setup (--preset paper); "
        "--preset proxy fits the bundled teacher on a CPU. Precedence: preset < --config FILE < flags. Rerun the same "
        "command to resume.",
    )
    _add_teacher_args(p, "flash", "flash_lora.safetensors", "Flash")
    p.add_argument("--init-lora", default=None, help="continue from this Flash/LCM-style LoRA file (its rank, alpha and targets are kept)")
    group = p.add_argument_group("method options (override preset and --config)")
    group.add_argument("--lora-rank", type=_count, default=None, help="LoRA rank (paper: 128 for SD1.5, 64 for SDXL)")
    group.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default: the rank)")
    group.add_argument("--lora-targets", type=_str_list, default=None, help="comma-separated module names (paper: to_q,to_k,to_v,to_out.0)")
    group.add_argument("--teacher-steps", type=_positive_int, default=None, help="K: steps of the teacher's DPM-Solver++ grid (paper: 32)")
    group.add_argument("--phase-steps", type=_int_list, default=None, help="optimiser steps per phase, e.g. 5000,5000,5000,5000")
    group.add_argument("--guidance-min", type=_finite, default=None, help="lowest teacher CFG scale (paper: 3)")
    group.add_argument("--guidance-max", type=_finite, default=None, help="highest teacher CFG scale (paper: 13)")
    group.add_argument("--distill-loss", default=None, choices=["l2", "l1", "huber", "lpips"],
                       help="distillation loss (default l2; the paper's lpips needs --lpips-weights)")
    group.add_argument("--lpips-weights", type=_str_list, default=None,
                       help="comma-separated local files: torchvision's VGG16 checkpoint and the lpips package's vgg.pth")
    group.add_argument("--distill-weights", type=_float_list, default=None, help="per-phase weights, e.g. 1,1,1,1")
    group.add_argument("--dmd-weights", type=_float_list, default=None, help="per-phase DMD weights (paper: 0,0.3,0.5,0.7)")
    group.add_argument("--adversarial-weights", type=_float_list, default=None, help="per-phase GAN weights (paper: 0,0.1,0.2,0.3)")
    group.add_argument("--gan-loss", default=None, choices=["lsgan", "hinge", "non-saturating"], help="GAN objective (paper: lsgan)")
    group.add_argument("--real-from", default=None, choices=["data", "teacher"], help="the discriminator's real samples")
    group.add_argument("--lr", type=_positive_float, default=None, help="LoRA learning rate (paper: 1e-5)")
    group.add_argument("--disc-lr", type=_positive_float, default=None, help="discriminator head learning rate (paper: 1e-5)")
    group.add_argument("--batch-size", type=_positive_int, default=None, help="images per step per GPU (paper: 4)")
    group.add_argument("--gradient-checkpointing", action="store_const", const=True, default=None, help="trade compute for memory")
    group.add_argument("--sampler", default=None, choices=["consistency", "ddim"],
                       help="the sampler the file names: consistency = LCM re-noising (paper), ddim = deterministic (proxy preset)")
    _add_run_args(p, sample_help="steps between 1/2/4-step sample grids (RUN_DIR/samples)")
    p.set_defaults(run=run_train_flash)


def _add_teacher_source(p) -> None:
    p.add_argument("--teacher", default=None,
                   help="diffusers pipeline folder or single-file checkpoint, SD1.5 or SDXL (default: the bundled proxy teacher)")
    p.add_argument("--teacher-config", default=None,
                   help="for a single-file teacher: a diffusers folder of the same base model to take configs and tokenizer from")


def _add_teacher_args(p, method: str, out_name: str, label: str, out_what: str = "the adapter file") -> None:
    """What every distillation command takes: teacher, data, where to write, preset and config file."""
    _add_teacher_source(p)
    p.add_argument("--data", default=None,
                   help="'proxy' (bundled digits + animals, the default), a folder of images with .txt captions / "
                   "metadata.jsonl (a `fewstep synth` folder too, images or latents), or webdataset shards ('shards/*.tar')")
    p.add_argument("--data-free", default=None, metavar="PROMPTS",
                   help="no dataset: the teacher first writes its own (latents) into RUN_DIR/synth from these prompts "
                   "(a text file, one per line, or a built-in set: proxy, proxy-classes), then the method trains on it; "
                   "a rerun continues both")
    p.add_argument("--synth-count", type=_positive_int, default=10000, help="--data-free: samples in the set")
    p.add_argument("--synth-steps", type=_positive_int, default=25, help="--data-free: teacher sampling steps (DDIM)")
    p.add_argument("--synth-cfg", type=_finite, default=None,
                   help="--data-free: the teacher's CFG scale (default: 4 for the bundled teacher and fine-tunes of it, 7.5 otherwise)")
    p.add_argument("--resolution", type=_positive_int, default=None, help="training image size (default: the teacher's native size)")
    p.add_argument("--run-dir", default=f"runs/{method}", help="checkpoints, logs (metrics.jsonl, TensorBoard) and sample grids")
    p.add_argument("--out", default=None, help=f"{out_what} to write (default: RUN_DIR/{out_name})")
    p.add_argument("--preset", default=None, choices=["paper", "proxy"],
                   help="option defaults: the paper's SD setup, or the CPU-sized proxy setup (default: proxy for the bundled "
                   "teacher, paper otherwise)")
    p.add_argument("--config", default=None, help=f"JSON file of {label} options (field names as in `--dry-run` output)")


def _add_run_args(p, sample_help: str) -> None:
    """Run mechanics every distillation command shares."""
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="accelerate mixed precision; auto = bf16 on CUDA (frozen teacher in bf16), off on CPU")
    p.add_argument("--checkpoint-every", type=_positive_int, default=250, help="steps between checkpoints")
    p.add_argument("--sample-every", type=_count, default=250, help=sample_help)
    p.add_argument("--seed", type=int, default=0, help="seed of batches and noise")
    p.add_argument("--resume", dest="no_resume", action="store_false", default=False, help="continue from RUN_DIR's newest checkpoint (the default)")
    p.add_argument("--no-resume", dest="no_resume", action="store_true", help="start over, removing RUN_DIR's checkpoints")
    p.add_argument("--stop-after", type=_positive_int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--dry-run", action="store_true", help="print and save the configuration, train nothing")


def add_train_guided(methods) -> None:
    p = methods.add_parser(
        "guided",
        help="distil a teacher into a student that takes the guidance weight w as input (one pass per step)",
        description="Guided distillation (Meng et al. 2023), stage 1: a student initialised from the teacher learns to give "
        "the teacher's classifier-free-guided prediction (1 + w) cond - w uncond in one pass, w being an input (Imagen's "
        "convention: CFG scale s = 1 + w). Stage 2: progressive distillation, the student of each round takes one DDIM step "
        "where the previous one takes two, halving the steps from --start-steps to --target-steps with w kept as an input; "
        "each round writes RUN_DIR/round-NNsteps/guided_student.safetensors. Writes one adapter file (kind guided_student: "
        "the UNet, or with --lora-rank a LoRA, with its w-embedding + fewstep metadata). Precedence: preset < --config FILE < flags. Rerun the same "
        "command to resume.",
    )
    p.add_argument("--stage", type=int, default=1, choices=[1, 2],
                   help="1: w-conditioned student from the teacher; 2: progressive step halving of --student")
    p.add_argument("--student", default=None,
                   help="stage 2: the guided_student file to halve (stage 1's, or a later round's)")
    _add_teacher_args(p, "guided", "guided_student.safetensors", "guided")
    group = p.add_argument_group("method options (override preset and --config)")
    group.add_argument("--w-min", type=_finite, default=None, help="lowest guidance weight w trained (paper: 2; CFG scale = 1 + w)")
    group.add_argument("--w-max", type=_finite, default=None, help="highest guidance weight w trained (paper: 14)")
    group.add_argument("--default-w", type=_finite, default=None, help="the w the exported file proposes (paper preset: 6.5)")
    group.add_argument("--loss-space", default=None, choices=["x", "eps"],
                       help="x: x0 error weighted by max(SNR, 1), the paper's; eps: the implied noise's MSE")
    group.add_argument("--lora-rank", type=_count, default=None,
                       help="stage 1: train a LoRA of this rank plus the w projection instead of the whole UNet (0, the "
                       "default: whole UNet); the file is a few MB and loads onto the base model. Stage 2 keeps the "
                       "student file's own form")
    group.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default: the rank)")
    group.add_argument("--lora-targets", type=_str_list, default=None, help="comma-separated module names (default: to_q,to_k,to_v,to_out.0)")
    _add_optimiser_args(group, lr_help="learning rate", warmup_help="linear learning-rate warm-up (per stage-2 round)")
    group.add_argument("--start-steps", type=_positive_int, default=None, help="stage 2: the step count the first round halves (default 16)")
    group.add_argument("--target-steps", type=_positive_int, default=None, help="stage 2: the last round's step count (default 1)")
    group.add_argument("--round-steps", type=_positive_int, default=None, help="stage 2: optimiser steps per round")
    group.add_argument("--sampler", default=None, choices=["ddim", "stochastic"], help="the sampler the file names")
    group.add_argument("--sample-steps", type=_positive_int, default=None, help="the step count the file names (stage 1: the teacher's)")
    _add_run_args(p, sample_help="steps between sample grids at w = 0 and the default w (RUN_DIR/samples)")
    p.set_defaults(run=run_train_guided)


def add_train_sun(methods) -> None:
    p = methods.add_parser(
        "sun",
        help="train a SUN adapter: one pass per step with the negative prompt still working (4 steps, no CFG)",
        description="SUN / SpeedUpNet (Chai et al. 2023): train a cross-attention adapter fed by the negative prompt so "
        "that one UNet pass gives the teacher's CFG result with that negative prompt; the base UNet stays frozen, so the "
        "adapter plugs into fine-tuned models of the same base. Losses: offset learning against the teacher's CFG "
        "prediction with random negative prompts, and multi-step consistency with the teacher's multistep CFG trajectory. "
        "Writes one adapter file (kind sun_adapter) that the ComfyUI nodes and `fewstep bench --adapter` load. "
        "Precedence: preset < --config FILE < flags. Rerun the same command to resume.",
    )
    _add_teacher_args(p, "sun", "sun_adapter.safetensors", "SUN")
    group = p.add_argument_group("method options (override preset and --config)")
    group.add_argument("--variant", default=None, choices=["add_pos", "plain"],
                       help="add_pos: also an extra positive branch, as the released adapter (default); plain: negative branch only")
    group.add_argument("--cfg-scale", type=_finite, default=None, help="the teacher CFG scale the adapter reproduces (paper preset: 7.5)")
    group.add_argument("--negative-prompts", default=None,
                       help="text file with one negative prompt per line to train with (default: the training captions)")
    group.add_argument("--empty-negative-prob", type=_finite, default=None, help="share of samples with an empty negative prompt")
    group.add_argument("--truncate-prompt-prob", type=_finite, default=None,
                       help="share of captions cut to their first words (vague prompts, where a negative prompt shows)")
    group.add_argument("--loss-space", default=None, choices=["x", "eps"], help="x: x0 error weighted by max(SNR, 1); eps: noise MSE")
    group.add_argument("--msc-weight", type=_finite, default=None, help="weight of the multi-step consistency loss (0: off)")
    group.add_argument("--msc-teacher-steps", type=_positive_int, default=None,
                       help="steps of the teacher's DPM-Solver++ CFG trajectory (a multiple of the student's steps)")
    group.add_argument("--msc-batch-size", type=_count, default=None, help="samples per step with a teacher trajectory")
    _add_optimiser_args(group, lr_help="learning rate of the adapter's key/value projections")
    group.add_argument("--gain-lr-scale", type=_positive_float, default=None, help="the per-channel gains (alpha, beta) learn at lr times this")
    group.add_argument("--sampler", default=None, choices=["dpmpp_2m", "ddim"], help="the sampler the file names")
    group.add_argument("--sample-steps", type=_positive_int, default=None, help="the step count the file names (default 4)")
    _add_run_args(p, sample_help="steps between sample grids with an empty and a class negative prompt (RUN_DIR/samples)")
    p.set_defaults(run=run_train_sun)


def add_train_gdd(methods) -> None:
    p = methods.add_parser(
        "gdd",
        help="train a one-step generator by distributional (GAN) distillation: GDD / GDD-I (1 step, no CFG)",
        description="GDD (Zheng & Yang 2024, 'Diffusion Models Are Innate One-Step Generators'): a copy of the teacher "
        "UNet learns to map pure noise to an image in one pass with a GAN loss alone (non-saturating, lazy R1, EMA); the "
        "discriminator is a small head on the frozen teacher's own features, conditioned on the prompt. GDD-I (default) "
        "freezes the convolutions; --variant lora trains only a LoRA. The real samples are --data, or with --data-free "
        "PROMPTS the teacher's own CFG samples: the generator then follows prompts as the teacher does with CFG (on the proxy "
        "benchmark, one-step prompt accuracy 0.97-0.99 against 0.77-0.94 on the training images). Writes one adapter file (kind "
        "gdd_student, sampler onestep). Precedence: preset < --config FILE < flags. Rerun the same command to resume, or "
        "with a larger --steps to train on.",
    )
    _add_teacher_args(p, "gdd", "gdd_student.safetensors", "GDD")
    group = p.add_argument_group("method options (override preset and --config)")
    group.add_argument("--variant", default=None, choices=["gdd_i", "full", "lora"],
                       help="gdd_i: convolutions frozen (default); full: the whole UNet; lora: a LoRA on the attention projections")
    group.add_argument("--gan-loss", default=None, choices=["non-saturating", "hinge", "lsgan"], help="GAN objective (paper: non-saturating)")
    group.add_argument("--r1-gamma", type=_finite, default=None, help="R1 penalty weight (paper: 1e-4)")
    group.add_argument("--r1-interval", type=_positive_int, default=None, help="steps between lazy R1 penalties (paper: 16)")
    group.add_argument("--gan-timesteps", type=_int_list, default=None,
                       help="comma-separated noise levels at which the teacher's features feed the discriminator")
    group.add_argument("--disc-text-projection", action=argparse.BooleanOptionalAction, default=None,
                       help="the prompt also enters the discriminator head as a projection term (default on; ours)")
    group.add_argument("--lora-rank", type=_count, default=None, help="the lora variant's rank")
    _add_optimiser_args(group, lr_help="generator learning rate")
    group.add_argument("--disc-lr", type=_positive_float, default=None, help="discriminator head learning rate")
    _add_run_args(p, sample_help="steps between one-step sample grids (RUN_DIR/samples)")
    p.set_defaults(run=run_train_gdd)


def _add_optimiser_args(group, lr_help: str, warmup_help: str = "linear learning-rate warm-up", steps: bool = True) -> None:
    """The optimiser options of the methods trained on one loss for a number of steps (``steps``: --steps too)."""
    if steps:
        group.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps")
    group.add_argument("--lr", type=_positive_float, default=None, help=lr_help)
    group.add_argument("--warmup-steps", type=_count, default=None, help=warmup_help)
    group.add_argument("--batch-size", type=_positive_int, default=None, help="images per step per GPU")
    group.add_argument("--ema-decay", type=_fraction, default=None, help="EMA decay of the exported weights")
    group.add_argument("--gradient-checkpointing", action="store_const", const=True, default=None, help="trade compute for memory")


def _str_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    return [int(t) for t in _str_list(text)]


def _float_list(text: str) -> list[float]:
    return [_finite(t) for t in _str_list(text)]


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``; anything else is a one-line usage error before any work starts."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what} (got {value})")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "0 or more")


def _finite(text: str) -> float:
    """An argparse type: a finite number (float() also takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a share in [0, 1) (a dropout rate, an EMA decay)."""
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (got {text})")
    return value


def _positive_float(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text})")
    return value


FLASH_FLAGS = ("lora_rank", "lora_alpha", "lora_targets", "teacher_steps", "phase_steps", "guidance_min", "guidance_max",
               "distill_loss", "lpips_weights", "distill_weights", "dmd_weights", "adversarial_weights", "gan_loss", "real_from", "lr", "disc_lr",
               "batch_size", "gradient_checkpointing", "sampler")


GUIDED_FLAGS = ("w_min", "w_max", "default_w", "loss_space", "lora_rank", "lora_alpha", "lora_targets", "steps", "lr", "warmup_steps", "batch_size", "ema_decay", "start_steps",
                "target_steps", "round_steps", "sampler", "sample_steps", "gradient_checkpointing")


SUN_FLAGS = ("variant", "cfg_scale", "negative_prompts", "empty_negative_prob", "truncate_prompt_prob", "loss_space", "msc_weight", "msc_teacher_steps",
             "msc_batch_size", "steps", "lr", "gain_lr_scale", "warmup_steps", "batch_size", "ema_decay", "sampler", "sample_steps",
             "gradient_checkpointing")


GDD_FLAGS = ("variant", "gan_loss", "r1_gamma", "r1_interval", "gan_timesteps", "disc_text_projection", "lora_rank", "steps",
             "lr", "disc_lr", "warmup_steps", "batch_size", "ema_decay", "gradient_checkpointing")


def run_train_flash(args: argparse.Namespace) -> int:
    from .methods import flash

    return _run_distillation(args, "flash", flash.load_config, FLASH_FLAGS, "flash_lora.safetensors",
                             lambda **kw: flash.train_flash(init_lora=args.init_lora, **kw),
                             "Flash LoRA written to {out}; try: fewstep bench --set flash --adapter {out}")


def run_train_guided(args: argparse.Namespace) -> int:
    from .methods import guided

    if args.stage == 1:
        return _run_distillation(args, "guided", guided.load_config, GUIDED_FLAGS, "guided_student.safetensors",
                                 guided.train_guided, "guided student written to {out}; try: fewstep bench --set guided --adapter {out}")
    if not args.student:
        print("error: --stage 2 needs --student: the guided_student file of stage 1 (or of a later round)", file=sys.stderr)
        return 2
    if args.lora_rank is not None:
        print("error: --lora-rank is a stage-1 option; stage 2 keeps the form of the --student file (whole UNet or LoRA)",
              file=sys.stderr)
        return 2
    return _run_distillation(args, "guided", guided.load_config, GUIDED_FLAGS, "guided_student.safetensors",
                             lambda **kw: guided.train_progressive(student=args.student, **kw),
                             "few-step guided student written to {out}; every round's is in RUN_DIR/round-*steps/")


def run_train_gdd(args: argparse.Namespace) -> int:
    from .methods import gdd

    return _run_distillation(args, "gdd", gdd.load_config, GDD_FLAGS, "gdd_student.safetensors", gdd.train_gdd,
                             "one-step GDD generator written to {out}")


def run_train_sun(args: argparse.Namespace) -> int:
    from .methods import sun

    return _run_distillation(args, "sun", sun.load_config, SUN_FLAGS, "sun_adapter.safetensors", sun.train_sun,
                             "SUN adapter written to {out}; try: fewstep bench --set sun --adapter {out}")


def _announce(run_dir: str, options: dict, dry_run: bool) -> bool:
    """Print a run's resolved options and save them as RUN_DIR/training_options.json; True for a dry run."""
    from pathlib import Path

    print(json.dumps(options, indent=2))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "training_options.json").write_text(json.dumps(options, indent=2) + "\n")
    return dry_run


def _run_distillation(args: argparse.Namespace, method: str, load_config, flags, out_name: str, train, done: str) -> int:
    """Resolve options (preset < --config < flags) and check the data, then hold the run folder, print and save the
    options, train and report; errors exit with 2 (here, or in main for those raised while training)."""
    import dataclasses
    from pathlib import Path

    from .evaluation import BUNDLED_TEACHER
    from .data import check_dataset
    from .loop import lock_run_dir
    from .pipelines import TeacherError

    teacher = Path(args.teacher) if args.teacher else BUNDLED_TEACHER
    preset = args.preset or ("proxy" if teacher.resolve() == BUNDLED_TEACHER.resolve() else "paper")
    try:
        config = load_config(preset, args.config, **{k: getattr(args, k) for k in flags})
        if not teacher.exists():
            raise TeacherError(f"teacher {teacher} does not exist: pass a diffusers pipeline folder (with model_index.json) "
                               "or a single-file .safetensors checkpoint")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.data_free and args.data:
        print("error: --data and --data-free exclude each other: train on a dataset, or on one the teacher writes", file=sys.stderr)
        return 2
    out = args.out or str(Path(args.run_dir) / out_name)
    data = str(Path(args.run_dir) / "synth") if args.data_free else args.data or "proxy"
    if not args.data_free:
        check_dataset(data)
    options = {"teacher": str(teacher), "data": data, "preset": preset, "run_dir": args.run_dir, "out": out,
               "mixed_precision": _mixed_precision(args.mixed_precision), method: dataclasses.asdict(config)}
    if args.data_free:
        options["synth"] = {"prompts": args.data_free, "count": args.synth_count, "steps": args.synth_steps,
                            "cfg_scale": _synth_cfg(args.synth_cfg, teacher)}
    with lock_run_dir(args.run_dir):
        if _announce(args.run_dir, options, args.dry_run):
            return 0
        if args.data_free:
            _synthesize(teacher, args.teacher_config, args.data_free, data, args.synth_count, args.synth_steps,
                        options["synth"]["cfg_scale"], layout="latents", seed=args.seed)
        result = train(teacher=teacher, data=data, run_dir=args.run_dir, out=out, config=config, resolution=args.resolution,
                       teacher_config=args.teacher_config, mixed_precision=options["mixed_precision"],
                       checkpoint_every=args.checkpoint_every, sample_every=args.sample_every, seed=args.seed,
                       resume=not args.no_resume, stop_after=args.stop_after)
    print(done.format(out=result) if result else f"stopped after step {args.stop_after}; rerun to continue")
    return 0


def _synth_cfg(cfg: Optional[float], teacher) -> float:
    from .bench import is_bundled_lineage
    from .evaluation import DEFAULT_CFG_SCALE

    if cfg is not None:
        return cfg
    return DEFAULT_CFG_SCALE if is_bundled_lineage(teacher) else 7.5


def _synthesize(teacher, teacher_config, prompts: str, out: str, count: int, steps: int, cfg_scale: float, layout: str,
                seed: int = 0, negative: str = "", batch_size: int = 16) -> dict:
    """Load the teacher and write (or finish) a synthesized set; problems with the prompts or the folder raise SynthError."""
    from .pipelines import base_of, load_teacher
    from .synth import read_prompts, synthesize
    from .synth_sets import SynthSettings

    pipe = load_teacher(teacher, config=teacher_config)
    settings = SynthSettings(teacher=str(teacher), base=base_of(pipe), prompts=prompts, count=count, steps=steps,
                             cfg_scale=cfg_scale, negative=negative, seed=seed, layout=layout)
    return synthesize(pipe, settings, read_prompts(prompts), out, batch_size=batch_size)


def run_train_teacher(args: argparse.Namespace) -> int:
    from pathlib import Path

    config = {
        "run_dir": args.run_dir, "out": args.out or str(Path(args.run_dir) / "pipeline"), "preset": args.preset,
        "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "batch_size": args.batch_size, "vae_lr": args.vae_lr,
        "unet_lr": args.unet_lr, "caption_dropout": args.caption_dropout, "ema_decay": args.ema_decay,
        "mixed_precision": _mixed_precision(args.mixed_precision), "checkpoint_every": args.checkpoint_every,
        "sample_every": args.sample_every, "seed": args.seed, "resume": not args.no_resume, "stop_after": args.stop_after,
    }
    from .data import check_dataset, load_dataset
    from .loop import lock_run_dir

    check_dataset(args.data)
    with lock_run_dir(args.run_dir):
        if _announce(args.run_dir, {"data": args.data, **config}, args.dry_run):
            return 0
        from .teacher import train_teacher

        out = train_teacher(load_dataset(args.data), **config)
    print(f"teacher pipeline written to {out}" if out else f"stopped after step {args.stop_after}; rerun to continue")
    return 0


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "bf16" if torch.cuda.is_available() else "no"


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
    p.add_argument("--per-class", type=_positive_int, default=50, help="samples per prompt class (20 classes)")
    p.add_argument("--batch-size", type=_positive_int, default=250, help="samples generated at once")
    p.add_argument("--out-dir", default="bench/results", help="where results go")
    p.add_argument("--adapter", action="append", default=None,
                   help="a student file for the set's student rows; repeat it to give several (each row takes a file of its "
                   "method, GDD's of its variant: the one made for its step count, e.g. one per progressive round, else the "
                   "first; rows with none are left out); flash rows: default the bundled proxy LoRA")
    p.add_argument("--plan", default=None, help="snapfusion: the `fewstep snap plan --out` file whose block table to include")
    p.set_defaults(run=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from .bench import markdown_table, run_bench
    from .evaluation import BUNDLED_TEACHER

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
    p.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: 25, or the adapter's own)")
    p.add_argument("--adapter", default=None, help="sample this adapter file on the teacher instead (no CFG, its sampler and timesteps)")
    p.add_argument("--cfg", type=_finite, default=4.0, help="CFG scale (diffusers convention; 1 disables guidance)")
    p.add_argument("--per-class", type=_positive_int, default=50, help="samples per prompt class")
    p.add_argument("--images", default=None, help="score this folder of images with .txt captions / metadata.jsonl instead")
    p.add_argument("--reference", default=None, help="with --images: real images to compare with (default: proxy held-out set)")
    p.add_argument("--clip-model", default=None,
                   help="with --images: a local CLIP model folder (transformers layout) to also report the CLIP score")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.images:
        from .data import PROXY_CLASSES, read_image_folder
        from .metrics import fid, fid_to_heldout
        from .proxy_classifier import prompt_accuracy

        data = read_image_folder(args.images, size=32 if args.reference is None else None)
        result = {"images": len(data), "skipped": len(data.skipped)}
        if args.reference:
            result["fid"] = fid(data.images, read_image_folder(args.reference).images)
        else:
            result["fid"] = fid_to_heldout(data.images)
        if set(data.captions) <= set(PROXY_CLASSES):
            result["prompt_accuracy"] = prompt_accuracy(data.images, [PROXY_CLASSES.index(c) for c in data.captions])
        if args.clip_model:
            from .clip_score import clip_score

            result["clip_score"] = clip_score(data.images, data.captions, args.clip_model)
    else:
        from ..core.adapter_file import AdapterFileError, read_header, describe
        from .evaluation import BUNDLED_TEACHER
        from .evaluation import StudentEntry, TeacherEntry, evaluate_entry
        from .pipelines import load_teacher

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
    p.add_argument("--alpha", type=_finite, default=None, help="LoRA alpha for sources that do not store it (default: the rank)")
    p.add_argument("--base", default=None, choices=["sd15", "sdxl", "pixart"], help="base model, when the keys do not tell")
    p.add_argument("--steps", type=_positive_int, default=None, help="with --to fewstep: default steps recorded in the file")
    p.add_argument("--timesteps", type=_int_list, default=None, help="with --to fewstep: timesteps for --steps, e.g. 999,749,499,249")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    import dataclasses

    from ..core.adapter_file import AdapterFileError
    from ..core.lora import LoraKeyError
    from .export import export_lora, read_any_lora

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


def add_quickstart(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="the main job end to end on the bundled teacher, in minutes on a CPU",
        description="Sample the bundled teacher at 25 and 4 steps, distil a Flash student for a short budget, sample it and the "
        "bundled fully trained Flash student at 4 steps, and write OUT_DIR/grid.png (one row per configuration), "
        "OUT_DIR/metrics.md and the quickstart's adapter file OUT_DIR/flash_lora.safetensors. A stopped quickstart "
        "continues where it stopped when rerun with the same options.",
    )
    p.add_argument("--out-dir", default="quickstart", help="where the grid, metrics and adapter go")
    p.add_argument("--per-class", type=_positive_int, default=10, help="samples per prompt class used for the metrics")
    p.add_argument("--student-steps", type=_positive_int, default=80, help="training steps of the quickstart's Flash student")
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing a stopped quickstart in OUT_DIR")
    p.set_defaults(run=run_quickstart_command)


def run_quickstart_command(args: argparse.Namespace) -> int:
    from .data import DATA_PACKAGES, require_packages

    require_packages(DATA_PACKAGES)   # all of them, before the heavy imports below
    from .bench import markdown_table
    from .quickstart import run_quickstart

    document = run_quickstart(args.out_dir, per_class=args.per_class, student_steps=args.student_steps,
                              resume=not args.no_resume)
    print(markdown_table(document), end="")
    names = ", ".join(r["name"] for r in document["results"])
    print(f"grid: {args.out_dir}/grid.png (rows: {names}; columns: the 20 prompts)")
    print(f"adapter: {args.out_dir}/flash_lora.safetensors (fewstep inspect it; load it in ComfyUI or A1111 on an SD1.5-architecture model)")
    return 0


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
    p = steps.add_parser(
        "robust", help="fine-tune the teacher with cross-attention and ResNet blocks skipped at random",
        description="Robust training: every step skips each ResNet and cross-attention block with --skip-probability (a "
        "skipped block passes its input through its residual shortcut), and trains on the data's denoising loss plus "
        "--distill-weight times the loss against the full teacher's prediction. Writes a diffusers pipeline folder with "
        "the same architecture and keys. Precedence: preset < --config FILE < flags. Rerun the same command to resume.")
    _add_teacher_args(p, "snap-robust", "pipeline", "SnapFusion", out_what="the robust pipeline folder")
    group = p.add_argument_group("method options (override preset and --config)")
    group.add_argument("--skip-probability", type=_finite, default=None, help="chance that each block is skipped in a step")
    group.add_argument("--distill-weight", type=_finite, default=None, help="weight of the full teacher's prediction as target")
    group.add_argument("--caption-dropout", type=_fraction, default=None, help="fraction of captions replaced by the empty prompt")
    _add_optimiser_args(group, lr_help="learning rate (whole UNet)")
    _add_run_args(p, sample_help="steps between 25-step sample grids of the full UNet (RUN_DIR/samples)")
    p.set_defaults(run=run_snap_robust)

    p = steps.add_parser(
        "plan", help="measure every block's latency and quality cost and propose which to remove",
        description="For each ResNet and cross-attention block: the share of a UNet pass it costs on this machine (the pass "
        "timed with and without it) and, on the proxy benchmark, FID and prompt accuracy with it alone skipped (DDIM with "
        "CFG). Then, greedily by cost (FID increase plus --accuracy-weight per accuracy point lost) per latency saved, "
        "the blocks to remove for a pass within --budget of the teacher's, in the units a standard diffusers/ComfyUI UNet "
        "config can express (a layer per level, a level's cross-attention, the mid block). Run it on the output of `fewstep snap robust`: a plain teacher has never learnt "
        "to miss a block.")
    p.add_argument("--teacher", default=None, help="pipeline folder to measure (default: the bundled proxy teacher)")
    p.add_argument("--budget", type=_finite, default=0.7, help="target latency as a fraction of the full UNet pass")
    p.add_argument("--accuracy-weight", type=_finite, default=1.0,
                   help="FID a removal may cost per point of prompt accuracy it loses, when ranking removals")
    p.add_argument("--per-class", type=_positive_int, default=10, help="proxy samples per prompt class (20 classes) per block")
    p.add_argument("--steps", type=_positive_int, default=25, help="sampling steps of the quality measurement")
    p.add_argument("--cfg-scale", type=_finite, default=4.0, help="CFG scale of the quality measurement")
    p.add_argument("--latency-batch", type=_positive_int, default=2, help="UNet batch timed (2: one image with CFG)")
    p.add_argument("--repeats", type=_positive_int, default=10, help="timed passes per configuration (medians)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of the timed passes (on a GPU, float16 is how the UIs run SD); quality is measured in float32")
    p.add_argument("--latency-only", action="store_true",
                   help="time the blocks only (any SD1.5/SDXL UNet; quality needs a proxy-sized teacher)")
    p.add_argument("--out", default=None, help="also write the table and proposal as JSON here")
    p.set_defaults(run=run_snap_plan)

    p = steps.add_parser(
        "slim", help="build the planned slim UNet from the teacher's weights and distil it from the full teacher",
        description="Builds the architecture of a `fewstep snap plan --out` file as a standard diffusers UNet config, copies "
        "every kept block's weights from the teacher, and trains it on the data's denoising loss plus --distill-weight times "
        "the loss against the full teacher's prediction. Writes the teacher's pipeline with the slim UNet. "
        "Precedence: preset < --config FILE < flags. Rerun the same command to resume.")
    p.add_argument("--plan", required=True, help="JSON written by `fewstep snap plan --out` (its proposal's architecture)")
    _add_teacher_args(p, "snap-slim", "pipeline", "SnapFusion", out_what="the slim pipeline folder")
    group = p.add_argument_group("method options (override preset and --config)")
    group.add_argument("--skip-probability", type=_finite, default=None,
                       help="chance that each of the slim UNet's blocks is skipped in a step (default from the preset)")
    group.add_argument("--distill-weight", type=_finite, default=None, help="weight of the full teacher's prediction as target")
    group.add_argument("--caption-dropout", type=_fraction, default=None, help="fraction of captions replaced by the empty prompt")
    _add_optimiser_args(group, lr_help="learning rate (whole slim UNet)")
    _add_run_args(p, sample_help="steps between 25-step sample grids of the slim UNet (RUN_DIR/samples)")
    p.set_defaults(run=run_snap_slim)

    p = steps.add_parser(
        "distill", help="distil the slim UNet to few steps: progressive rounds with CFG-aware distillation",
        description="SnapFusion's step distillation on a `fewstep snap slim` pipeline (v-prediction): rounds in which the "
        "student learns to take in one DDIM step what its teacher (the previous round's student) takes in two, from "
        "--start-steps down to --target-steps. A share --cfg-probability of the batches applies CFG at a scale drawn in "
        "[--cfg-scale-min, --cfg-scale-max] to both teacher and student, plus --cfg-original-weight times the plain loss. "
        "Each round writes a snap_student file; the last is --out. Precedence: preset < --config FILE < flags. Rerun the "
        "same command to resume.")
    _add_teacher_args(p, "snap-distill", "snap_student.safetensors", "SnapFusion")
    group = p.add_argument_group("method options (override preset and --config)")
    group.add_argument("--start-steps", type=_positive_int, default=None, help="the first round's teacher steps (paper: 32)")
    group.add_argument("--target-steps", type=_positive_int, default=None, help="the final student's steps (paper: 8)")
    group.add_argument("--round-steps", type=_positive_int, default=None, help="optimiser steps per round")
    group.add_argument("--cfg-probability", type=_finite, default=None, help="share of CFG-aware batches (0: plain progressive)")
    group.add_argument("--cfg-scale-min", type=_finite, default=None, help="lowest CFG scale drawn for CFG-aware batches")
    group.add_argument("--cfg-scale-max", type=_finite, default=None, help="highest CFG scale drawn for CFG-aware batches")
    group.add_argument("--cfg-original-weight", type=_finite, default=None, help="weight of the plain loss in CFG-aware batches")
    group.add_argument("--sample-cfg-scale", type=_finite, default=None, help="the CFG scale the exported student proposes")
    _add_optimiser_args(group, lr_help="learning rate (whole UNet)", warmup_help="linear learning-rate warm-up (per round)",
                        steps=False)
    p.add_argument("--decoder", default=None, help="a pruned decoder file (`fewstep snap decoder`) to ship in the student files")
    _add_run_args(p, sample_help="steps between sample grids of the round's student with CFG (RUN_DIR/round-*/samples)")
    p.set_defaults(run=run_snap_distill)

    p = steps.add_parser(
        "decoder", help="prune the VAE decoder's channels and distil it from the original on teacher latents",
        description="SnapFusion's efficient decoder: the VAE decoder with each level's channels cut to --keep (in whole "
        "GroupNorm groups), initialised from the original's first channels, trained to match the original decoder's "
        "images on latents the teacher samples from the dataset's captions (DDIM with CFG; no images needed). Writes a "
        "decoder file for `fewstep snap distill --decoder`. Precedence: preset < --config FILE < flags.")
    _add_teacher_args(p, "snap-decoder", "decoder.safetensors", "decoder", out_what="the pruned decoder file")
    group = p.add_argument_group("method options (override preset and --config)")
    group.add_argument("--keep", type=_finite, default=None, help="share of each level's channels kept (paper: 0.5)")
    group.add_argument("--latents", type=_positive_int, default=None, help="teacher latents to distil on")
    group.add_argument("--latent-steps", type=_positive_int, default=None, help="DDIM steps of the teacher's latents")
    group.add_argument("--latent-cfg-scale", type=_finite, default=None, help="CFG scale of the teacher's latents")
    _add_optimiser_args(group, lr_help="learning rate (the pruned decoder)")
    _add_run_args(p, sample_help="unused: the decoder's run writes no sample grids")
    p.set_defaults(run=run_snap_decoder)


SNAP_FLAGS = ("skip_probability", "distill_weight", "caption_dropout", "steps", "lr", "warmup_steps", "batch_size",
              "ema_decay", "gradient_checkpointing")
SNAP_DISTILL_FLAGS = ("start_steps", "target_steps", "round_steps", "cfg_probability", "cfg_scale_min", "cfg_scale_max",
                      "cfg_original_weight", "sample_cfg_scale", "lr", "warmup_steps", "batch_size", "ema_decay",
                      "gradient_checkpointing")


def run_snap_distill(args: argparse.Namespace) -> int:
    from .methods import snapfusion

    return _run_distillation(args, "snapfusion", snapfusion.load_config, SNAP_DISTILL_FLAGS, "snap_student.safetensors",
                             lambda **kw: snapfusion.train_step_distillation(decoder=args.decoder, **kw),
                             "snap_student written to {out}; sample it with FewStep KSampler (ComfyUI) or `fewstep eval`")


def run_snap_robust(args: argparse.Namespace) -> int:
    from .methods import snapfusion

    return _run_distillation(args, "snapfusion", snapfusion.load_config, SNAP_FLAGS, "pipeline", snapfusion.train_robust,
                             "robust teacher written to {out}; next: fewstep snap plan --teacher {out}")


def run_snap_decoder(args: argparse.Namespace) -> int:
    from .methods import snap_decoder

    flags = ("keep", "latents", "latent_steps", "latent_cfg_scale", "steps", "lr", "warmup_steps", "batch_size", "ema_decay")
    return _run_distillation(args, "decoder", snap_decoder.load_config, flags, "decoder.safetensors", snap_decoder.train_decoder,
                             "pruned decoder written to {out}; ship it with `fewstep snap distill --decoder {out}`")


def run_snap_slim(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .methods import snapfusion
    from .methods.snap_architecture import SlimArchitecture

    try:
        plan = json.loads(Path(args.plan).read_text())
        architecture = SlimArchitecture.from_dict(plan["proposal"]["architecture"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {args.plan} is not a plan with a proposed architecture (write one with `fewstep snap plan --out`): "
              f"{exc}", file=sys.stderr)
        return 2
    args.teacher = args.teacher or plan.get("teacher")
    return _run_distillation(args, "snapfusion", snapfusion.load_config, SNAP_FLAGS, "pipeline",
                             lambda **kw: snapfusion.train_slim(architecture=architecture, **kw),
                             "slim pipeline written to {out}")


def run_snap_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .evaluation import BUNDLED_TEACHER
    from .methods import snap_blocks
    from .methods.snap_architecture import propose_architecture
    from .pipelines import TeacherError, load_teacher

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


def add_synth(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="let the teacher write a training set from prompts alone (no dataset needed)",
        description="Sample the teacher (DDIM with CFG) and write a dataset that every `fewstep train` method reads with "
        "--data OUT: images with same-name .txt captions and .json records (seed and settings), or with --latents the "
        "latents only (no VAE round trip). Sample i takes prompt i (the list repeats) and seed --seed + i, so a set is "
        "reproducible; rerun the same command to continue a stopped run (nothing is written twice or skipped). Runs on "
        "several GPUs under `accelerate launch`.")
    _add_teacher_source(p)
    p.add_argument("--prompts", required=True,
                   help="a text file with one prompt per line (# comments and blank lines skipped), or a built-in set: "
                   "proxy (the bundled training captions), proxy-classes (its 20 classes)")
    p.add_argument("--count", "--n", dest="count", type=_positive_int, required=True,
                   help="samples in the set (spell it --count under torchrun / accelerate launch: they take --n for theirs)")
    p.add_argument("--steps", type=_positive_int, default=25, help="teacher sampling steps (DDIM, trailing timesteps)")
    p.add_argument("--cfg", type=_finite, default=None, help="CFG scale (default: 4 for the bundled teacher and fine-tunes of it, 7.5 otherwise)")
    p.add_argument("--negative", default="", help="negative prompt (the unconditional side of CFG)")
    p.add_argument("--seed", type=int, default=0, help="sample i has seed SEED + i")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="samples per teacher batch")
    p.add_argument("--latents", action="store_true", help="write the latents only (for training; no images to look at)")
    p.add_argument("--out", required=True, help="the dataset folder (new, or one this command wrote with the same settings)")
    p.set_defaults(run=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation import BUNDLED_TEACHER
    from .pipelines import TeacherError
    from .synth_sets import SynthError

    teacher = Path(args.teacher) if args.teacher else BUNDLED_TEACHER
    try:
        report = _synthesize(teacher, args.teacher_config, args.prompts, args.out, args.count, args.steps,
                             _synth_cfg(args.cfg, teacher), "latents" if args.latents else "images", args.seed, args.negative,
                             args.batch_size)
    except (TeacherError, SynthError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{report['count']} samples in {args.out} ({report['written']} written now, {report['already_there']} were there, "
          f"{report['seconds']} s); train on them with: fewstep train <method> --data {args.out}")
    return 0


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error: `error: argument --lr: must be positive (got 0)`."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="fewstep",
        description="Few-step diffusion: train, export and inspect adapters that sample SD1.5/SDXL in 1-8 steps.",
    )
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_inspect(subparsers)
    add_train(subparsers)
    add_bench(subparsers)
    add_eval(subparsers)
    add_export(subparsers)
    add_quickstart(subparsers)
    add_snap(subparsers)
    add_synth(subparsers)
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
    from .loop import end_process_group

    end_process_group()
    return code


def _user_errors() -> tuple[type, ...]:
    """What main reports as one `error:` line (set FEWSTEP_DEBUG=1 for the traceback): bad inputs, and the operating
    system's refusals (a missing file, a read-only or full folder). Anything else is a bug and keeps its traceback."""
    from ..core.adapter_file import AdapterFileError
    from ..core.lora import LoraKeyError
    from .errors import UserError
    from .pipelines import TeacherError
    from .synth_sets import SynthError

    return UserError, TeacherError, SynthError, AdapterFileError, LoraKeyError, OSError


def _one_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or exc.__class__.__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
