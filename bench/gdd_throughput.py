"""GDD training throughput and peak memory per variant (GDD-I, full UNet, LoRA): optimiser steps per second without
and with the lazy R1 penalty, and the rate averaged over an R1 interval.

    python bench/gdd_throughput.py                                           # bundled proxy teacher, CPU
    python bench/gdd_throughput.py --model sd15-random --batch-size 8 --mixed-precision bf16   # GPU: SD1.5-size UNet, 512 px

Writes bench/results/gdd_throughput.json (or --out).
"""

from __future__ import annotations

import time

import torch
from flash_throughput import CAPTIONS, sd15_random_pipeline, timing_parser

from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.loop import step_generator
from fewstep.training.methods.gdd import build_distillation, load_config, trained_fraction
from fewstep.training.pipelines import load_teacher
from fewstep.training.bench import write_result


def seconds_per_step(model, optimizer, batches, step: int, device, dtype) -> float:
    """Mean seconds of one optimiser step over ``batches`` at training step ``step`` (an R1 step or not)."""
    times = []
    for z, captions, seed in batches:
        batch = {"latents": z.to(device), "captions": captions, "step": step}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            terms = model(batch, step_generator(seed, 0))
        optimizer.zero_grad()
        terms["loss"].float().mean().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    parser = timing_parser(__doc__, "bench/results/gdd_throughput.json", 4, "timed steps per case (after one warm-up step)",
                           None, "default: the preset's (proxy 32, paper 8)")
    parser.add_argument("--variants", default="gdd_i,full,lora", help="comma-separated: gdd_i, full, lora")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    preset = "proxy" if args.model == "proxy" else "paper"
    results = {}
    for variant in args.variants.split(","):
        pipe = load_teacher(BUNDLED_TEACHER) if args.model == "proxy" else sd15_random_pipeline()
        config = load_config(preset, variant=variant, batch_size=args.batch_size,
                             gradient_checkpointing=args.gradient_checkpointing or None)
        model = build_distillation(pipe, config, teacher_dtype=dtype).to(device)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
        size = pipe.unet.config.sample_size
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(config.batch_size, 4, size, size, generator=gen),
                    [CAPTIONS[i % 4] for i in range(config.batch_size)], seed) for seed in range(args.steps + 1)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        plain_step, r1_step = 1, 0   # step 0 is an R1 step (0 % interval == 0), step 1 is not
        seconds_per_step(model, optimizer, batches[:1], r1_step, device, dtype)
        plain = seconds_per_step(model, optimizer, batches[1:], plain_step, device, dtype)
        with_r1 = seconds_per_step(model, optimizer, batches[1:], r1_step, device, dtype)
        every = config.r1_interval
        mean = ((every - 1) * plain + with_r1) / every
        results[variant] = {"trained_fraction": trained_fraction(model.student), "steps_per_second": 1.0 / plain,
                            "steps_per_second_r1_step": 1.0 / with_r1, "steps_per_second_mean": 1.0 / mean,
                            "images_per_second_mean": config.batch_size / mean}
        if device.type == "cuda":
            results[variant]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"{variant}: {100 * results[variant]['trained_fraction']:.1f}% trained, {1 / plain:.3f} steps/s "
              f"({1 / with_r1:.3f} on R1 steps)" + (f", peak {results[variant]['peak_memory_gib']:.1f} GiB" if device.type == "cuda" else ""))
        del model, optimizer, pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    document = {
        "what": "GDD training steps/s and peak memory per variant (one optimiser step = generator + discriminator head)",
        "model": args.model, "latent_size": size, "batch_size": config.batch_size, "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": bool(args.gradient_checkpointing), "r1_interval": config.r1_interval,
        "timed_steps": args.steps, "results": results,
    }
    write_result(document, args.out, device)


if __name__ == "__main__":
    main()
