"""SpeedUpNet (SUN, Chai et al. 2023): a cross-attention adapter fed by the negative prompt.

Every cross-attention (attn2) layer gets a second attention branch over the *negative* prompt, with its own key and
value projections, and in the "add_pos" variant a third over the positive prompt. With A(Q, K, V) the layer's
multi-head attention and c_p, c_n the positive and negative text features (transcribed from the official inference
code, williechai/speedup-plugin-for-stable-diffusions):

    h_p = A(Q, W_k c_p, W_v c_p)                    the layer's own output (frozen)
    h_n = A(Q, W'_k c_n, W'_v c_n)                  negative branch
    h_x = A(Q, W''_k c_p, W''_v c_p)                extra positive branch (add_pos only)
    AN(h) = alpha * (||h_p|| / ||h||) h + beta      attention normalisation: rescaled to h_p's norm, per-channel affine
    out = W_out (h_p + a (AN_x(h_x) - s AN_n(h_n)))

so that one UNet pass gives the CFG-guided result with that negative prompt. ``s`` is the negative strength and ``a``
the adapter strength (1 and 1: as trained, and the official code's arithmetic); the official code stores a factor like
``s`` but never applies it. Norms are taken per sample (the official code
takes one norm over the whole batch, which makes a sample depend on its batch mates; identical at batch 1).

Hosts call ``SunLayer.forward`` with their own attention function, so diffusers, ComfyUI and A1111 run this one code.
Our files key each layer by the diffusers name of its cross-attention module
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_neg.weight``); the released files key it by the index
of the module among all attention processors (``1.to_k_neg.weight``), which ``from_released_layout`` translates.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from .parameterization import append_dims

NEGATIVE_PARAMS = ("to_k_neg.weight", "to_v_neg.weight", "to_k_neg_alpha", "to_k_neg_beta")
EXTRA_POSITIVE_PARAMS = ("to_k_extra_pos.weight", "to_v_extra_pos.weight", "to_k_extra_pos_alpha", "to_k_extra_pos_beta")
VARIANTS = ("plain", "add_pos")

# (q, k, v) -> attention output; all (batch, tokens, heads * head_dim), heads known to the host.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_RELEASED_KEY = re.compile(r"^(\d+)\.(.+)$")
_ATTENTION_NAME = re.compile(
    r"^(down_blocks|up_blocks|mid_block)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn1|attn2)$")
_SECTION_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}   # UNet2DConditionModel creates them in this order


class SunFileError(ValueError):
    """SUN weights that are incomplete, inconsistent or made for another UNet."""


def attention_normalise(h: torch.Tensor, reference: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """AN(h) = alpha * (||reference|| / ||h||) h + beta, the norms per sample over tokens and channels (in float32:
    a 4096 x 1280 activation's squared norm overflows float16)."""
    ratio = reference.float().flatten(1).norm(dim=1) / h.float().flatten(1).norm(dim=1).clamp_min(1e-12)
    return alpha * (h * append_dims(ratio.to(h.dtype), h.ndim)) + beta


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, on (batch, tokens, heads * head_dim) tensors: what an SD attention layer
    computes, for hosts whose own attention function cannot be called with other keys (A1111)."""
    batch, tokens, inner = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, inner // heads).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(batch, tokens, inner)


def match_batch(context: torch.Tensor, batch: int) -> torch.Tensor:
    """Text features for a batch of ``batch``: as they are, or one prompt (or a block of prompts) repeated."""
    if context.shape[0] == batch:
        return context
    if batch % context.shape[0]:
        raise ValueError(f"cannot spread {context.shape[0]} negative prompts over a batch of {batch}")
    return context.repeat(batch // context.shape[0], *([1] * (context.ndim - 1)))


class SunLayer(nn.Module):
    """One cross-attention layer's adapter; parameter names are the released files' (so their keys load as they are).
    alpha and beta act on the branch outputs, despite the ``to_k_`` in their names."""

    def __init__(self, context_dim: int, hidden_dim: int, add_pos: bool = False):
        super().__init__()
        self.add_pos = add_pos
        self.to_k_neg = nn.Linear(context_dim, hidden_dim, bias=False)
        self.to_v_neg = nn.Linear(context_dim, hidden_dim, bias=False)
        self.to_k_neg_alpha = nn.Parameter(torch.ones(hidden_dim))
        self.to_k_neg_beta = nn.Parameter(torch.zeros(hidden_dim))
        if add_pos:
            self.to_k_extra_pos = nn.Linear(context_dim, hidden_dim, bias=False)
            self.to_v_extra_pos = nn.Linear(context_dim, hidden_dim, bias=False)
            self.to_k_extra_pos_alpha = nn.Parameter(torch.ones(hidden_dim))
            self.to_k_extra_pos_beta = nn.Parameter(torch.zeros(hidden_dim))

    @torch.no_grad()
    def init_from_layer(self, to_k: torch.Tensor, to_v: torch.Tensor) -> "SunLayer":
        """Training start: branches that attend like the layer itself (its key/value weights) and contribute nothing
        (alpha = 0), so the adapted model starts as the base model; alpha gets the first gradients."""
        for name in ("neg", "extra_pos") if self.add_pos else ("neg",):
            getattr(self, f"to_k_{name}").weight.copy_(to_k)
            getattr(self, f"to_v_{name}").weight.copy_(to_v)
            getattr(self, f"to_k_{name}_alpha").zero_()
        return self

    def follow(self, x: torch.Tensor) -> "SunLayer":
        """On ``x``'s device and dtype (hosts move and cast the UNet after the adapter was loaded)."""
        weight = self.to_k_neg.weight
        return self if (weight.device, weight.dtype) == (x.device, x.dtype) else self.to(x.device, x.dtype)

    def forward(self, attend: Attend, query: torch.Tensor, h_pos: torch.Tensor, negative: torch.Tensor,
                positive: Optional[torch.Tensor] = None, negative_strength: float = 1.0, strength: float = 1.0) -> torch.Tensor:
        """The layer's attention output with the adapter (before its output projection).

        ``query`` is the layer's projected query, ``h_pos`` its own attention output, ``negative`` / ``positive`` the
        raw text features (``positive`` is needed by the add_pos variant only). ``strength`` scales all the adapter
        adds, ``negative_strength`` the negative branch alone."""
        batch = query.shape[0]
        negative = match_batch(negative, batch).to(query.dtype)
        h_neg = attend(query, self.to_k_neg(negative), self.to_v_neg(negative))
        offset = -negative_strength * attention_normalise(h_neg, h_pos, self.to_k_neg_alpha, self.to_k_neg_beta)
        if self.add_pos:
            if positive is None:
                raise ValueError("the add_pos SUN variant needs the positive text features too")
            positive = match_batch(positive, batch).to(query.dtype)
            h_extra = attend(query, self.to_k_extra_pos(positive), self.to_v_extra_pos(positive))
            offset = offset + attention_normalise(h_extra, h_pos, self.to_k_extra_pos_alpha, self.to_k_extra_pos_beta)
        return h_pos + strength * offset


class SunAdapter(nn.Module):
    """All layers of one adapter, keyed by the diffusers name of their cross-attention module."""

    def __init__(self, layers: Mapping[str, SunLayer]):
        super().__init__()
        self.names = list(layers)
        # nn.ModuleDict keys may not contain dots.
        self.layers = nn.ModuleDict({_module_key(n): layer for n, layer in layers.items()})

    @property
    def variant(self) -> str:
        return "add_pos" if next(iter(self.layers.values())).add_pos else "plain"

    def layer(self, name: str) -> SunLayer:
        return self.layers[_module_key(name)]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The file layout: ``<attn2 module name>.<parameter>``."""
        return {f"{name}.{param}": value for name in self.names for param, value in self.layer(name).state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "SunAdapter":
        """Rebuild from our layout (see ``from_released_layout`` for released files); errors name what is wrong."""
        grouped = group_layer_tensors(tensors)
        layers = {}
        for name, params in grouped.items():
            weight = params["to_k_neg.weight"]
            layer = SunLayer(weight.shape[1], weight.shape[0], add_pos="to_k_extra_pos.weight" in params)
            try:
                layer.load_state_dict(params)
            except RuntimeError as exc:
                raise SunFileError(f"SUN layer {name}: {str(exc).splitlines()[0]} (shapes disagree)") from None
            layers[name] = layer.to(weight.dtype)
        return cls(layers)


def _module_key(name: str) -> str:
    return name.replace(".", "__")


def group_layer_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{layer name: {parameter: tensor}}; every layer must hold the four negative-branch parameters, and either all
    layers or none the four extra-positive ones."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        param = next((p for p in NEGATIVE_PARAMS + EXTRA_POSITIVE_PARAMS if key.endswith("." + p)), None)
        if param is None:
            raise SunFileError(f"unexpected tensor {key!r} in a SUN adapter (expected <layer>.to_k_neg.weight and the like)")
        grouped.setdefault(key[: -len(param) - 1], {})[param] = value
    if not grouped:
        raise SunFileError("no SUN layers found")
    variants = set()
    for name, params in grouped.items():
        missing = [p for p in NEGATIVE_PARAMS if p not in params]
        extra = [p for p in EXTRA_POSITIVE_PARAMS if p in params]
        if missing or extra and len(extra) != len(EXTRA_POSITIVE_PARAMS):
            lacking = missing or [p for p in EXTRA_POSITIVE_PARAMS if p not in params]
            raise SunFileError(f"SUN layer {name} lacks {', '.join(lacking)}: the file is incomplete")
        variants.add(bool(extra))
        _check_layer_shapes(name, params)
    if len(variants) > 1:
        raise SunFileError("some SUN layers have the extra positive branch and some do not: the file is inconsistent")
    return grouped


def _check_layer_shapes(name: str, params: Mapping[str, torch.Tensor]) -> None:
    """Key/value projections (hidden, context), alpha and beta (hidden,), all floating point, before any is built."""
    weight = params["to_k_neg.weight"]
    if weight.ndim != 2 or min(weight.shape) < 1:
        raise SunFileError(f"SUN layer {name}: to_k_neg.weight has shape {list(weight.shape)}; expected (hidden, context)")
    expected = {p: tuple(weight.shape) if p.endswith(".weight") else (weight.shape[0],) for p in params}
    for param, value in params.items():
        if not value.dtype.is_floating_point:
            raise SunFileError(f"SUN layer {name}: {param} is a {value.dtype} tensor; expected floating point")
        if tuple(value.shape) != expected[param]:
            raise SunFileError(f"SUN layer {name}: {param} has shape {list(value.shape)}; expected {list(expected[param])}")


def is_released_layout(keys: Iterable[str]) -> bool:
    """Keys of the official release: ``<attention processor index>.<parameter>``."""
    return all(_RELEASED_KEY.match(k) for k in keys)


def attention_processor_order(names: Iterable[str]) -> list[str]:
    """Attention module names (``….attn1`` / ``….attn2``) in the order of diffusers' ``UNet2DConditionModel.attn_processors``
    (down blocks, up blocks, then the mid block), which the released files index."""
    def position(name: str):
        m = _ATTENTION_NAME.match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a diffusers UNet attention module name")
        section, block, attention, transformer, which = m.groups()
        return _SECTION_ORDER[section], int(block or 0), int(attention), int(transformer), which
    return sorted(names, key=position)


def from_released_layout(tensors: Mapping[str, torch.Tensor], attention_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Released keys (``1.to_k_neg.weight``) renamed to ours, given the model's attention module names (attn1 and attn2,
    any order). An index that is no cross-attention layer of this model means the file was made for another UNet."""
    order = attention_processor_order(attention_names)
    out = {}
    for key, value in tensors.items():
        m = _RELEASED_KEY.match(key)
        if m is None:
            raise SunFileError(f"{key!r} is not a released-layout SUN key (<index>.<parameter>)")
        index = int(m.group(1))
        if index >= len(order) or not order[index].endswith("attn2"):
            raise SunFileError(f"SUN layer index {index} is no cross-attention layer of this UNet ({len(order)} attention "
                               "layers): the adapter was made for a different model")
        out[f"{order[index]}.{m.group(2)}"] = value
    return out


def sun_adapter_for_model(tensors: Mapping[str, torch.Tensor], attention_names: Mapping[str, str],
                          key_shapes: Mapping[str, Iterable[int]]) -> SunAdapter:
    """A SUN file's layers (released or our layout) checked against a host's model.

    ``attention_names``: {diffusers name of every attention module (attn1 and attn2): the host's name for it};
    ``key_shapes``: {the host's name of a cross-attention module: the shape of its key projection}."""
    tensors = from_released_layout(tensors, attention_names) if is_released_layout(tensors) else tensors
    sun = SunAdapter.from_tensors(tensors)
    for name in sun.names:
        shape = key_shapes.get(attention_names.get(name, ""))
        if shape is None or tuple(shape) != tuple(sun.layer(name).to_k_neg.weight.shape):
            raise SunFileError(f"SUN layer {name} does not fit this model: the adapter was made for a different model")
    cross = [n for n in attention_names if n.endswith("attn2") and attention_names[n] in key_shapes]
    uncovered = [n for n in cross if n not in sun.names]
    if uncovered:
        raise SunFileError(f"the SUN adapter covers {len(cross) - len(uncovered)} of this model's {len(cross)} cross-attention "
                           f"layers (none for {uncovered[0]}): the file is incomplete")
    return sun

