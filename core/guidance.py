"""Classifier-free guidance in its two conventions, and the guidance-scale embedding of w-conditioned students.

diffusers (and every UI's "CFG scale") writes uncond + s (cond - uncond); s = 1 means no guidance.
Imagen and Meng et al. write (1 + w) cond - w uncond; w = 0 means no guidance. So s = 1 + w.
fewstep's adapter files and the guided-distillation student use Meng's w.
"""

from __future__ import annotations

import torch


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, diffusers convention: uncond + scale (cond - uncond)."""
    return uncond + _bcast(scale, cond) * (cond - uncond)


def cfg_imagen(cond: torch.Tensor, uncond: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, Imagen / Meng et al. convention: (1 + w) cond - w uncond."""
    w = _bcast(w, cond)
    return (1 + w) * cond - w * uncond


def imagen_w_from_cfg_scale(scale: float) -> float:
    """Meng's w for a UI's CFG scale s: w = s - 1."""
    return scale - 1.0


def cfg_scale_from_imagen_w(w: float) -> float:
    """A UI's CFG scale for Meng's w: s = 1 + w."""
    return w + 1.0


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal features of w for a UNet's ``time_cond_proj_dim`` input, as diffusers' LCM pipelines compute them.

    Like the timestep embedding of Vaswani et al., applied to 1000 w. LCM passes w = CFG scale - 1, i.e. Meng's w.
    Returns shape (len(w), embedding_dim).
    """
    w = torch.as_tensor(w).reshape(-1) * 1000.0
    half_dim = embedding_dim // 2
    # float32 arithmetic throughout, as diffusers: 1000 w reaches ~1e4, where float64 rounding would differ.
    log_base = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=dtype) * -log_base)
    args = w.to(dtype)[:, None] * freqs.to(w.device)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def w_conditioning_offset(projection: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """What a guided student adds to its timestep features for guidance weight w: diffusers' ``cond_proj`` applied to
    ``guidance_scale_embedding(w)``. ``projection`` is that layer's weight (timestep width, embedding width);
    returns (len(w), timestep width). Hosts without a ``timestep_cond`` input add it to the features themselves."""
    features = guidance_scale_embedding(w, projection.shape[1])
    return features.to(projection.device, projection.dtype) @ projection.T


class TimeEmbedWithW(torch.nn.Sequential):
    """An LDM UNet's time MLP (ComfyUI, A1111) with a fixed offset on its input: a guided student's w projection for one
    w (diffusers adds ``cond_proj(features(w))`` to the timestep features there). The same child modules as the
    original, so weight patches addressed to ``time_embed.0`` / ``time_embed.2`` still reach them."""

    def __init__(self, time_embed: torch.nn.Sequential, offset: torch.Tensor):
        super().__init__(*time_embed)
        self.offset = offset

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return super().forward(t_emb + self.offset.to(t_emb))


def _bcast(value, like: torch.Tensor):
    if torch.is_tensor(value) and value.ndim == 1:
        return value.reshape(value.shape + (1,) * (like.ndim - 1))
    return value
