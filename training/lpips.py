"""LPIPS (Zhang et al. 2018, VGG16 variant), the distance Flash Diffusion's paper setup distils with.

Nothing is downloaded: the user supplies the weights as local files, torchvision's VGG16 checkpoint
(``features.N.weight`` keys, e.g. ``vgg16-397923af.pth``) and the LPIPS linear heads (``lin0.model.1.weight`` ...,
``vgg.pth`` of the ``lpips`` package), or one file holding both. The VGG16 feature stack is built here with
torchvision's layer indices, so its keys load unchanged and torchvision is never imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

# torchvision's vgg16().features up to relu5_3; "M" is a 2x2 max-pool.
VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAP_LAYERS = (3, 8, 15, 22, 29)            # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' input normalisation (its ScalingLayer), for images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    channels = 3
    for spec in VGG16_FEATURES:
        if spec == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(channels, spec, 3, padding=1), torch.nn.ReLU()]
            channels = spec
    return torch.nn.Sequential(*layers[: TAP_LAYERS[-1] + 1])


class LPIPS(torch.nn.Module):
    """``lpips(x, y)`` -> per-sample distance for images in [-1, 1]; frozen."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, paths: Sequence[str | Path]) -> "LPIPS":
        """Load VGG16 features and LPIPS heads from local .safetensors / .pth files (never unpickled freely)."""
        state: dict[str, torch.Tensor] = {}
        for path in paths:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"LPIPS weights {path} do not exist; pass torchvision's VGG16 checkpoint and the lpips package's vgg.pth")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        model = cls()
        wanted = {k: v for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) <= TAP_LAYERS[-1]}
        for i in range(len(TAP_CHANNELS)):
            key = f"lin{i}.model.1.weight"
            if key in state:
                wanted[f"lins.{i}.weight"] = state[key]
        missing = sorted(set(model.state_dict()) - set(wanted) - {"shift", "scale"})
        if missing:
            raise ValueError(f"LPIPS weights incomplete: missing {missing[:4]} (need torchvision VGG16 'features.*' and lpips 'lin*.model.1.weight')")
        model.load_state_dict(wanted, strict=False)
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = (torch.cat([x, y]) - self.shift) / self.scale
        distance = 0.0
        taps = iter(zip(TAP_LAYERS, self.lins))
        tap, lin = next(taps)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == tap:
                a, b = h.chunk(2)
                diff = (_unit(a) - _unit(b)).pow(2)
                distance = distance + lin(diff).mean(dim=(2, 3)).squeeze(1)
                tap, lin = next(taps, (None, None))
        return distance


def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each spatial position's feature vector scaled to unit length, as LPIPS' normalize_tensor."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
