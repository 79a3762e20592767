"""What one training step of each method costs, and where the time goes: network passes per module, backward, optimiser.

Every method runs its own training module (the one `fewstep train` builds, its preset's options) on the same random
latents and captions at one batch size, with AdamW over its trainable parameters. Forward hooks on the module's networks
(teacher, student, the shared UNet of SUN, the discriminator head, the text encoder) count and time each pass and the
images it carries (a teacher pass that stops at the discriminator's feature layer counts as a whole one). Images per step,
unlike seconds, do not depend on how well a machine fills its cores at small batches: they show what a GPU at full size
pays for the forward passes. What the forward spends outside them (solver arithmetic, sampling noise) is "other". Flash is measured in each of its phases
on consecutive steps from each phase's first (its rollout length is drawn per step and a lazy DMD term comes every
few steps, so give it enough steps), reported as their mean weighted by the phases' lengths; GDD on steps without its
lazy R1 term. A method named with options, ``flash[teacher_steps=8]``, is measured with them (an ablation next to the
preset's row).

    python bench/step_cost.py --steps 12                           # bundled proxy teacher, CPU, batch 32
    python bench/step_cost.py --model sd15-random --batch-size 4 --mixed-precision bf16   # GPU: SD1.5-size UNet, 512 px

Writes bench/results/step_cost.json (or --out). Ratios compare methods measured in the same run.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict

import torch

from flash_throughput import CAPTIONS, sd15_random_pipeline, timing_parser
from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.loop import step_generator
from fewstep.training.methods import flash, gdd, lcm, sun
from fewstep.training.pipelines import load_teacher
from fewstep.training.teacher_data import schedule_of
from fewstep.training.bench import write_result

TIMED_MODULES = ("teacher", "student", "fake_score", "unet", "discriminator")


METHODS = {"lcm": lcm, "flash": flash, "sun": sun, "gdd": gdd}


def parse_method(spec: str) -> tuple[str, dict]:
    """``flash`` or ``flash[teacher_steps=8,dmd_weights=[0,0,0,0]]`` -> (method, options); values as JSON, else strings."""
    method, _, rest = spec.partition("[")
    if method not in METHODS or (rest and not rest.endswith("]")):
        raise SystemExit(f"{spec!r}: expected METHOD or METHOD[NAME=VALUE,...] with METHOD one of {', '.join(METHODS)}")
    options = {}
    for item in filter(None, split_top_level(rest[:-1])):
        name, _, value = item.partition("=")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return method, options


def split_top_level(text: str) -> list[str]:
    """``a=1,b=[1,2]`` -> ["a=1", "b=[1,2]"]: commas inside brackets stay."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [*items, current]


def config_of(method: str, preset: str, batch_size: int, checkpointing: bool, options: dict):
    return METHODS[method].load_config(preset, batch_size=batch_size, gradient_checkpointing=checkpointing or None,
                                       **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def build(method: str, pipe, config, dtype: torch.dtype):
    """A method's training module on its own copy of ``pipe``."""
    pipe = copy.deepcopy(pipe)
    if method == "sun":
        return sun.SunTraining(pipe, config, schedule_of(pipe), sun.negative_pool(config, CAPTIONS))
    return METHODS[method].build_distillation(pipe, config, teacher_dtype=dtype)


def steps_to_measure(method: str, config) -> dict[str, tuple[int, float]]:
    """{row name: (the batch's "step" to run at, its weight in the method's mean)}: Flash once per phase."""
    if method == "flash":
        starts = [sum(config.phase_steps[:i]) for i in range(len(config.phase_steps))]
        return {f"phase-{i + 1}": (start, n / config.total_steps) for i, (start, n) in enumerate(zip(starts, config.phase_steps))}
    return {"": (1 if method == "gdd" else 0, 1.0)}   # GDD: steps 1, 2, ...: no lazy R1 (every 16th) among them


class PassTimer:
    """Forward hooks that count and time every pass of the named networks of a training module."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.calls, self.seconds, self.images, self.handles = device, defaultdict(int), defaultdict(float), defaultdict(int), []
        networks = {name: getattr(model, name) for name in TIMED_MODULES if isinstance(getattr(model, name, None), torch.nn.Module)}
        if getattr(model, "text_encoders", None) is not None and len(model.text_encoders):
            networks["text_encoder"] = model.text_encoders[0]
        for name, network in networks.items():
            self.handles.append(network.register_forward_pre_hook(lambda m, a, kw, name=name: self._start(name, a, kw),
                                                                  with_kwargs=True))
            self.handles.append(network.register_forward_hook(lambda m, a, o, name=name: self._stop(name), always_call=True))
        self._open: dict[str, float] = {}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, name: str, args: tuple, kwargs: dict) -> None:
        first = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v)), None)
        self.images[name] += first.shape[0] if first is not None else 0
        self._open[name] = self._now()

    def _stop(self, name: str) -> None:
        self.calls[name] += 1
        self.seconds[name] += self._now() - self._open.pop(name)

    def reset(self) -> None:
        self.calls.clear(), self.seconds.clear(), self.images.clear()


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
            terms = model({"latents": z.to(device), "captions": captions, "step": step + i}, step_generator(i, step + i))
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
              "passes": {name: {"calls_per_step": timer.calls[name] / n, "seconds_per_step": timer.seconds[name] / n,
                                "images_per_step": timer.images[name] / n}
                         for name in sorted(timer.calls)}}
    result["other_forward_seconds"] = result["forward_seconds"] - sum(p["seconds_per_step"] for p in result["passes"].values())
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def mean_of(parts: dict[str, dict]) -> dict:
    """The weighted mean of per-phase measurements (every number, nested pass tables included)."""
    def mean(values: list, weights: list):
        if isinstance(values[0], dict):
            keys = set().union(*values)
            return {k: mean([v.get(k, 0.0) for v in values], weights) for k in sorted(keys) if k != "weight"}
        return sum(w * v for v, w in zip(values, weights))
    weights = [p["weight"] for p in parts.values()]
    return mean([{k: v for k, v in p.items() if k != "weight"} for p in parts.values()], weights)


def report(name: str, r: dict) -> None:
    passes = ", ".join(f"{n} {p['calls_per_step']:.2f}x {p['seconds_per_step']:.3f}s ({p['images_per_step']:.0f} images)"
                       for n, p in r["passes"].items())
    print(f"{name}: {r['seconds_per_step']:.3f} s/step (forward {r['forward_seconds']:.3f}: {passes}; "
          f"other {r['other_forward_seconds']:.3f}; backward {r['backward_seconds']:.3f}; optimiser {r['optimiser_seconds']:.3f})")


def main() -> None:
    parser = timing_parser(__doc__, "bench/results/step_cost.json", 12, "timed steps per method and Flash phase (after one "
                           "warm-up step)", 32, "images per step, the same for every method")
    parser.add_argument("--methods", default="lcm,flash,sun,gdd",
                        help="space- or comma-separated: lcm, flash, sun, gdd, each optionally with options, flash[teacher_steps=8]")
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
    for name in split_top_level(args.methods.replace(" ", ",")):
        if not name:
            continue
        method, options = parse_method(name)
        config = config_of(method, preset, args.batch_size, args.gradient_checkpointing, options)
        model = build(method, pipe, config, dtype)
        parts = {}
        for part, (step, weight) in steps_to_measure(method, config).items():
            parts[part] = {**measure(model, step, batches, device, dtype), "weight": weight}
            report(f"{name} {part}".strip(), parts[part])
        del model
        results[name] = parts[""] if "" in parts else {**mean_of(parts), "phases": parts}
        if len(parts) > 1:
            report(f"{name} (mean over phases)", results[name])
    for r in results.values():   # forward work in UNet images (teacher, student, SUN's UNet), backward not counted
        r["steps_per_second"] = 1.0 / r["seconds_per_step"]
        r["unet_images_per_step"] = sum(p["images_per_step"] for n, p in r["passes"].items() if n in ("teacher", "student", "unet"))
    if "lcm" in results:
        for method, r in results.items():
            r["cost_vs_lcm"] = r["seconds_per_step"] / results["lcm"]["seconds_per_step"]
            r["unet_images_vs_lcm"] = r["unet_images_per_step"] / results["lcm"]["unet_images_per_step"]
            print(f"{method}: {r['cost_vs_lcm']:.2f}x an LCM step's time, {r['unet_images_vs_lcm']:.2f}x its UNet images")
    document = {
        "what": "seconds per training step of each method at one batch size, split into network passes, backward and optimiser",
        "model": args.model, "preset": preset, "latent_size": size, "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing, "timed_steps": args.steps,
        "results": results,
    }
    write_result(document, args.out, device)


if __name__ == "__main__":
    main()
