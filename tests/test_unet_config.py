"""core.unet_config: a snap_student's UNet config is checked field by field and sized exactly as diffusers builds it,
before anything is built."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from fewstep.core.unet_config import UnetConfigError, check_unet_config
from fewstep.training.methods.snap_architecture import SlimArchitecture, slim_unet_config
from fewstep.training.tiny_models import build_tiny_unet, tiny_unet_config

from .test_lora import REAL_CONFIGS


def _diffusers_count(config) -> int:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return sum(p.numel() for p in unet.parameters())


def _full(config) -> dict:
    """The config as an exported file holds it: every field diffusers records."""
    with torch.device("meta"):
        return {k: v for k, v in UNet2DConditionModel(**config).config.items() if not k.startswith("_")}


def _slim_config():
    deep = build_tiny_unet("sd15", seed=1, layers_per_block=3)
    return slim_unet_config(deep.config, SlimArchitecture(((0, 2), (0, 1, 2)), ((0, 1, 2, 3), (0, 1, 3)),
                                                          (True, False), (False, False), mid=False))


@pytest.mark.parametrize("config", [
    tiny_unet_config("sd15"), tiny_unet_config("sdxl"), REAL_CONFIGS["sd15"], REAL_CONFIGS["sdxl"],
    {**tiny_unet_config("sd15"), "time_cond_proj_dim": 16, "transformer_layers_per_block": [[1], 0],
     "reverse_transformer_layers_per_block": [[0, 0], [2, 1]], "up_block_types": ["CrossAttnUpBlock2D"] * 2},
], ids=["tiny-sd15", "tiny-sdxl", "sd15", "sdxl", "per-layer-depths"])
def test_the_parameter_count_is_the_one_diffusers_builds(config):
    assert check_unet_config(config) == _diffusers_count(config)
    assert check_unet_config(_full(config)) == _diffusers_count(config)


def test_a_slim_snapfusion_config_is_counted_exactly():
    config = _slim_config()
    assert config["mid_block_type"] is None
    assert check_unet_config(config) == _diffusers_count(config)


@pytest.mark.parametrize("config, message", [
    ({"a": 1}, "unknown UNet config field 'a'"),
    ({}, "lacks down_block_types"),
    ([], "must be a JSON object"),
    ({**tiny_unet_config("sd15"), "block_out_channels": [10 ** 6, 10 ** 6]}, "'block_out_channels' is"),
    ({**tiny_unet_config("sd15"), "block_out_channels": [32]}, "has 2 entries for 1 levels"),
    ({**tiny_unet_config("sd15"), "layers_per_block": True}, "'layers_per_block' is True"),
    ({**tiny_unet_config("sd15"), "layers_per_block": 10 ** 6}, "'layers_per_block'"),
    ({**tiny_unet_config("sd15"), "down_block_types": ["SimpleDownBlock", "DownBlock2D"]}, "'down_block_types'"),
    ({**tiny_unet_config("sd15"), "class_embed_type": "timestep"}, "'class_embed_type'"),
    ({**tiny_unet_config("sd15"), "block_out_channels": [36, 64]}, "36 channels, which 8 norm groups"),
    ({**tiny_unet_config("sd15"), "addition_embed_type": "text_time"}, "needs addition_time_embed_dim"),
    ({**tiny_unet_config("sd15"), "num_attention_heads": 4}, "'num_attention_heads'"),
    ({**tiny_unet_config("sd15"), "norm_eps": float("nan")}, "'norm_eps'"),
])
def test_configs_fewstep_will_not_build_are_named_by_field(config, message):
    with pytest.raises(UnetConfigError, match=message) as info:
        check_unet_config(config)
    assert "\n" not in str(info.value)
