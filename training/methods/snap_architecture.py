"""SnapFusion's slim UNet: which of the teacher's blocks it keeps, as a standard diffusers ``UNet2DConditionModel`` config.

A diffusers config (and ComfyUI's UNet, which loads the same models) cannot express every subset of blocks. What it
can: per level, how many down layers (a layer is a ResNet and, in a cross-attention level, its transformer), with one
more up layer in the mirrored up level; whether a level's down or up layers have cross-attention at all; whether there
is a mid block. The removal units below are exactly those changes, so every plan is a config:

* one layer of a level: a down layer other than the first (the first reads the previous level's width) together with
  an up layer other than the first and last of the mirrored level (they read the level below and the skip from the
  level above), so every kept layer keeps its teacher's weight shapes;
* the cross-attention of a level's down layers, or of its up layers;
* the mid block (ResNets and cross-attention; diffusers has no attention-free two-ResNet mid block).

Each unit is valued by adding its blocks' one-at-a-time measurements (``snapfusion.block_table``): the FID increase plus
``accuracy_weight`` FID per point of prompt accuracy lost (ours: FID alone let the proxy drop the mid block, the one that
reads the prompt at the lowest resolution, for a small FID cost and a prompt accuracy of 0.12). The cheapest cost per
latency saved goes first, as SnapFusion's architecture evolution does between re-evaluations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

CROSS_ATTENTION = {"down": "CrossAttnDownBlock2D", "up": "CrossAttnUpBlock2D"}
PLAIN = {"down": "DownBlock2D", "up": "UpBlock2D"}


@dataclass(frozen=True)
class SlimArchitecture:
    """The teacher's layers a slim UNet keeps. ``down_layers[i]``: indices of down_blocks.i's layers kept;
    ``up_layers[j]``: of up_blocks.j's (up_blocks.j mirrors down level L-1-j and has one layer more)."""

    down_layers: tuple[tuple[int, ...], ...]
    up_layers: tuple[tuple[int, ...], ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    mid: bool = True

    @classmethod
    def of_teacher(cls, config) -> "SlimArchitecture":
        levels = len(config["down_block_types"])
        layers = _per_level(config["layers_per_block"], levels)
        return cls(down_layers=tuple(tuple(range(n)) for n in layers),
                   up_layers=tuple(tuple(range(n + 1)) for n in reversed(layers)),
                   down_attention=tuple(t == CROSS_ATTENTION["down"] for t in config["down_block_types"]),
                   up_attention=tuple(t == CROSS_ATTENTION["up"] for t in config["up_block_types"]),
                   mid=config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None)

    @classmethod
    def from_dict(cls, d: dict) -> "SlimArchitecture":
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(d) != fields:
            raise ValueError(f"a slim architecture has the fields {', '.join(sorted(fields))}; got {', '.join(sorted(d))}")
        return cls(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                      for k, v in d.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, teacher_config) -> None:
        """Raise ValueError unless this is a subset of ``teacher_config``'s blocks that diffusers can build."""
        full = SlimArchitecture.of_teacher(teacher_config)
        levels = len(full.down_layers)
        problems = []
        if not (len(self.down_layers) == len(self.up_layers) == len(self.down_attention) == len(self.up_attention) == levels):
            raise ValueError(f"the architecture must describe the teacher's {levels} levels")
        for i in range(levels):
            j = levels - 1 - i
            down, up = self.down_layers[i], self.up_layers[j]
            if not down or list(down) != sorted(set(down)) or not set(down) <= set(full.down_layers[i]) or down[0] != 0:
                problems.append(f"down level {i}: keep the first layer and distinct teacher layers in order; got {down}")
            if len(up) != len(down) + 1 or list(up) != sorted(set(up)) or not set(up) <= set(full.up_layers[j]) \
                    or up[0] != 0 or up[-1] != full.up_layers[j][-1]:
                problems.append(f"up block {j}: keep its first and last layer and one more layer than down level {i}; got {up}")
            if self.down_attention[i] and not full.down_attention[i] or self.up_attention[j] and not full.up_attention[j]:
                problems.append(f"level {i}: the teacher has no cross-attention to keep there")
        if self.mid and not full.mid:
            problems.append("the teacher has no mid block")
        if problems:
            raise ValueError("not a slim architecture of this teacher: " + "; ".join(problems))

    def blocks(self, teacher_config) -> set[str]:
        """The teacher's block names (``snapfusion.unet_blocks``) this architecture keeps."""
        names = set()
        for prefix, layers, attention in (("down_blocks", self.down_layers, self.down_attention),
                                          ("up_blocks", self.up_layers, self.up_attention)):
            for level, kept in enumerate(layers):
                names |= {f"{prefix}.{level}.resnets.{k}" for k in kept}
                names |= {f"{prefix}.{level}.attentions.{k}" for k in kept} if attention[level] else set()
        if self.mid and SlimArchitecture.of_teacher(teacher_config).mid:
            names |= {"mid_block.resnets.0", "mid_block.resnets.1", "mid_block.attentions.0"}
        return names

    def removal_units(self) -> Iterator[tuple[str, "SlimArchitecture"]]:
        """Every single step further from the teacher: (description, the smaller architecture), layer choices left open
        as one candidate per choice."""
        levels = len(self.down_layers)
        for i, down in enumerate(self.down_layers):
            j = levels - 1 - i
            for d in down[1:]:
                for u in self.up_layers[j][1:-1]:
                    yield (f"layer {d} of down level {i} and layer {u} of up block {j}",
                           self._with(down_layers=_set(self.down_layers, i, tuple(x for x in down if x != d)),
                                      up_layers=_set(self.up_layers, j, tuple(x for x in self.up_layers[j] if x != u))))
            if self.down_attention[i]:
                yield f"cross-attention of down level {i}", self._with(down_attention=_set(self.down_attention, i, False))
        for j, attention in enumerate(self.up_attention):
            if attention:
                yield f"cross-attention of up block {j}", self._with(up_attention=_set(self.up_attention, j, False))
        if self.mid:
            yield "the mid block", self._with(mid=False)

    def _with(self, **changes) -> "SlimArchitecture":
        return dataclasses.replace(self, **changes)


def _per_level(value, levels: int) -> list:
    return [value] * levels if isinstance(value, int) else list(value)


def _set(values: tuple, index: int, value) -> tuple:
    return values[:index] + (value,) + values[index + 1:]


def slim_unet_config(teacher_config, arch: SlimArchitecture) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of ``arch``: the teacher's, with per-level layer counts, block types
    and transformer depths of the kept layers, and no mid block if it went."""
    arch.check(teacher_config)
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    levels = len(arch.down_layers)
    config["layers_per_block"] = [len(d) for d in arch.down_layers]
    config["down_block_types"] = [(CROSS_ATTENTION if a else PLAIN)["down"] for a in arch.down_attention]
    config["up_block_types"] = [(CROSS_ATTENTION if a else PLAIN)["up"] for a in arch.up_attention]
    config["mid_block_type"] = teacher_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") if arch.mid else None
    depth = teacher_config.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int) and any(isinstance(d, (list, tuple)) for d in depth):
        # per-layer depths (SSD-1B style): the kept layers' own
        reverse = teacher_config["reverse_transformer_layers_per_block"]
        config["transformer_layers_per_block"] = [[depth[i][k] for k in kept] for i, kept in enumerate(arch.down_layers)]
        config["reverse_transformer_layers_per_block"] = [[reverse[j][k] for k in kept] for j, kept in enumerate(arch.up_layers)]
    elif not isinstance(depth, int):
        config["transformer_layers_per_block"] = list(depth)[:levels]
    return config


def _teacher_key(key: str, arch: SlimArchitecture) -> str:
    """The teacher's state-dict key a slim UNet's ``key`` is initialised from (kept layers renumbered in order)."""
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "attentions"):
        kept = (arch.down_layers if parts[0] == "down_blocks" else arch.up_layers)[int(parts[1])]
        parts[3] = str(kept[int(parts[3])])
    return ".".join(parts)


def build_slim_unet(teacher_unet, arch: SlimArchitecture):
    """The slim UNet with every weight copied from the teacher's kept blocks (same dtype and device)."""
    from diffusers import UNet2DConditionModel

    slim = UNet2DConditionModel.from_config(slim_unet_config(teacher_unet.config, arch))
    teacher_state = teacher_unet.state_dict()
    state = {}
    for key, value in slim.state_dict().items():
        source = teacher_state.get(_teacher_key(key, arch))
        if source is None or source.shape != value.shape:
            raise ValueError(f"the slim UNet's {key} has no teacher weight of shape {tuple(value.shape)} "
                             f"(looked for {_teacher_key(key, arch)}): the architecture does not fit this teacher")
        state[key] = source
    slim.load_state_dict(state)
    return slim.to(teacher_unet.device, teacher_unet.dtype).eval()


def propose_architecture(table: dict, budget: float, teacher_config, accuracy_weight: float = 1.0) -> dict:
    """A slim architecture for a pass of at most ``budget`` times the full UNet's latency, from the block table:
    repeatedly the removal unit with the least cost (FID increase + ``accuracy_weight`` x prompt-accuracy points lost)
    per unit of latency saved (harmless ones first), until the estimate meets the budget or no unit saves time."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"the latency budget is a fraction of the teacher's pass, in (0, 1]; got {budget}")
    if "quality" not in table:
        raise ValueError("proposing an architecture needs each block's quality drop: measure with quality on")
    rows = {r["block"]: r for r in table["blocks"]}
    full_accuracy = table["quality"]["prompt_accuracy"]
    cost = {b: r["fid_increase"] + accuracy_weight * 100 * (full_accuracy - r["prompt_accuracy"]) for b, r in rows.items()}
    arch = SlimArchitecture.of_teacher(teacher_config)
    steps = []

    def estimate(a: SlimArchitecture) -> tuple[float, float]:
        gone = set(rows) - a.blocks(teacher_config)
        return 1.0 - sum(rows[b]["latency_saved"] for b in gone), sum(cost[b] for b in gone)

    latency, total_cost = estimate(arch)
    while latency > budget:
        best = None
        for description, smaller in arch.removal_units():
            new_latency, new_cost = estimate(smaller)
            saved = latency - new_latency
            if saved > 0 and (best is None or (new_cost - total_cost) / saved < best[0]):
                best = ((new_cost - total_cost) / saved, description, smaller, new_latency, new_cost)
        if best is None:
            break
        _, description, arch, latency, total_cost = best
        steps.append(description)
    gone = set(rows) - arch.blocks(teacher_config)
    return {"budget": budget, "accuracy_weight": accuracy_weight, "architecture": arch.to_dict(), "steps": steps,
            "remove": sorted(gone), "estimated_latency": latency, "estimated_cost": total_cost,
            "estimated_fid_increase": sum(rows[b]["fid_increase"] for b in gone), "met": latency <= budget}
