"""What one training step of each method costs, and where the time goes: network passes per module, backward, optimiser.

Every method runs its own training module (the one `fewstep train` builds, its preset's options) on the same random
latents and captions at one batch size, with AdamW over its trainable parameters. Forward hooks on the module's networks
(teacher, student, the shared UNet of SUN, the discriminator head, the text encoder) count and time each pass (a
teacher pass that stops at the discriminator's feature layer counts as one); what the
forward spends outside them (solver arithmetic, sampling noise) is "other". Flash is measured in its first phase
(distillation and GAN terms) and its last (plus DMD); GDD on steps without its lazy R1 term.

    python bench/step_cost.py                                      # bundled proxy teacher, CPU, batch 32
    python bench/step_cost.py --model sd15-random --batch-size 4 --mixed-precision bf16   # GPU: SD1.5-size UNet, 512 px

Writes bench/results/step_cost.json (or --out). Ratios compare methods measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

from flash_throughput import CAPTIONS, sd15_random_pipeline
from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.loop import step_generator
from fewstep.training.methods import flash, gdd, lcm, sun
from fewstep.training.pipelines import load_teacher
from fewstep.training.teacher_data import schedule_of

TIMED_MODULES = ("teacher", "student", "unet", "discriminator")


def build(method: str, pipe, preset: str, batch_size: int, dtype: torch.dtype, checkpointing: bool):
    """(training module, the batch's "step" to run at) for a method, on its own copy of ``pipe``."""
    pipe = copy.deepcopy(pipe)
    common = {"batch_size": batch_size, "gradient_checkpointing": checkpointing or None}
    if method == "lcm":
        return lcm.build_distillation(pipe, lcm.load_config(preset, **common), teacher_dtype=dtype), 0
    if method.startswith("flash"):
        config = flash.load_config(preset, **common)
        step = 0 if method == "flash-first-phase" else config.total_steps - 1
        return flash.build_distillation(pipe, config, teacher_dtype=dtype), step
    if method == "sun":
        config = sun.load_config(preset, **common)
        return sun.SunTraining(pipe, config, schedule_of(pipe), sun.negative_pool(config, CAPTIONS)), 0
    if method == "gdd":
        config = gdd.load_config(preset, **common)
        return gdd.build_distillation(pipe, config, teacher_dtype=dtype), 1   # not a multiple of r1_interval
    raise ValueError(f"unknown method {method!r}")


class PassTimer:
    """Forward hooks that count and time every pass of the named networks of a training module."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.calls, self.seconds, self.handles = device, defaultdict(int), defaultdict(float), []
        networks = {name: getattr(model, name) for name in TIMED_MODULES if isinstance(getattr(model, name, None), torch.nn.Module)}
        if getattr(model, "text_encoders", None) is not None and len(model.text_encoders):
            networks["text_encoder"] = model.text_encoders[0]
        for name, network in networks.items():
            self.handles.append(network.register_forward_pre_hook(lambda m, a, name=name: self._start(name)))
            self.handles.append(network.register_forward_hook(lambda m, a, o, name=name: self._stop(name), always_call=True))
        self._open: dict[str, float] = {}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, name: str) -> None:
        self._open[name] = self._now()

    def _stop(self, name: str) -> None:
        self.calls[name] += 1
        self.seconds[name] += self._now() - self._open.pop(name)

    def reset(self) -> None:
        self.calls.clear(), self.seconds.clear()


def measure(model, step: int, batches, device, dtype) -> dict:
    """Seconds per step over ``batches`` (after one warm-up step), split into forward (per network), backward and
    the optimiser step."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    timer = PassTimer(model, device)
    parts = defaultdict(float)
    for i, (z, captions) in enumerate(batches):
        if i == 1:
            timer.reset(), parts.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        start = timer._now()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            terms = model({"latents": z.to(device), "captions": captions, "step": step}, step_generator(i, step))
        forward = timer._now()
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].float().mean().backward()
        backward = timer._now()
        optimizer.step()
        end = timer._now()
        parts["forward"] += forward - start
        parts["backward"] += backward - forward
        parts["optimiser"] += end - backward
    n = len(batches) - 1
    result = {"seconds_per_step": sum(parts.values()) / n, **{f"{k}_seconds": v / n for k, v in parts.items()},
              "trainable_parameters": sum(p.numel() for p in params),
              "passes": {name: {"calls_per_step": timer.calls[name] / n, "seconds_per_step": timer.seconds[name] / n}
                         for name in sorted(timer.calls)}}
    result["other_forward_seconds"] = result["forward_seconds"] - sum(p["seconds_per_step"] for p in result["passes"].values())
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="proxy", choices=["proxy", "sd15-random"], help="bundled proxy teacher or SD1.5-size random UNet")
    parser.add_argument("--methods", default="lcm,flash-first-phase,flash-last-phase,sun,gdd",
                        help="comma-separated: lcm, flash-first-phase, flash-last-phase, sun, gdd")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step, the same for every method")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method (after one warm-up step)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default="bench/results/step_cost.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    pipe = load_teacher(BUNDLED_TEACHER) if args.model == "proxy" else sd15_random_pipeline()
    preset = "proxy" if args.model == "proxy" else "paper"
    size = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 4, size, size, generator=gen), [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch_size)])
               for _ in range(args.steps + 1)]
    results = {}
    for method in args.methods.split(","):
        model, step = build(method, pipe, preset, args.batch_size, dtype, args.gradient_checkpointing)
        results[method] = measure(model, step, batches, device, dtype)
        del model
        passes = ", ".join(f"{n} {p['calls_per_step']:g}x {p['seconds_per_step']:.3f}s" for n, p in results[method]["passes"].items())
        print(f"{method}: {results[method]['seconds_per_step']:.3f} s/step (forward {results[method]['forward_seconds']:.3f}: "
              f"{passes}; other {results[method]['other_forward_seconds']:.3f}; backward {results[method]['backward_seconds']:.3f}; "
              f"optimiser {results[method]['optimiser_seconds']:.3f})")
    if "lcm" in results:
        for method, r in results.items():
            r["cost_vs_lcm"] = r["seconds_per_step"] / results["lcm"]["seconds_per_step"]
            print(f"{method}: {r['cost_vs_lcm']:.2f}x an LCM step")
    document = {
        "what": "seconds per training step of each method at one batch size, split into network passes, backward and optimiser",
        "model": args.model, "preset": preset, "latent_size": size, "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing, "timed_steps": args.steps,
        "results": results,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"{'cuda ' + torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
