"""``fewstep train`` (a teacher, a fine-tune, and every distillation method) and ``fewstep synth`` (a training set the
teacher writes, which ``--data-free`` runs first)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..options import finite, fraction, positive_float, positive_int
from ..methods import flash, gdd, guided, lcm, sun
from .arguments import (add_method_command, add_run_args, add_teacher_source, announce, method_overrides,
                        mixed_precision)


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
                   help="'proxy' (the bundled digits + animal silhouettes), 'proxy-attributes' (the same coloured on coloured "
                   "backgrounds, and in pairs side by side: the benchmark's attributes split), a folder of images with .txt "
                   "captions / metadata.jsonl, or webdataset shards ('shards/*.tar'); images are resized to 32x32")
    p.add_argument("--run-dir", default="runs/teacher", help="checkpoints, logs (metrics.jsonl, TensorBoard) and sample grids")
    p.add_argument("--out", default=None, help="where to write the pipeline folder (default: RUN_DIR/pipeline)")
    p.add_argument("--preset", default="proxy", choices=["proxy", "tiny"], help="network sizes: proxy (bundled teacher) or tiny (tests)")
    p.add_argument("--vae-steps", type=positive_int, default=3000, help="autoencoder training steps")
    p.add_argument("--unet-steps", type=positive_int, default=12000, help="UNet training steps")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step")
    p.add_argument("--vae-lr", type=positive_float, default=1e-3, help="autoencoder learning rate")
    p.add_argument("--unet-lr", type=positive_float, default=5e-4, help="UNet learning rate")
    p.add_argument("--caption-dropout", type=fraction, default=0.1, help="fraction of captions replaced by the empty prompt (for CFG)")
    p.add_argument("--ema-decay", type=fraction, default=0.999, help="EMA decay of the exported UNet weights")
    add_run_args(p, sample_help="steps between sample grids (RUN_DIR/samples)", checkpoint_every=500, sample_every=1000,
                 stop_help="stop the UNet stage after this many steps (resume later)")
    p.set_defaults(run=run_train_teacher)
    add_train_finetune(methods)
    add_train_flash(methods)
    add_train_lcm(methods)
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
    p.add_argument("--steps", type=positive_int, default=1000, help="UNet training steps")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="UNet learning rate")
    p.add_argument("--caption-dropout", type=fraction, default=0.1, help="fraction of captions replaced by the empty prompt")
    p.add_argument("--ema-decay", type=fraction, default=0.999, help="EMA decay of the exported UNet weights")
    add_run_args(p, sample_help="steps between sample grids (RUN_DIR/samples)")
    p.set_defaults(run=run_train_finetune)


def run_train_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bundled import BUNDLED_TEACHER
    from ..data import check_dataset
    from ..loop import lock_run_dir
    from ..pipelines import TeacherError

    options = {"teacher": args.teacher or str(BUNDLED_TEACHER), "data": args.data, "run_dir": args.run_dir,
               "out": args.out or str(Path(args.run_dir) / "pipeline"), "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "caption_dropout": args.caption_dropout, "ema_decay": args.ema_decay,
               "mixed_precision": mixed_precision(args.mixed_precision), "seed": args.seed}
    check_dataset(args.data)
    with lock_run_dir(args.run_dir):
        if announce(args.run_dir, options, args.dry_run):
            return 0
        from ..teacher import finetune_teacher

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
    p = add_method_command(
        methods, "flash", "distil a teacher into a Flash Diffusion LoRA (1-4 steps, no CFG)",
        "Flash Diffusion (Chadebec et al. 2024): train a LoRA on the teacher UNet so that it samples in 1-4 consistency steps "
        "without CFG, from the teacher's own multistep CFG rollouts, a DMD term and an adversarial term on the frozen "
        "teacher's features. Writes one adapter file (kohya keys + fewstep metadata) that the ComfyUI nodes, the A1111 "
        "extension and `fewstep bench --adapter` load. Options default to the paper's SD1.5 setup (--preset paper); "
        "--preset proxy fits the bundled teacher on a CPU.",
        config_class=flash.FlashConfig, presets=flash.PRESETS, out_name="flash_lora.safetensors", label="Flash",
        sample_help="steps between 1/2/4-step sample grids (RUN_DIR/samples)", run=run_train_flash)
    p.add_argument("--init-lora", default=None, help="continue from this Flash/LCM-style LoRA file (its rank, alpha and targets are kept)")


def add_train_lcm(methods) -> None:
    add_method_command(
        methods, "lcm", "distil a teacher into an LCM-LoRA (latent consistency distillation: the baseline, 2-8 steps, no CFG)",
        "Latent consistency distillation into a LoRA (Luo et al. 2023, LCM-LoRA), as diffusers' LCM-LoRA training script "
        "does it: one DDIM step of the teacher with CFG (scale drawn per sample) between neighbours of an N-step grid, the "
        "student's LCM boundary output matched to its own (no-grad) output one step on, pseudo-Huber loss. Writes a "
        "consistency LoRA file (kohya keys + fewstep metadata, LCM sampler and timesteps) that the ComfyUI nodes, the "
        "A1111 extension and `fewstep bench --adapter` load like a Flash LoRA. Options default to the script's SD1.5 "
        "setup (--preset paper); --preset proxy matches Flash's proxy preset for a comparison at equal budget.",
        config_class=lcm.LCMConfig, presets=lcm.PRESETS, out_name="lcm_lora.safetensors", label="LCM",
        sample_help="steps between 1/2/4-step sample grids (RUN_DIR/samples)", run=run_train_lcm)


def add_train_guided(methods) -> None:
    p = add_method_command(
        methods, "guided", "distil a teacher into a student that takes the guidance weight w as input (one pass per step)",
        "Guided distillation (Meng et al. 2023), stage 1: a student initialised from the teacher learns to give the "
        "teacher's classifier-free-guided prediction (1 + w) cond - w uncond in one pass, w being an input (Imagen's "
        "convention: CFG scale s = 1 + w). Stage 2: progressive distillation, the student of each round takes one DDIM step "
        "where the previous one takes two, halving the steps from --start-steps to --target-steps with w kept as an input; "
        "each round writes RUN_DIR/round-NNsteps/guided_student.safetensors. Writes one adapter file (kind guided_student: "
        "the UNet, or with --lora-rank a LoRA, with its w-embedding + fewstep metadata).",
        config_class=guided.GuidedConfig, presets=guided.PRESETS, out_name="guided_student.safetensors", label="guided",
        sample_help="steps between sample grids at w = 0 and the default w (RUN_DIR/samples)", run=run_train_guided)
    p.add_argument("--stage", type=int, default=1, choices=[1, 2],
                   help="1: w-conditioned student from the teacher; 2: progressive step halving of --student")
    p.add_argument("--student", default=None, help="stage 2: the guided_student file to halve (stage 1's, or a later round's)")


def add_train_sun(methods) -> None:
    add_method_command(
        methods, "sun", "train a SUN adapter: one pass per step with the negative prompt still working (4 steps, no CFG)",
        "SUN / SpeedUpNet (Chai et al. 2023): train a cross-attention adapter fed by the negative prompt so that one UNet "
        "pass gives the teacher's CFG result with that negative prompt; the base UNet stays frozen, so the adapter plugs "
        "into fine-tuned models of the same base. Losses: offset learning against the teacher's CFG prediction with random "
        "negative prompts, and multi-step consistency with the teacher's multistep CFG trajectory. Writes one adapter file "
        "(kind sun_adapter) that the ComfyUI nodes and `fewstep bench --adapter` load.",
        config_class=sun.SunConfig, presets=sun.PRESETS, out_name="sun_adapter.safetensors", label="SUN",
        sample_help="steps between sample grids with an empty and a class negative prompt (RUN_DIR/samples)", run=run_train_sun)


def add_train_gdd(methods) -> None:
    add_method_command(
        methods, "gdd", "train a one-step generator by distributional (GAN) distillation: GDD / GDD-I (1 step, no CFG)",
        "GDD (Zheng & Yang 2024, 'Diffusion Models Are Innate One-Step Generators'): a copy of the teacher UNet learns to "
        "map pure noise to an image in one pass with a GAN loss alone (non-saturating, lazy R1, EMA); the discriminator is "
        "a small head on the frozen teacher's own features, conditioned on the prompt. GDD-I (default) freezes the "
        "convolutions; --variant lora trains only a LoRA. The real samples are --data, or with --data-free PROMPTS the "
        "teacher's own CFG samples: the generator then follows prompts as the teacher does with CFG (on the proxy "
        "benchmark, one-step prompt accuracy 0.97-0.99 against 0.77-0.94 on the training images). Writes one adapter file "
        "(kind gdd_student, sampler onestep); rerun with a larger --steps to train on.",
        config_class=gdd.GDDConfig, presets=gdd.PRESETS, out_name="gdd_student.safetensors", label="GDD",
        sample_help="steps between one-step sample grids (RUN_DIR/samples)", run=run_train_gdd)


def run_train_flash(args: argparse.Namespace) -> int:
    return run_distillation(args, "flash", flash.load_config, method_overrides(args, flash.FlashConfig), "flash_lora.safetensors",
                            lambda **kw: flash.train_flash(init_lora=args.init_lora, **kw),
                            "Flash LoRA written to {out}; try: fewstep bench --set flash --adapter {out}")


def run_train_lcm(args: argparse.Namespace) -> int:
    return run_distillation(args, "lcm", lcm.load_config, method_overrides(args, lcm.LCMConfig), "lcm_lora.safetensors",
                            lcm.train_lcm, "LCM-LoRA written to {out}; try: fewstep eval --adapter {out}")


def run_train_guided(args: argparse.Namespace) -> int:
    overrides = method_overrides(args, guided.GuidedConfig)
    if args.stage == 1:
        return run_distillation(args, "guided", guided.load_config, overrides, "guided_student.safetensors",
                                guided.train_guided, "guided student written to {out}; try: fewstep bench --set guided --adapter {out}")
    if not args.student:
        print("error: --stage 2 needs --student: the guided_student file of stage 1 (or of a later round)", file=sys.stderr)
        return 2
    if args.lora_rank is not None:
        print("error: --lora-rank is a stage-1 option; stage 2 keeps the form of the --student file (whole UNet or LoRA)",
              file=sys.stderr)
        return 2
    return run_distillation(args, "guided", guided.load_config, overrides, "guided_student.safetensors",
                            lambda **kw: guided.train_progressive(student=args.student, **kw),
                            "few-step guided student written to {out}; every round's is in RUN_DIR/round-*steps/")


def run_train_gdd(args: argparse.Namespace) -> int:
    return run_distillation(args, "gdd", gdd.load_config, method_overrides(args, gdd.GDDConfig), "gdd_student.safetensors",
                            gdd.train_gdd,
                            "one-step GDD generator written to {out}")


def run_train_sun(args: argparse.Namespace) -> int:
    return run_distillation(args, "sun", sun.load_config, method_overrides(args, sun.SunConfig), "sun_adapter.safetensors",
                            sun.train_sun,
                            "SUN adapter written to {out}; try: fewstep bench --set sun --adapter {out}")


def run_distillation(args: argparse.Namespace, method: str, load_config, overrides: dict, out_name: str, train, done: str) -> int:
    """Resolve options (preset < --config < flags) and check the data, then hold the run folder, print and save the
    options, train and report; errors exit with 2 (here, or in main for those raised while training)."""
    import dataclasses
    from pathlib import Path

    from ..bundled import BUNDLED_TEACHER, bundled_teacher_data
    from ..data import check_dataset
    from ..loop import lock_run_dir
    from ..pipelines import TeacherError

    teacher = Path(args.teacher) if args.teacher else BUNDLED_TEACHER
    preset = args.preset or ("proxy" if bundled_teacher_data(teacher) else "paper")
    try:
        config = load_config(preset, args.config, **overrides)
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
    data = str(Path(args.run_dir) / "synth") if args.data_free else args.data or bundled_teacher_data(teacher) or "proxy"
    if not args.data_free:
        check_dataset(data)
    options = {"teacher": str(teacher), "data": data, "preset": preset, "run_dir": args.run_dir, "out": out,
               "mixed_precision": mixed_precision(args.mixed_precision), method: dataclasses.asdict(config)}
    if args.data_free:
        options["synth"] = {"prompts": args.data_free, "count": args.synth_count, "steps": args.synth_steps,
                            "cfg_scale": _synth_cfg(args.synth_cfg, teacher)}
    with lock_run_dir(args.run_dir):
        if announce(args.run_dir, options, args.dry_run):
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
    from ..bench import is_bundled_lineage
    from ..evaluation import DEFAULT_CFG_SCALE

    if cfg is not None:
        return cfg
    return DEFAULT_CFG_SCALE if is_bundled_lineage(teacher) else 7.5


def _synthesize(teacher, teacher_config, prompts: str, out: str, count: int, steps: int, cfg_scale: float, layout: str,
                seed: int = 0, negative: str = "", batch_size: int = 16) -> dict:
    """Load the teacher and write (or finish) a synthesized set; problems with the prompts or the folder raise SynthError."""
    from ..pipelines import base_of, load_teacher
    from ..synth import read_prompts, synthesize
    from ..synth_sets import SynthSettings

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
        "mixed_precision": mixed_precision(args.mixed_precision), "checkpoint_every": args.checkpoint_every,
        "sample_every": args.sample_every, "seed": args.seed, "resume": not args.no_resume, "stop_after": args.stop_after,
    }
    from ..data import check_dataset, load_dataset
    from ..loop import lock_run_dir

    check_dataset(args.data)
    with lock_run_dir(args.run_dir):
        if announce(args.run_dir, {"data": args.data, **config}, args.dry_run):
            return 0
        from ..teacher import train_teacher

        out = train_teacher(load_dataset(args.data), **config)
    print(f"teacher pipeline written to {out}" if out else f"stopped after step {args.stop_after}; rerun to continue")
    return 0


def add_synth(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="let the teacher write a training set from prompts alone (no dataset needed)",
        description="Sample the teacher (DDIM with CFG) and write a dataset that every `fewstep train` method reads with "
        "--data OUT: images with same-name .txt captions and .json records (seed and settings), or with --latents the "
        "latents only (no VAE round trip). Sample i takes prompt i (the list repeats) and seed --seed + i, so a set is "
        "reproducible; rerun the same command to continue a stopped run (nothing is written twice or skipped). Runs on "
        "several GPUs under `accelerate launch`.")
    add_teacher_source(p)
    p.add_argument("--prompts", required=True,
                   help="a text file with one prompt per line (# comments and blank lines skipped), or a built-in set: "
                   "proxy (the bundled training captions), proxy-classes (its 20 classes)")
    p.add_argument("--count", "--n", dest="count", type=positive_int, required=True,
                   help="samples in the set (spell it --count under torchrun / accelerate launch: they take --n for theirs)")
    p.add_argument("--steps", type=positive_int, default=25, help="teacher sampling steps (DDIM, trailing timesteps)")
    p.add_argument("--cfg", type=finite, default=None, help="CFG scale (default: 4 for the bundled teacher and fine-tunes of it, 7.5 otherwise)")
    p.add_argument("--negative", default="", help="negative prompt (the unconditional side of CFG)")
    p.add_argument("--seed", type=int, default=0, help="sample i has seed SEED + i")
    p.add_argument("--batch-size", type=positive_int, default=16, help="samples per teacher batch")
    p.add_argument("--latents", action="store_true", help="write the latents only (for training; no images to look at)")
    p.add_argument("--out", required=True, help="the dataset folder (new, or one this command wrote with the same settings)")
    p.set_defaults(run=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bundled import BUNDLED_TEACHER
    from ..pipelines import TeacherError
    from ..synth_sets import SynthError

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
