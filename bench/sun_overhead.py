"""What a SUN adapter adds to one UNet pass, and what a SUN step costs next to a CFG step.

For each UNet (the bundled proxy teacher's, and a real-size SD1.5 UNet with random weights), times one pass with the
stock attention processors, one with the SUN processors (add_pos: two extra attention branches per cross-attention
layer) and one CFG pass (the batch doubled for the negative prompt), interleaved, best of N each; writes the ratios.
On a CUDA machine the passes run there in fp16; on CPU, quote the ratios only.
Usage: python bench/sun_overhead.py [--repeats 5] [--sd15-batch 1] [--out bench/results/sun_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.sun_attention import attach_sun, new_sun_adapter
from fewstep.training.bench import machine_description


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(unet, batch: int, size: int, repeats: int, device: str, dtype: torch.dtype) -> dict:
    unet = unet.to(device, dtype).eval()
    config = unet.config
    x = torch.randn(batch, config.in_channels, size, size, device=device, dtype=dtype)
    t = torch.full((batch,), 999, device=device)
    context = torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype)
    negative = torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype)
    stock_processors = dict(unet.attn_processors)
    adapter = new_sun_adapter(unet, add_pos=True).to(device, dtype)
    for p in adapter.parameters():     # nonzero gains: the branches do their full work
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)

    def stock():
        unet(x, t, context)

    def cfg():
        unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, negative]))

    def sun():
        with inputs.negative_prompt(negative):
            unet(x, t, context)

    times = {"stock": [], "cfg": [], "sun": []}
    with torch.no_grad():
        for _ in range(repeats + 1):   # the first round warms up
            unet.set_attn_processor(dict(stock_processors))   # it empties the dict it is given
            times["stock"].append(_timed(stock, device))
            times["cfg"].append(_timed(cfg, device))
            inputs = attach_sun(unet, adapter)
            times["sun"].append(_timed(sun, device))
    unet.set_attn_processor(dict(stock_processors))
    best = {k: min(v[1:]) for k, v in times.items()}
    return {"batch": batch, "latent_size": size, "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "adapter_parameters": sum(p.numel() for p in adapter.parameters()), "cross_attention_layers": len(adapter.names),
            "sun_over_stock": best["sun"] / best["stock"], "sun_over_cfg": best["sun"] / best["cfg"],
            "cfg_over_stock": best["cfg"] / best["stock"],
            **({"seconds": best} if device == "cuda" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the best of each is kept")
    parser.add_argument("--proxy-batch", type=int, default=16, help="latents per pass on the proxy teacher")
    parser.add_argument("--sd15-batch", type=int, default=1, help="latents per pass on the SD1.5-size UNet (64x64 latents)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sun_overhead.json"))
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    proxy = UNet2DConditionModel.from_pretrained(BUNDLED_TEACHER / "unet", torch_dtype=torch.float32)
    results = {"proxy_teacher": measure(proxy, args.proxy_batch, proxy.config.sample_size, args.repeats, device, dtype)}
    print("proxy teacher:", json.dumps(results["proxy_teacher"]), flush=True)
    sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)   # diffusers' defaults are SD1.5's UNet
    results["sd15_random_weights"] = measure(sd15, args.sd15_batch, 64, args.repeats, device, dtype)
    print("SD1.5-size UNet:", json.dumps(results["sd15_random_weights"]), flush=True)
    document = {"what": "one UNet pass: stock attention, SUN add_pos adapter (negative prompt in the adapter), CFG (batch "
                        "doubled); best of the timed rounds, interleaved",
                "machine": machine_description(device),
                "dtype": str(dtype).replace("torch.", ""), "repeats": args.repeats, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
