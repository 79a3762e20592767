"""Images as the training code passes them: uint8 (N, H, W, 3) arrays and VAE-range float tensors, preview grids, and
the one batch format the metrics score (``unit_nchw``): uint8 RGB ``(N, H, W, 3)`` (arrays or tensors, what
``training.data`` yields) or float tensors ``(N, 3, H, W)`` in [0, 1] (what diffusers' image processor returns with
``output_type="pt"``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return pixels.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, columns: int) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


# A float image outside [0, 1] by more than this is in another convention (most likely [-1, 1]), not overshoot.
FLOAT_RANGE_SLACK = 0.1


def default_device() -> torch.device:
    """Where the metrics score images unless told: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unit_nchw(images, device: torch.device) -> torch.Tensor:
    """One batch as float32 (N, 3, H, W) in [0, 1] on ``device``; see the module docstring for what is accepted."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3) RGB; got shape {tuple(x.shape)}")
        # Move the uint8 batch first: a quarter of the bytes of its float version.
        return x.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if x.is_floating_point():
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) RGB in [0, 1]; got shape {tuple(x.shape)}")
        low, high = float(x.min()), float(x.max())
        if low < -FLOAT_RANGE_SLACK or high > 1.0 + FLOAT_RANGE_SLACK:
            raise ValueError(f"float images must be in [0, 1]; found values in [{low:.3f}, {high:.3f}] "
                             "(for [-1, 1] images pass (x + 1) / 2)")
        return x.to(device, torch.float32).clamp(0.0, 1.0)
    raise TypeError(f"images must be uint8 (N, H, W, 3) or float (N, 3, H, W); got dtype {x.dtype}")
