"""SUN: the adapter math against the official formulas, both file layouts, the diffusers binding, training, export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from fewstep.core.adapter_file import AdapterFileError, read_adapter
from fewstep.core.guidance import cfg
from fewstep.core.sun import (SunAdapter, SunFileError, SunLayer, attention_processor_order, from_released_layout,
                              group_layer_tensors)
from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.cli import main
from fewstep.training.loop import _param_groups
from fewstep.training.methods import sun as S
from fewstep.training.teacher_data import load_teacher_data
from fewstep.training.pipelines import load_teacher
from fewstep.training.students import SunStudent, load_student
from fewstep.training.sun_attention import (attach_sun, cross_attention_modules, new_sun_adapter,
                                            sun_adapter_from_tensors)
from fewstep.training.tiny_models import build_tiny_pipeline, build_tiny_unet

TINY = dict(steps=4, batch_size=4, msc_batch_size=2, msc_teacher_steps=8, lr=1e-3, ema_decay=None)
HEADS = 2


def _attention(q, k, v, heads=HEADS):
    """Multi-head softmax attention written out (the reference for the hosts' fused kernels)."""
    b, n, c = q.shape
    split = lambda t: t.reshape(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, n, c)


def _official(layer: SunLayer, query, key, value, negative, positive):
    """The official SUNAttnProcessor's arithmetic, transcribed: one norm over the whole tensor (batch 1 here)."""
    h = _attention(query, key, value)
    h_neg = _attention(query, layer.to_k_neg(negative), layer.to_v_neg(negative))
    h_neg = torch.norm(h, p=2) * (h_neg / torch.norm(h_neg, p=2))
    out = h - (layer.to_k_neg_alpha * h_neg + layer.to_k_neg_beta)
    if layer.add_pos:
        h_pos = _attention(query, layer.to_k_extra_pos(positive), layer.to_v_extra_pos(positive))
        h_pos = torch.norm(h, p=2) * (h_pos / torch.norm(h_pos, p=2))
        out = out + layer.to_k_extra_pos_alpha * h_pos + layer.to_k_extra_pos_beta
    return out


def _randomised(layer: SunLayer, seed=0) -> SunLayer:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 2 else 1.0))
    return layer


@pytest.mark.parametrize("add_pos", [False, True])
def test_layer_matches_the_official_formula(add_pos):
    gen = torch.Generator().manual_seed(1)
    layer = _randomised(SunLayer(16, 8, add_pos))
    query, key, value = (torch.randn(1, 12, 8, generator=gen) for _ in range(3))
    negative, positive = torch.randn(1, 5, 16, generator=gen), torch.randn(1, 7, 16, generator=gen)
    with torch.no_grad():
        ours = layer(_attention, query, _attention(query, key, value), negative, positive)
        torch.testing.assert_close(ours, _official(layer, query, key, value, negative, positive))
        # Negative strength 0 removes the negative branch, and it scales linearly.
        h = _attention(query, key, value)
        no_negative = layer(_attention, query, h, negative, positive, negative_strength=0.0)
        twice = layer(_attention, query, h, negative, positive, negative_strength=2.0)
        torch.testing.assert_close(twice - ours, ours - no_negative)


def test_norms_are_per_sample_so_a_sample_does_not_depend_on_its_batch():
    gen = torch.Generator().manual_seed(2)
    layer = _randomised(SunLayer(16, 8, add_pos=True))
    query, key, value = (torch.randn(3, 12, 8, generator=gen) for _ in range(3))
    query[1:] *= 10    # very different batch mates
    negative = torch.randn(1, 5, 16, generator=gen)     # one negative prompt for the batch
    positive = torch.randn(3, 7, 16, generator=gen)
    with torch.no_grad():
        batch = layer(_attention, query, _attention(query, key, value), negative, positive)
        alone = layer(_attention, query[:1], _attention(query[:1], key[:1], value[:1]), negative, positive[:1])
    torch.testing.assert_close(batch[:1], alone)


def test_initialised_layer_leaves_the_attention_unchanged():
    gen = torch.Generator().manual_seed(3)
    to_k, to_v = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    layer = SunLayer(16, 8, add_pos=True).init_from_layer(to_k, to_v)
    query = torch.randn(2, 12, 8, generator=gen)
    context = torch.randn(2, 5, 16, generator=gen)
    h = _attention(query, context @ to_k.T, context @ to_v.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(_attention, query, h, torch.randn(2, 5, 16), context), h)
    assert torch.equal(layer.to_k_neg.weight, to_k) and torch.equal(layer.to_v_extra_pos.weight, to_v)


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_processor_order_is_diffusers_own(base):
    unet = build_tiny_unet(base)
    names = [n[: -len(".processor")] for n in unet.attn_processors]
    assert attention_processor_order(reversed(names)) == names


def _released_state_dict(unet, adapter: SunAdapter) -> dict:
    """What the official code saves: ModuleList(unet.attn_processors.values()).state_dict(), processors with no
    parameters on the self-attention layers."""
    out = {}
    for index, name in enumerate(unet.attn_processors):
        module = name[: -len(".processor")]
        if module in adapter.names:
            out |= {f"{index}.{k}": v for k, v in adapter.layer(module).state_dict().items()}
    return out


def _random_adapter(unet, add_pos=True, seed=0) -> SunAdapter:
    adapter = new_sun_adapter(unet, add_pos)
    for i, name in enumerate(adapter.names):
        _randomised(adapter.layer(name), seed + i)
    return adapter


def test_released_layout_loads_like_ours(tmp_path):
    unet = build_tiny_unet("sd15")
    adapter = _random_adapter(unet)
    released = _released_state_dict(unet, adapter)
    # Each transformer block has attn1 (no parameters) then attn2: the adapter sits at the odd indices.
    assert sorted({int(k.split(".")[0]) for k in released}) == [2 * i + 1 for i in range(len(adapter.names))]
    loaded = sun_adapter_from_tensors(unet, released)
    assert loaded.to_tensors().keys() == adapter.to_tensors().keys()
    assert all(torch.equal(loaded.to_tensors()[k], v) for k, v in adapter.to_tensors().items())
    # As a file without our metadata: recognised as the released SUN adapter, its sampling defaults inferred.
    path = tmp_path / "sun_adapter_sdv15_4step_addpos.safetensors"
    save_file({k: v.half() for k, v in released.items()}, str(path))
    meta = read_adapter(path).metadata
    assert (meta.kind, meta.sampler, meta.steps, meta.timesteps) == ("sun_adapter", "dpmpp_2m", 4, [999, 749, 499, 249])
    # An index that is a self-attention layer here: made for another UNet.
    with pytest.raises(SunFileError, match="index 0 is no cross-attention layer"):
        from_released_layout({"0.to_k_neg.weight": torch.zeros(1)}, [n[:-10] for n in unet.attn_processors])


def test_incomplete_or_foreign_files_are_refused(tmp_path):
    unet = build_tiny_unet("sd15")
    tensors = _random_adapter(unet).to_tensors()
    partial = {k: v for k, v in tensors.items() if not k.endswith("to_k_neg_beta")}
    with pytest.raises(SunFileError, match="lacks to_k_neg_beta"):
        group_layer_tensors(partial)
    path = tmp_path / "partial.safetensors"
    save_file({"1." + k.split("attn2.")[1]: v for k, v in partial.items() if k.startswith("down_blocks.0")}, str(path))
    with pytest.raises(AdapterFileError, match="lacks to_k_neg_beta: the file is incomplete"):
        read_adapter(path)
    with pytest.raises(SunFileError, match="does not fit this model"):
        sun_adapter_from_tensors(build_tiny_unet("sd15", block_out_channels=(64, 128)), tensors)


def test_processors_compute_plain_attention_without_a_negative_and_the_adapter_with_one():
    unet = build_tiny_unet("sd15")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 300])
    context, negative = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    with torch.no_grad():
        stock = unet(x, t, context).sample
        inputs = attach_sun(unet, _random_adapter(unet))
        torch.testing.assert_close(unet(x, t, context).sample, stock)
        with inputs.negative_prompt(negative):
            adapted = unet(x, t, context).sample
        assert (adapted - stock).abs().max() > 1e-3
        torch.testing.assert_close(unet(x, t, context).sample, stock)   # the negative is unset after the block
    assert len(cross_attention_modules(unet)) == len(unet.attn_processors) // 2


def test_offset_objective_is_the_gap_to_the_teachers_negative_cfg(proxy_data):
    """At initialisation the adapted model is the teacher's conditional model, so the offset term is the weighted gap
    between the teacher's conditional and its CFG prediction with the drawn negative prompts."""
    setup = load_teacher_data(BUNDLED_TEACHER, proxy_data)
    config = S.load_config("proxy", msc_weight=0.0)
    model = S.SunTraining(setup.pipe, config, S.schedule_of(setup.pipe), S.negative_pool(config, setup.captions))
    batch = setup.batch_fn(6)(torch.Generator().manual_seed(0))
    loss = model(batch, torch.Generator().manual_seed(1))["loss"]
    gen = torch.Generator().manual_seed(1)
    positives, negatives = model.draw_positives(batch["captions"], gen), model.draw_negatives(6, gen)
    assert "" in negatives and any(negatives)      # both empty and class negatives drawn
    t = torch.randint(0, 1000, (6,), generator=gen)
    sigma = model.schedule.sigmas[t].float()
    x = batch["latents"] + sigma.view(-1, 1, 1, 1) * torch.randn(batch["latents"].shape, generator=gen)

    def x0(texts):
        states = model.prompts(texts)["encoder_hidden_states"]
        eps = setup.pipe.unet(x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), t, states).sample
        return x - sigma.view(-1, 1, 1, 1) * eps

    with torch.no_grad():
        cond = x0(positives)
        gap = (cond - cfg(cond, x0(negatives), 4.0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, (1 / sigma**2).clamp(min=1) * gap, rtol=1e-4, atol=1e-6)


def test_teacher_trajectory_passes_the_students_timesteps_and_ends_at_the_teachers_sample(proxy_data):
    setup = load_teacher_data(BUNDLED_TEACHER, proxy_data)
    config = S.load_config("proxy")
    model = S.SunTraining(setup.pipe, config, S.schedule_of(setup.pipe), [""])
    cond = model.prompts(["a handwritten digit three"])
    negative = model.prompts([""])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states, sigmas = model.teacher_trajectory(noise, cond, negative)
    expected = model.schedule.sigmas_for_timesteps([999, 749, 499, 249])    # and the final 0
    torch.testing.assert_close(sigmas, expected.to(sigmas))
    assert sigmas[4] == 0 and states.shape == (5, 1, 4, 8, 8)
    torch.testing.assert_close(states[0], noise * (1 + expected[0] ** 2).sqrt())


def test_training_moves_the_adapter_towards_the_teacher(proxy_data):
    """Adam on one fixed batch (noise and negatives fixed): both terms fall; only the adapter changes."""
    setup = load_teacher_data(BUNDLED_TEACHER, proxy_data)
    config = S.load_config("proxy", msc_batch_size=4)
    model = S.SunTraining(setup.pipe, config, S.schedule_of(setup.pipe), S.negative_pool(config, setup.captions))
    unet_before = {k: v.clone() for k, v in setup.pipe.unet.state_dict().items()}
    batch = setup.batch_fn(16)(torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(_param_groups(model, config.lr, model.lr_scales()))
    history = []
    for _ in range(25):
        terms = model(batch, torch.Generator().manual_seed(0))
        optimizer.zero_grad(), terms["loss"].mean().backward(), optimizer.step()
        history.append((terms["offset"].mean().item(), terms["msc"].mean().item()))
    assert min(h[0] for h in history[-5:]) < 0.7 * history[0][0], history
    assert min(h[1] for h in history[-5:]) < 0.7 * history[0][1], history
    assert all(torch.equal(v, setup.pipe.unet.state_dict()[k]) for k, v in unet_before.items())


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("sun") / "tiny-sd15"
    build_tiny_pipeline("sd15", seed=0).save_pretrained(path)
    return path


def test_export_round_trip_resume_and_student(tiny_teacher, proxy_data, tmp_path):
    config = S.load_config("proxy", **TINY)
    kw = dict(sample_every=2, checkpoint_every=2, progress=False)
    out = S.train_sun(tiny_teacher, proxy_data, tmp_path / "a", tmp_path / "a.safetensors", config, **kw)
    assert S.train_sun(tiny_teacher, proxy_data, tmp_path / "b", tmp_path / "b.safetensors", config, stop_after=2, **kw) is None
    S.train_sun(tiny_teacher, proxy_data, tmp_path / "b", tmp_path / "b.safetensors", config, **kw)
    a, b = read_adapter(out), read_adapter(tmp_path / "b.safetensors")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    meta = a.metadata
    assert (meta.kind, meta.base, meta.sampler, meta.steps, meta.timesteps) == ("sun_adapter", "sd15", "dpmpp_2m", 4, [999, 749, 499, 249])
    assert meta.guidance == {"convention": "cfg", "cfg_scale": 4.0} and meta.extra["variant"] == "add_pos"
    pipe = load_teacher(tiny_teacher)
    layers = {k.rsplit(".", 1)[0] for k in a.tensors if k.endswith("to_k_neg.weight")}
    assert layers == {f"{n}.to_k_neg" for n in cross_attention_modules(pipe.unet)}
    assert a.tensors[next(k for k in a.tensors if k.endswith("to_k_neg_alpha"))].abs().max() > 0   # trained
    assert (tmp_path / "a" / "samples" / "step-00000002-negative.png").is_file()
    student = load_student(pipe, out)
    assert isinstance(student, SunStudent)
    captions, seeds = ["a handwritten digit three", "a silhouette of a cat"], [0, 1]
    empty, seven = student.latents(captions, seeds), student.latents(captions, seeds, negative="a handwritten digit seven")
    assert (empty - seven).abs().max() > 0
    assert student.images(captions, seeds, 2).shape == (2, 32, 32, 3)
    # The teacher's own UNet is left as it was.
    assert not any(type(p).__name__ == "SunAttnProcessor" for p in pipe.unet.attn_processors.values())
    with pytest.raises(AdapterFileError, match="adapter is for sd15.* but the model is sdxl"):
        SunStudent(build_tiny_pipeline("sdxl"), out)


def test_config_and_cli_errors(tiny_teacher, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"msc_teacher_steps \(10\) must be a multiple of sample_steps \(4\)"):
        S.load_config("paper", msc_teacher_steps=10)
    with pytest.raises(ValueError, match="variant 'big' is not one of"):
        S.load_config("paper", variant="big")
    with pytest.raises(ValueError, match="negative_prompts file .* does not exist"):
        S.load_config("paper", negative_prompts=str(tmp_path / "missing.txt"))
    prompts = tmp_path / "negatives.txt"
    prompts.write_text("blurry\n\n  low quality \n")
    assert S.negative_pool(S.load_config("paper", negative_prompts=str(prompts)), []) == ["blurry", "low quality"]
    assert main(["train", "sun", "--teacher", str(tiny_teacher), "--run-dir", str(tmp_path / "run"), "--cfg-scale", "0.5",
                 "--dry-run"]) == 2
    assert "cfg_scale must be at least 1" in capsys.readouterr().err
    assert main(["train", "sun", "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert json.loads((tmp_path / "run" / "training_options.json").read_text())["sun"]["cfg_scale"] == 4.0
    assert main(["bench", "--set", "sun"]) == 2
    assert "needs --adapter" in capsys.readouterr().err


def test_an_adapter_of_the_base_plugs_into_a_finetune_of_it(tiny_teacher, proxy_data, tmp_path):
    """`fewstep train finetune` makes a fine-tuned pipeline; the base's SUN adapter attaches to it untrained."""
    from fewstep.training.teacher import finetune_teacher

    adapter = S.train_sun(tiny_teacher, proxy_data, tmp_path / "sun", tmp_path / "sun.safetensors", S.load_config("proxy", **TINY),
                          sample_every=0, progress=False)
    out = finetune_teacher(tiny_teacher, proxy_data, tmp_path / "ft", tmp_path / "finetuned", steps=3, batch_size=4, lr=1e-2,
                           ema_decay=None, sample_every=3, progress=False)
    assert (tmp_path / "ft" / "samples" / "step-00000003.png").is_file()
    base, finetuned = load_teacher(tiny_teacher), load_teacher(out)
    assert any((a - b).abs().max() > 0 for a, b in zip(base.unet.parameters(), finetuned.unet.parameters()))
    # The VAE is kept (up to the fp16 the pipeline is saved in).
    assert all(torch.allclose(a.half().float(), b.float()) for a, b in zip(base.vae.parameters(), finetuned.vae.parameters()))
    captions, seeds = ["a handwritten digit three"], [0]
    on_base = SunStudent(base, adapter).latents(captions, seeds)
    on_finetune = SunStudent(finetuned, adapter).latents(captions, seeds)
    assert torch.isfinite(on_finetune).all() and (on_base - on_finetune).abs().max() > 1e-4


def test_proxy_styles_are_the_proxy_inverted_or_mirrored():
    from fewstep.training.data import load_dataset

    plain, inverted, mirrored = load_dataset("proxy"), load_dataset("proxy-inverted"), load_dataset("proxy-mirrored")
    assert plain.captions == inverted.captions == mirrored.captions and (inverted.images == 255 - plain.images).all()
    assert (mirrored.images[:, :, ::-1] == plain.images).all() and not (mirrored.images == plain.images).all()


def test_bundled_adapter_beats_the_teacher_at_equal_cost_and_the_negative_prompt_works():
    """The proxy adapter (`fewstep train sun`, proxy preset): at 4 passes it beats the teacher's 4-step CFG (8 passes),
    and naming the class a neutral prompt gives most as the negative prompt makes it rarer, more so at higher strength."""
    from fewstep.training.bench import negative_prompt_study
    from fewstep.training.bundled import BUNDLED_SUN
    from fewstep.training.evaluation import StudentEntry, TeacherEntry, evaluate_entry

    pipe = load_teacher(BUNDLED_TEACHER)
    sun = evaluate_entry(pipe, StudentEntry(4, str(BUNDLED_SUN), label="sun"), per_class=10, batch_size=200)
    teacher = evaluate_entry(pipe, TeacherEntry(4), per_class=10, batch_size=200)
    assert sun["fid"] < teacher["fid"] and sun["nfe"] * 2 == teacher["nfe"], (sun["fid"], teacher["fid"])
    study = negative_prompt_study(pipe, str(BUNDLED_SUN), samples=100, batch_size=100, strengths=(0.0, 1.0, 2.0),
                                  teacher_steps=8, classes=["a handwritten digit two"])
    teacher_row, off, on, strong = study["rows"]
    assert teacher_row["rate_empty_negative"] > 0.5 and teacher_row["ratio"] < 0.1, teacher_row
    assert off["ratio"] == 1.0 and on["rate_empty_negative"] > 0.5, (off, on)   # strength 0: the negative is ignored
    assert on["ratio"] < 0.65 and strong["ratio"] < 0.3, (on, strong)
