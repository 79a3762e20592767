import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Keep the rebuilt CLIP tokenizer out of the user's cache, and make any hub access fail loudly."""
    os.environ["FEWSTEP_CACHE"] = str(tmp_path_factory.mktemp("fewstep-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd15_unet():
    from fewstep.training.tiny_models import build_tiny_unet

    return build_tiny_unet("sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_unet():
    from fewstep.training.tiny_models import build_tiny_unet

    return build_tiny_unet("sdxl", seed=0)


@pytest.fixture
def text_context():
    """Random text-encoder states for the tiny SD1.5 UNet (batch 2, 77 tokens, width 32)."""
    return torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def proxy_data():
    """Every 20th proxy training image with its caption: a small real dataset for training tests."""
    from fewstep.training.data import CaptionedImages, load_proxy_dataset

    data = load_proxy_dataset("train")
    return CaptionedImages(data.images[::20], [data.captions[i] for i in range(0, len(data), 20)])
