"""SnapFusion's efficient decoder, the architecture: the VAE decoder with its channels pruned (its training is
``methods/snap_decoder.py``; ``students`` builds it from a snap_student file).

The pruned decoder is diffusers' own ``Decoder`` with narrower ``block_out_channels`` (each level's width times
``keep``, rounded to whole GroupNorm groups) next to the original ``post_quant_conv``; its state-dict keys are
AutoencoderKL's (``decoder.…``, ``post_quant_conv.…``), so a host maps them as it maps a VAE's. It starts from the
original weights sliced to the first channels of every layer: one consistent channel subset per layer, so residual
additions still line up; the distillation then repairs what slicing broke.
"""

from __future__ import annotations

import torch


class PrunedDecoder(torch.nn.Module):
    """latents (already divided by the VAE's scaling factor) -> images in [-1, 1], as ``AutoencoderKL.decode``."""

    def __init__(self, config: dict):
        from diffusers.models.autoencoders.vae import Decoder

        super().__init__()
        self.config = dict(config)
        latent = config["in_channels"]
        self.post_quant_conv = torch.nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(**config)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))


def decoder_config(vae, keep: float = 1.0) -> dict:
    """The ``Decoder`` config of ``vae``'s decoder with every level's width times ``keep``, in whole GroupNorm groups."""
    c = vae.config
    groups = c.norm_num_groups
    widths = [max(groups, groups * round(w * keep / groups)) for w in c.block_out_channels]
    return {"in_channels": c.latent_channels, "out_channels": c.out_channels, "up_block_types": list(c.up_block_types),
            "block_out_channels": widths, "layers_per_block": c.layers_per_block, "norm_num_groups": groups,
            "act_fn": c.act_fn, "mid_block_add_attention": c.get("mid_block_add_attention", True)}


def prune_decoder(vae, keep: float) -> PrunedDecoder:
    """``vae``'s decoder at ``keep`` of its width, every tensor the original's first channels along each axis."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep is the share of decoder channels kept, in (0, 1]; got {keep}")
    if not getattr(vae.config, "use_post_quant_conv", True):
        raise ValueError("this VAE has no post_quant_conv; fewstep's pruned decoder expects SD's VAE layout")
    pruned = PrunedDecoder(decoder_config(vae, keep))
    source = vae.state_dict()
    state = {k: source[k][tuple(slice(0, n) for n in v.shape)].clone() for k, v in pruned.state_dict().items()}
    pruned.load_state_dict(state)
    return pruned.to(vae.device, vae.dtype)
