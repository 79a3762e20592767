"""SnapFusion's slim UNet as a diffusers config: checked against the teacher with the same blocks skipped
(``BlockSkipping``, itself checked against zeroed blocks) and against diffusers' own loader."""

from __future__ import annotations

import copy

import pytest
import torch

from fewstep.training.methods.snap_architecture import SlimArchitecture, build_slim_unet, propose_architecture, slim_unet_config
from fewstep.training.methods.snap_blocks import BlockSkipping, unet_blocks
from fewstep.training.tiny_models import build_tiny_unet


def _inputs(unet, n=2):
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    inputs = {"sample": torch.randn(n, unet.config.in_channels, size, size, generator=g), "timestep": torch.tensor([500] * n),
              "encoder_hidden_states": torch.randn(n, 7, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(n, 32, generator=g), "time_ids": torch.randn(n, 6, generator=g)}
    return inputs


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def unet(request):
    return build_tiny_unet(request.param, seed=0)


@pytest.fixture(scope="module")
def deep_unet():
    """Three layers per level, so that a layer can go."""
    return build_tiny_unet("sd15", seed=1, layers_per_block=3)


def test_the_teachers_own_architecture_rebuilds_the_teacher(unet):
    slim = build_slim_unet(unet, SlimArchitecture.of_teacher(unet.config))
    assert slim.state_dict().keys() == unet.state_dict().keys()
    inputs = _inputs(unet)
    torch.testing.assert_close(_out(slim, inputs), _out(unet, inputs), rtol=0, atol=0)


def test_without_a_levels_attention_or_the_mid_block_it_is_the_teacher_with_those_blocks_skipped(unet):
    full = SlimArchitecture.of_teacher(unet.config)
    level = full.down_attention.index(True)
    up = full.up_attention.index(True)
    arch = SlimArchitecture(full.down_layers, full.up_layers, tuple(a and i != level for i, a in enumerate(full.down_attention)),
                            tuple(a and j != up for j, a in enumerate(full.up_attention)), mid=False)
    slim = build_slim_unet(unet, arch)
    assert slim.config.mid_block_type is None and slim.mid_block is None
    assert slim.config.down_block_types[level] == "DownBlock2D" and slim.config.up_block_types[up] == "UpBlock2D"
    skipped = {b.name for b in unet_blocks(unet)} - arch.blocks(unet.config)
    assert skipped >= {"mid_block.attentions.0", f"down_blocks.{level}.attentions.0", f"up_blocks.{up}.attentions.0"}
    reference = copy.deepcopy(unet)
    skipping = BlockSkipping(reference)
    inputs = _inputs(unet)
    with skipping.skip(skipped):
        expected = _out(reference, inputs)
    torch.testing.assert_close(_out(slim, inputs), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, _out(unet, inputs), atol=1e-3)


def test_a_removed_layer_renumbers_the_kept_ones_and_the_config_loads_in_diffusers_with_no_missing_key(deep_unet, tmp_path):
    from diffusers import UNet2DConditionModel

    full = SlimArchitecture.of_teacher(deep_unet.config)
    assert full.down_layers == ((0, 1, 2), (0, 1, 2)) and full.up_layers == ((0, 1, 2, 3), (0, 1, 2, 3))
    arch = SlimArchitecture(((0, 2), (0, 1, 2)), ((0, 1, 2, 3), (0, 1, 3)), full.down_attention, full.up_attention)
    slim = build_slim_unet(deep_unet, arch)
    assert slim.config.layers_per_block == [2, 3]
    for slim_name, teacher_name in (("down_blocks.0.resnets.1", "down_blocks.0.resnets.2"),
                                    ("down_blocks.0.attentions.1", "down_blocks.0.attentions.2"),
                                    ("up_blocks.1.resnets.2", "up_blocks.1.resnets.3"),
                                    ("up_blocks.1.attentions.2", "up_blocks.1.attentions.3")):
        ours = dict(slim.named_modules())[slim_name].state_dict()
        theirs = dict(deep_unet.named_modules())[teacher_name].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    slim.save_pretrained(tmp_path / "slim")
    loaded, info = UNet2DConditionModel.from_pretrained(tmp_path / "slim", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = _inputs(deep_unet)
    torch.testing.assert_close(_out(loaded, inputs), _out(slim, inputs))
    assert _out(slim, inputs).shape == inputs["sample"].shape
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in deep_unet.parameters())


def test_an_architecture_the_config_cannot_express_is_refused(deep_unet, tiny_sdxl_unet):
    full = SlimArchitecture.of_teacher(deep_unet.config)
    for bad, match in (
        (SlimArchitecture(((1, 2), (0, 1, 2)), ((0, 1, 2, 3), (0, 1, 3)), full.down_attention, full.up_attention), "first layer"),
        (SlimArchitecture(((0, 2), (0, 1, 2)), full.up_layers, full.down_attention, full.up_attention), "one more layer"),
        (SlimArchitecture(((0, 2), (0, 1, 2)), ((0, 1, 2, 3), (0, 1, 2)), full.down_attention, full.up_attention), "last layer"),
        (SlimArchitecture(full.down_layers, full.up_layers, (True, True), full.up_attention), "no cross-attention"),
    ):
        with pytest.raises(ValueError, match=match):
            slim_unet_config(deep_unet.config, bad)
    with pytest.raises(ValueError, match="levels"):
        slim_unet_config(deep_unet.config, SlimArchitecture(((0,),), ((0, 1),), (True,), (True,)))
    with pytest.raises(ValueError, match="fields"):
        SlimArchitecture.from_dict({"down_layers": [[0]]})
    assert SlimArchitecture.from_dict(full.to_dict()) == full


def _table(unet, **rows):
    """A block table for ``unet``: every block saves 0.05 of the pass at no cost unless given (saved, FID, accuracy)."""
    blocks = []
    for b in unet_blocks(unet):
        saved, fid, accuracy = rows.get(b.name, (0.05, 5.0, 1.0))
        blocks.append({"block": b.name, "kind": b.kind, "latency_saved": saved, "fid_increase": fid, "prompt_accuracy": accuracy})
    return {"quality": {"fid": 10.0, "prompt_accuracy": 1.0}, "blocks": blocks}


def test_the_proposal_takes_the_cheapest_expressible_units_until_the_budget_is_met(deep_unet):
    config = deep_unet.config
    # The mid block is cheapest by FID but loses the prompt; the up cross-attention of block 1 saves the most.
    table = _table(deep_unet, **{"mid_block.attentions.0": (0.15, 0.0, 0.2), "mid_block.resnets.0": (0.02, 0.0, 1.0),
                                 "mid_block.resnets.1": (0.02, 0.0, 1.0),
                                 **{f"up_blocks.1.attentions.{k}": (0.06, 1.0, 1.0) for k in range(4)}})
    plan = propose_architecture(table, 0.8, config)
    assert plan["steps"] == ["cross-attention of up block 1"] and plan["met"]
    assert plan["estimated_latency"] == pytest.approx(0.76)
    assert plan["remove"] == [f"up_blocks.1.attentions.{k}" for k in range(4)]
    by_fid_alone = propose_architecture(table, 0.8, config, accuracy_weight=0.0)
    assert by_fid_alone["steps"][0] == "the mid block"
    arch = SlimArchitecture.from_dict(plan["architecture"])
    assert build_slim_unet(deep_unet, arch).config.up_block_types == ["UpBlock2D", "UpBlock2D"]
    everything = propose_architecture(table, 0.01, config)
    assert not everything["met"] and "the mid block" in everything["steps"]
    slim = SlimArchitecture.from_dict(everything["architecture"])
    assert slim.down_layers == ((0,), (0,)) and not any(slim.down_attention + slim.up_attention) and not slim.mid
    assert propose_architecture(table, 1.0, config)["steps"] == []
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        propose_architecture(table, 0.0, config)
    with pytest.raises(ValueError, match="quality"):
        propose_architecture({"blocks": table["blocks"]}, 0.5, config)
