"""core.lora: key layouts round-trip exactly, and a PEFT-trained LoRA written as kohya loads in diffusers unchanged."""
import copy

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from fewstep.core import lora as L
from fewstep.training.tiny_models import build_tiny_pipeline, build_tiny_unet

# Real SD1.5 / SDXL UNet configs (public model cards), built on the meta device: names only, no memory.
REAL_CONFIGS = {
    "sd15": dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"]


def real_unet(base):
    with init_empty_weights():
        return UNet2DConditionModel(**REAL_CONFIGS[base])


def _adaptable(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_kohya_names_invert_for_every_layer_of_real_unets(base):
    names = _adaptable(real_unet(base))
    assert len(names) > 250
    back = [L.kohya_name_to_module(L.module_to_kohya_name(n)[len(L.KOHYA_UNET_PREFIX):]) for n in names]
    assert [n for n, b in zip(names, back) if n != b] == []


def _train_peft_lora(unet, rank, alpha, steps=3):
    """A few real optimisation steps on a denoising-style loss, so lora_B is far from its zero init."""
    unet = copy.deepcopy(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        loss = (unet(x, torch.tensor([500, 900]), **_cond(unet, gen)).sample - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


def _cond(unet, gen):
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    cond = {"encoder_hidden_states": ctx}
    if unet.config.addition_embed_type == "text_time":
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2).float()}
    return cond


def _probe(unet):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([999, 250]), **_cond(unet, gen)).sample


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
@pytest.mark.parametrize("rank,alpha", [(4, 4), (4, 16), (8, 2)])
def test_peft_lora_as_kohya_loads_in_diffusers_with_same_output(base, rank, alpha, tmp_path):
    base_unet = build_tiny_unet(base, seed=0)
    trained = _train_peft_lora(base_unet, rank, alpha)
    expected = _probe(trained)
    peft_sd = get_peft_model_state_dict(trained)

    kohya = L.convert_lora(peft_sd, "kohya", alpha=alpha)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {float(alpha)}
    path = tmp_path / "lora.safetensors"
    save_file(kohya, str(path))

    pipe = build_tiny_pipeline(base, seed=0)
    pipe.unet = copy.deepcopy(base_unet)
    pipe.load_lora_weights(str(path))
    got = _probe(pipe.unet)
    assert (got - expected).abs().max() < 1e-4
    # The comparison can fail: without the LoRA, or with alpha taken as the rank, outputs differ.
    assert (_probe(base_unet) - expected).abs().max() > 1e-3
    if alpha != rank:
        wrong = {k: (torch.tensor(float(rank)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
        save_file(wrong, str(tmp_path / "wrong.safetensors"))
        pipe2 = build_tiny_pipeline(base, seed=0)
        pipe2.unet = copy.deepcopy(base_unet)
        pipe2.load_lora_weights(str(tmp_path / "wrong.safetensors"))
        assert (_probe(pipe2.unet) - expected).abs().max() > 1e-3


def test_kohya_back_to_peft_restores_the_model():
    base_unet = build_tiny_unet("sd15", seed=0)
    trained = _train_peft_lora(base_unet, rank=4, alpha=12)
    kohya = L.convert_lora(get_peft_model_state_dict(trained), "kohya", alpha=12)

    modules, ignored = L.read_lora(kohya)
    assert ignored == []
    fresh = copy.deepcopy(base_unet)
    fresh.add_adapter(LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS))
    result = set_peft_model_state_dict(fresh, L.write_lora(modules, "peft"))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    assert (_probe(fresh) - _probe(trained)).abs().max() < 1e-5


def test_every_layout_round_trips_without_missing_or_unexpected_keys():
    trained = _train_peft_lora(build_tiny_unet("sd15", seed=0), rank=4, alpha=6, steps=1)
    peft_sd = get_peft_model_state_dict(trained)
    modules, _ = L.read_lora(peft_sd, alpha=6)
    attention = {m: v for m, v in modules.items() if m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or m.endswith("to_out.0")}
    for layout, subset in [("kohya", modules), ("peft", modules), ("diffusers", modules), ("diffusers_old", attention)]:
        written = L.write_lora(subset, layout)
        assert L.detect_layout(written) == layout
        back, ignored = L.read_lora(written, alpha=L.alphas_of(subset))
        assert ignored == [] and set(back) == set(subset), layout
        for m in subset:
            assert torch.equal(back[m].down, subset[m].down) and torch.equal(back[m].up, subset[m].up)
            assert back[m].alpha == subset[m].alpha


def test_delta_is_up_times_down_scaled_by_alpha_over_rank():
    down, up = torch.randn(2, 5), torch.randn(3, 2)
    torch.testing.assert_close(L.LoraModule(down, up, alpha=8.0).delta(), up @ down * 4.0)
    conv = L.LoraModule(torch.randn(2, 5, 3, 3), torch.randn(7, 2, 1, 1), alpha=2.0)
    assert conv.delta().shape == (7, 5, 3, 3)


def test_text_encoder_keys_are_reported_not_dropped_silently():
    sd = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
          "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2),
          "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}
    modules, ignored = L.read_lora(sd)
    assert list(modules) == ["mid_block.attentions.0.proj_in"]
    assert ignored == ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]


def test_broken_lora_state_dicts_are_named():
    with pytest.raises(L.LoraKeyError, match="needs both down and up"):
        L.read_lora({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(L.LoraKeyError, match=r"expected \.lora_down\.weight"):
        L.read_lora({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 4)})
    with pytest.raises(L.LoraKeyError, match="no LoRA weights found"):
        L.read_lora({"conv_in.weight": torch.zeros(2)})


def test_peft_keys_with_adapter_name_from_a_module_state_dict():
    trained = _train_peft_lora(build_tiny_unet("sd15", seed=0), rank=4, alpha=4, steps=1)
    raw = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in raw)
    modules, _ = L.read_lora(raw, alpha=4)
    clean, _ = L.read_lora(get_peft_model_state_dict(trained), alpha=4)
    assert set(modules) == set(clean) and all(torch.equal(modules[m].up, clean[m].up) for m in clean)


def test_merged_lora_gives_the_peft_models_output():
    base_unet = build_tiny_unet("sd15", seed=0)
    trained = _train_peft_lora(base_unet, rank=4, alpha=12)
    modules, _ = L.read_lora(L.convert_lora(get_peft_model_state_dict(trained), "kohya", alpha=12))
    merged = copy.deepcopy(base_unet)
    L.merge_lora(merged, modules)
    assert (_probe(merged) - _probe(trained)).abs().max() < 1e-4
    half = copy.deepcopy(base_unet)
    L.merge_lora(half, modules, strength=0.5)
    assert (_probe(half) - _probe(trained)).abs().max() > 1e-3


def test_merging_a_lora_for_another_model_changes_nothing_and_says_why():
    modules, _ = L.read_lora(L.convert_lora(get_peft_model_state_dict(
        _train_peft_lora(build_tiny_unet("sdxl", seed=0), rank=4, alpha=4, steps=1)), "kohya", alpha=4))
    target = build_tiny_unet("sd15", seed=0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(L.LoraKeyError, match="no matching layer|another base model"):
        L.merge_lora(target, modules)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_diffusers_lora_down_up_spelling_reads_like_peft_keys():
    """Released LoRAs saved through diffusers' own conversion: ``unet.<path>.lora.down.weight``."""
    trained = _train_peft_lora(build_tiny_unet("sd15", seed=0), rank=4, alpha=4, steps=1)
    peft_sd = get_peft_model_state_dict(trained)
    spelled = {"unet." + k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
               for k, v in peft_sd.items()}
    assert L.detect_layout(spelled) == "diffusers"
    modules, ignored = L.read_lora(spelled)
    reference, _ = L.read_lora(peft_sd)
    assert ignored == [] and set(modules) == set(reference)
    assert all(torch.equal(modules[m].down, reference[m].down) and torch.equal(modules[m].up, reference[m].up) for m in reference)
