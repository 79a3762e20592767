"""Inside ComfyUI: time per step of the FewStep Sampler vs the bare model call, on a tiny SD1.5-detectable UNet.

The SD1.5-shaped UNet (model_channels 320, context 768, one level, random weights) runs at 256 px by default.
Three numbers per step, each the median of runs timed in rotation on the same patched model (Flash-style LoRA + fewstep's
consistency-boundary wrapper): the bare ``apply_model`` call; a 4-step run through ComfyUI's sampling path
(``comfy.sample.sample_custom``, CFG 1) with the FewStep Sampler; and the same path with ComfyUI's own ``lcm``
sampler, which shows what ComfyUI's path costs by itself. Run it with ComfyUI importable:

    PYTHONPATH=$COMFYUI_PATH:../shared/hosts/stubs $COMFYUI_PYTHON bench/comfyui_sampler_overhead.py

Writes bench/results/comfyui_sampler_overhead.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LDM_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
                num_heads=8, transformer_depth=[1], transformer_depth_output=[1, 1],
                transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                use_spatial_transformer=True, legacy=False)


def import_fewstep():
    """This checkout as the package ``fewstep``, the way ComfyUI imports a custom-node folder."""
    spec = importlib.util.spec_from_file_location("fewstep", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fewstep"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("fewstep.nodes.adapters")


def tiny_sd15(seed: int = 0):
    import comfy.ops
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**LDM_UNET, operations=comfy.ops.disable_weight_init)
    state = {f"model.diffusion_model.{k}": torch.randn(v.shape) * 0.02 for k, v in unet.state_dict().items()}
    return comfy.sd.load_state_dict_guess_config(state, output_vae=False, output_clip=False)[0]


def flash_style_lora(adapters, model, folder: Path, rank: int = 8) -> str:
    """A fewstep flash_lora file over every attention projection ComfyUI maps for this model."""
    import comfy.lora

    from fewstep.core.adapter_file import AdapterMetadata, write_adapter

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    tensors = {}
    for name, key in key_map.items():
        if not (name.startswith("lora_unet_") and name.endswith(("to_q", "to_k", "to_v", "to_out_0"))):
            continue
        out_features, in_features = weights[key].shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features) * 0.01
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank) * 0.01
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path = folder / "flash.safetensors"
    write_adapter(path, tensors, AdapterMetadata(kind="flash_lora", base="sd15", timesteps=[999, 749, 499, 249]))
    return str(path)


def interleaved_medians(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each variant, timed in rotation so that drift in machine speed hits all alike."""
    for fn in variants.values():
        fn()  # warm-up
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per variant (median reported)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latents are size/8)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "comfyui_sampler_overhead.json"))
    args = parser.parse_args()

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfyui_version

    adapters = import_fewstep()
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_sd15()
        adapter = adapters.load_adapter(flash_style_lora(adapters, base, Path(tmp)), "sd15")
    model, _ = adapters.add_lora(base, None, adapter, 1.0, [])
    model = adapters.add_consistency_boundary(model)
    timesteps = adapter.metadata.timesteps_for(4)
    sigmas = adapters.model_schedule(model).sigmas_for_timesteps(timesteps)
    steps = len(timesteps)

    gen = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = torch.randn(latent.shape, generator=gen)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.zeros(1, 77, 768), {}]]

    def run(sampler):
        return lambda: comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, positive, negative, latent, seed=0,
                                                  disable_pbar=True)

    comfy.model_management.load_models_gpu([model])   # the patched weights, as sampling uses them
    device = model.load_device
    x, sigma, context = noise.to(device) * 14.6, sigmas[:1].to(device), positive[0][0].to(device)

    def bare():
        for _ in range(steps):
            model.model.apply_model(x, sigma, c_crossattn=context)

    with torch.inference_mode():   # as ComfyUI's executor runs every node
        medians = interleaved_medians({"bare": bare, "fewstep": run(adapters.make_sampler("consistency")),
                                       "lcm": run(comfy.samplers.ksampler("lcm"))}, args.repeats)
    bare_step, fewstep_step, comfy_lcm_step = (medians[k] / steps for k in ("bare", "fewstep", "lcm"))

    results = {
        "bare_apply_model_s": bare_step, "fewstep_sampler_step_s": fewstep_step, "comfyui_lcm_sampler_step_s": comfy_lcm_step,
        "fewstep_over_bare": fewstep_step / bare_step, "comfyui_lcm_over_bare": comfy_lcm_step / bare_step,
        "fewstep_over_comfyui_lcm": fewstep_step / comfy_lcm_step,
    }
    for name, value in results.items():
        print(f"{name}: {value:.4f}")
    document = {
        "what": "seconds per step inside ComfyUI: FewStep Sampler (4 steps, CFG 1, sample_custom) vs bare apply_model, "
                "and ComfyUI's own lcm sampler on the same path",
        "model": "SD1.5-detectable UNet (320 ch, context 768, one level, random weights) + rank-8 attention LoRA + "
                 f"fewstep consistency-boundary wrapper, {args.size // 8}x{args.size // 8} latents ({args.size} px), batch 1",
        "timesteps": timesteps, "repeats": args.repeats, "results": results,
        "comfyui": comfyui_version.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {device}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
