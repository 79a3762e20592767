"""SnapFusion's blocks (Li et al. 2023): which blocks a UNet has, skipping them, and each block's worth measured per
unit of latency (``fewstep snap plan``): the table the slim architecture is chosen from.

A block is one ResNet (``ResnetBlock2D``) or one cross-attention transformer (``Transformer2DModel``) of a diffusers
``UNet2DConditionModel``, named by its module path. A skipped block passes its input through what it would have added
to: a transformer is residual, so its input; a ResNet its shortcut (the input, or the 1x1 convolution where channels
change: the first ResNet of a level, every up-block ResNet, which reads the skip connection too). Shapes therefore
never change, whichever blocks are skipped, and the UNet's state dict keys stay the teacher's.
"""

from __future__ import annotations

import contextlib
import copy
import types
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..evaluation import TeacherEntry, evaluate_entry
from ..latency import interleaved_medians, latency_inputs

BLOCK_KINDS = {"ResnetBlock2D": "resnet", "Transformer2DModel": "attention"}


@dataclass(frozen=True)
class Block:
    name: str   # module path in the UNet, e.g. "down_blocks.0.attentions.1"
    kind: str   # "resnet" | "attention"


def unet_blocks(unet: torch.nn.Module) -> list[Block]:
    """Every ResNet and cross-attention transformer block, in module order (down, up, mid as diffusers registers them)."""
    return [Block(name, BLOCK_KINDS[type(module).__name__]) for name, module in unet.named_modules()
            if type(module).__name__ in BLOCK_KINDS]


def _skipped_resnet(resnet, input_tensor, *args, **kwargs):
    return resnet.conv_shortcut(input_tensor) if resnet.conv_shortcut is not None else input_tensor


def _skipped_transformer(transformer, hidden_states, *args, return_dict: bool = True, **kwargs):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


class BlockSkipping:
    """Skips chosen blocks of ``unet`` inside ``with skipping.skip(names):``; outside, the UNet is unchanged. Installed
    once, on the block instances' ``forward`` (no wrapper modules, so checkpoints and exports keep the teacher's keys)."""

    def __init__(self, unet: torch.nn.Module):
        self.blocks = unet_blocks(unet)
        self.skipped: frozenset[str] = frozenset()
        modules = dict(unet.named_modules())
        for block in self.blocks:
            module = modules[block.name]
            skipped_forward = _skipped_resnet if block.kind == "resnet" else _skipped_transformer
            module.forward = types.MethodType(self._switch(block.name, type(module).forward, skipped_forward), module)

    def _switch(self, name: str, full, skipped):
        def forward(module, *args, **kwargs):
            return (skipped if name in self.skipped else full)(module, *args, **kwargs)
        return forward

    @contextlib.contextmanager
    def skip(self, names: Iterable[str]) -> Iterator[None]:
        names = frozenset(names)
        unknown = names - {b.name for b in self.blocks}
        if unknown:
            raise ValueError(f"no such block(s): {', '.join(sorted(unknown))}; the UNet's blocks: "
                             f"{', '.join(b.name for b in self.blocks)}")
        previous, self.skipped = self.skipped, names
        try:
            yield
        finally:
            self.skipped = previous


def sample_skipped_blocks(blocks: Sequence[Block], probability: float, generator: torch.Generator) -> list[str]:
    """Robust training's draw: each block skipped independently with ``probability``."""
    draws = torch.rand(len(blocks), generator=generator)
    return [b.name for b, u in zip(blocks, draws.tolist()) if u < probability]


def block_latencies(unet, skipping: BlockSkipping, inputs: dict, repeats: int = 10) -> dict:
    """Seconds per UNet pass on ``inputs`` with nothing skipped (``"unet"``) and the time each block saves when it
    alone is skipped (``"saved"``: name -> seconds). Measured as the whole pass minus the pass without the block, so
    launch and memory effects count as they will."""
    def skipped(names):
        def call():
            with skipping.skip(names):
                unet(**inputs)
        return call

    seconds = interleaved_medians({(): skipped(())} | {(b.name,): skipped((b.name,)) for b in skipping.blocks}, repeats)
    full = seconds[()]
    return {"unet": full, "saved": {b.name: full - seconds[(b.name,)] for b in skipping.blocks}}


def block_table(pipe, per_class: int = 10, steps: int = 25, cfg_scale: float = 4.0, latency_batch: int = 2,
                repeats: int = 10, quality: bool = True, progress: bool = True, dtype: Optional[torch.dtype] = None) -> dict:
    """SnapFusion's per-block measurements on ``pipe`` (the robust-trained teacher): for every block, the latency it
    saves when skipped alone (on this machine, passes in ``dtype``, default the UNet's) and, with ``quality``, the proxy
    benchmark's FID and prompt accuracy with it skipped (DDIM at ``steps`` with CFG, ``per_class`` samples per class,
    in the UNet's own precision) next to the full UNet's."""
    from tqdm.auto import tqdm

    from ..data import PROXY_CLASSES

    timed = copy.deepcopy(pipe.unet).eval().to(dtype or pipe.unet.dtype)
    skipping = BlockSkipping(timed)
    latency = block_latencies(timed, skipping, latency_inputs(pipe, latency_batch, timed), repeats)
    rows = [{"block": b.name, "kind": b.kind, "latency_saved": latency["saved"][b.name] / latency["unet"]} for b in skipping.blocks]
    table = {"unet_seconds_per_pass": latency["unet"], "latency_batch": latency_batch, "blocks": rows,
             "device": str(timed.device), "dtype": str(timed.dtype).replace("torch.", "")}
    del timed, skipping
    if quality:
        unet = copy.deepcopy(pipe.unet).eval()
        skipping = BlockSkipping(unet)
        view = pipe.__class__(**{**pipe.components, "unet": unet})
        entry = TeacherEntry(steps, cfg_scale)
        full = evaluate_entry(view, entry, per_class, batch_size=250, resamples=0)
        table["quality"] = {"steps": steps, "cfg_scale": cfg_scale, "samples": per_class * len(PROXY_CLASSES),
                            "fid": full["fid"], "prompt_accuracy": full["prompt_accuracy"]}
        for row in tqdm(rows, desc="blocks skipped one at a time", disable=not progress):
            with skipping.skip([row["block"]]):
                skipped = evaluate_entry(view, entry, per_class, batch_size=250, resamples=0)
            row.update(fid=skipped["fid"], prompt_accuracy=skipped["prompt_accuracy"], fid_increase=skipped["fid"] - full["fid"])
    return table
