"""What core's samplers and schedule add on top of the network passes they drive.

Times each sampler driving a free network (returns zeros: what remains is schedule lookups, input scaling,
x0 conversion, re-noising, callbacks) against the bare UNet passes it would drive, in one run, and writes
the ratio. Subtracting two noisy UNet timings would hide a sub-percent cost in CPU jitter.
Usage: python bench/sampler_overhead.py [--batch 16] [--steps 4] [--repeats 20] [--out bench/results/sampler_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep.core import samplers
from fewstep.core.schedule import DiscreteSchedule, select_timesteps
from fewstep.core.parameterization import denoise
from fewstep.training.diffusers_sampling import run_sampler
from fewstep.training.tiny_models import build_tiny_unet
from fewstep.training.bench import machine_description


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="latents per pass")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (= UNet passes)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats; the best is kept")
    parser.add_argument("--out", default="bench/results/sampler_overhead.json", help="where to write the JSON result")
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = build_tiny_unet("sd15")
    schedule = DiscreteSchedule.stable_diffusion()
    noise = torch.randn(args.batch, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(args.batch, 77, unet.config.cross_attention_dim)}
    sigmas = schedule.sigmas_for_timesteps(select_timesteps("trailing", args.steps))
    timesteps = schedule.timestep(sigmas[:-1])

    @torch.no_grad()
    def bare():
        for t in timesteps:
            unet(noise, t.expand(args.batch), **cond)

    bare_s = _best_of(bare, args.repeats)
    free_network = lambda x_t, timestep, **_: torch.zeros_like(x_t)  # everything but the UNet
    free = lambda x, sigma, seed=None, **c: denoise(free_network, x, sigma, schedule, **c)
    results = {}
    for name in ["consistency", "ddim", "stochastic"]:
        fn = samplers.get_sampler(name)
        s = _best_of(lambda: run_sampler(fn, free, noise, sigmas, cond, seed=0, progress=False), args.repeats)
        results[name] = {"sampler_seconds": s, "overhead_ratio": s / bare_s}
    report = {
        "what": "time of sampler + schedule around a free network, as a fraction of the bare UNet passes; best of repeats, one run",
        "machine": machine_description("cpu"),
        "unet": f"tiny sd15, {sum(p.numel() for p in unet.parameters()):,} params",
        "batch": args.batch, "steps": args.steps, "bare_unet_seconds": bare_s, "samplers": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:12s} {r['sampler_seconds'] * 1e3:7.3f} ms around {bare_s * 1e3:7.2f} ms of UNet passes: {r['overhead_ratio'] * 100:.2f}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
