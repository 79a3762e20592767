"""core.guidance: both CFG conventions agree under s = 1 + w; the w-embedding equals diffusers' LCM pipeline's."""
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from fewstep.core import guidance as G


def test_conventions_agree_under_conversion():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    for scale in [1.0, 4.5, 7.5, 13.0]:
        w = G.imagen_w_from_cfg_scale(scale)
        torch.testing.assert_close(G.cfg(cond, uncond, scale), G.cfg_imagen(cond, uncond, w))
        assert G.cfg_scale_from_imagen_w(w) == scale
    torch.testing.assert_close(G.cfg(cond, uncond, 1.0), cond)  # diffusers: 1 = no guidance
    torch.testing.assert_close(G.cfg_imagen(cond, uncond, 0.0), cond)  # Meng: 0 = no guidance


def test_per_sample_guidance_broadcasts():
    cond, uncond = torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    out = G.cfg_imagen(cond, uncond, torch.tensor([0.0, 2.0]))
    assert out[0].unique().tolist() == [1.0] and out[1].unique().tolist() == [3.0]


@pytest.mark.parametrize("dim", [256, 512, 7])
def test_embedding_matches_diffusers(dim):
    w = torch.tensor([0.0, 1.5, 7.0, 14.0])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(G.guidance_scale_embedding(w, dim), expected)
