"""Flash training throughput: teacher work once per batch (fewstep) vs twice (the reference implementation).

The reference code (gojasper/flash-diffusion) steps two optimisers per batch and runs its whole forward,
teacher rollout and teacher features included, once for each. fewstep computes them once and trains
the LoRA and the discriminator head from one backward pass. Both variants here run the same module on
the same batches, noise and start points (last phase: every loss term on), so the ratio isolates that.

    python bench/flash_throughput.py                         # bundled proxy teacher, CPU
    python bench/flash_throughput.py --model sd15-random --batch-size 4 --mixed-precision bf16   # GPU: SD1.5-size UNet, 512 px

Writes bench/results/flash_throughput.json (or --out).
"""

from __future__ import annotations

import argparse
import time

import torch

from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.loop import step_generator
from fewstep.training.methods.flash import build_distillation, load_config
from fewstep.training.pipelines import load_teacher
from fewstep.training.bench import write_result

CAPTIONS = ["a handwritten digit three", "a silhouette of a cat", "a handwritten digit seven", "a silhouette of a horse"]


def timing_parser(doc: str, out: str, steps: int, steps_help: str, batch_size: int | None, batch_help: str):
    """The options every step-timing script shares (model, batch, timed steps, precision, checkpointing, output file)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="proxy", choices=["proxy", "sd15-random"], help="bundled proxy teacher or SD1.5-size random UNet")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="bf16 autocast for the networks (GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--out", default=out, help="where the JSON goes")
    return parser


def sd15_random_pipeline():
    """SD1.5's UNet and text encoder at full size with random weights (timing only), the real tokenizer, a tiny VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fewstep.training.clip_tokenizer import load_clip_tokenizer
    from fewstep.training.tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, build_tiny_vae, sd_scheduler_config

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
                                layers_per_block=2, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                                        pad_token_id=EOS_TOKEN_ID))
    return StableDiffusionPipeline(vae=build_tiny_vae(), text_encoder=text, tokenizer=load_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(**sd_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def measure(model, optimizers, batches, fused: bool, device, dtype) -> float:
    """Seconds per optimiser step over ``batches``; each batch is (latents, captions, seed)."""
    lora, head = optimizers
    last_phase = model.config.total_steps - 1
    times = []
    for z, captions, seed in batches:
        batch = {"latents": z.to(device), "captions": captions, "step": last_phase}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            terms = model(batch, step_generator(seed, 0))
        if fused:
            lora.zero_grad(), head.zero_grad()
            terms["loss"].float().mean().backward()
            lora.step(), head.step()
        else:
            lora.zero_grad()
            (terms["loss"] - terms["discriminator"]).float().mean().backward()
            lora.step()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                terms = model(batch, step_generator(seed, 0))   # the reference's second forward, rollout included
            head.zero_grad()
            terms["discriminator"].float().mean().backward()
            head.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    args = timing_parser(__doc__, "bench/results/flash_throughput.json", 6, "timed steps per variant (after one warm-up "
                         "step each)", None, "default: the preset's (proxy 32, paper 4)").parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    pipe = load_teacher(BUNDLED_TEACHER) if args.model == "proxy" else sd15_random_pipeline()
    preset = "proxy" if args.model == "proxy" else "paper"
    overrides = {"gradient_checkpointing": args.gradient_checkpointing or None, "batch_size": args.batch_size}
    config = load_config(preset, **overrides)
    model = build_distillation(pipe, config, teacher_dtype=dtype).to(device)
    model.train()
    lora = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=config.lr)
    head = torch.optim.AdamW(model.discriminator.parameters(), lr=config.disc_lr)
    size = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(config.batch_size, 4, size, size, generator=gen), [CAPTIONS[i % 4] for i in range(config.batch_size)], seed)
               for seed in range(args.steps + 1)]
    results = {}
    for fused in (True, False):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        measure(model, (lora, head), batches[:1], fused, device, dtype)
        seconds = measure(model, (lora, head), batches[1:], fused, device, dtype)
        name = "teacher_once" if fused else "teacher_twice_reference"
        results[name] = {"seconds_per_step": seconds, "steps_per_second": 1.0 / seconds}
        if device.type == "cuda":
            results[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"{name}: {1.0 / seconds:.3f} steps/s")
    ratio = results["teacher_once"]["steps_per_second"] / results["teacher_twice_reference"]["steps_per_second"]
    print(f"speed-up from computing the teacher once: {ratio:.2f}x")
    document = {
        "what": "Flash training steps/s, teacher rollout + features once per batch (fewstep) vs twice (reference structure)",
        "model": args.model, "latent_size": size, "batch_size": config.batch_size,
        "teacher_steps": config.teacher_steps, "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": config.gradient_checkpointing, "timed_steps": args.steps, "results": results,
        "speedup": ratio,
    }
    write_result(document, args.out, device)


if __name__ == "__main__":
    main()
