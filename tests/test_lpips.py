"""LPIPS from user-supplied weights: torchvision's and the lpips package's key names load; it behaves as a distance."""
import pytest
import torch
from safetensors.torch import save_file

from fewstep.training.lpips import LPIPS, TAP_CHANNELS, vgg16_features

# torchvision.models.vgg16().features parameter names up to relu5_3 (conv layers at these indices).
TORCHVISION_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _weights(tmp_path, with_heads=True):
    gen = torch.Generator().manual_seed(0)
    vgg = {f"features.{k}": torch.randn(v.shape, generator=gen) * 0.05 for k, v in vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)   # a full torchvision checkpoint has more; it is ignored
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(TAP_CHANNELS)}
    torch.save(heads if with_heads else {}, tmp_path / "vgg.pth")
    return [tmp_path / "vgg16.safetensors", tmp_path / "vgg.pth"]


def test_vgg_layers_carry_torchvision_names():
    names = set(vgg16_features().state_dict())
    assert names == {f"{i}.{p}" for i in TORCHVISION_CONVS for p in ("weight", "bias")}


def test_loaded_lpips_is_a_distance(tmp_path):
    lpips = LPIPS.from_files(_weights(tmp_path))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1, torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    same, d_xy, d_yx = lpips(x, x), lpips(x, y), lpips(y, x)
    assert same.shape == (3,) and same.abs().max() < 1e-6
    assert (d_xy > 0).all() and torch.allclose(d_xy, d_yx)
    assert (lpips(x, x + 0.05 * (y - x)) < d_xy).all()   # a small step away is closer than the whole way
    x.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad.abs().sum() > 0


def test_incomplete_or_missing_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="missing .*lins"):
        LPIPS.from_files(_weights(tmp_path, with_heads=False))
    with pytest.raises(ValueError, match="do not exist"):
        LPIPS.from_files([tmp_path / "nope.pth"])


def test_flash_distils_with_lpips(tmp_path):
    from fewstep.training.data import CaptionedImages, load_proxy_dataset
    from fewstep.training.methods import flash as F
    from fewstep.training.tiny_models import build_tiny_pipeline

    build_tiny_pipeline("sd15").save_pretrained(tmp_path / "teacher")
    data = load_proxy_dataset("train")
    config = F.load_config("proxy", lora_rank=2, teacher_steps=8, phase_steps=(1, 1, 1, 1), batch_size=2, distill_loss="lpips",
                           lpips_weights=[str(p) for p in _weights(tmp_path)])
    out = F.train_flash(tmp_path / "teacher", CaptionedImages(data.images[:16], data.captions[:16]), tmp_path / "run",
                        tmp_path / "o.safetensors", config, sample_every=0, progress=False)
    assert out.is_file()
