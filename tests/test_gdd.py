"""GDD / GDD-I: the one-step parameterisation against diffusers' DDIM, the frozen feature network, lazy R1, GDD-I's
frozen layers, kill and resume, and the exported file."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.adapter_file import read_adapter
from fewstep.core.lora import read_lora
from fewstep.training.cli import main
from fewstep.training.methods import gdd as G
from fewstep.training.tiny_models import build_tiny_pipeline

TINY = dict(steps=4, batch_size=4, lr=1e-3, disc_lr=1e-3, r1_interval=2, lora_rank=4, gan_timesteps=(10, 500))


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd15", seed=0)


def _batch(pipe, step, n=4):
    size = pipe.unet.config.sample_size
    latents = torch.randn(n, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(step))
    return {"latents": latents, "captions": ["a cat", "the digit 3", "a horse", "the digit 7"][:n], "step": step}


def test_one_step_from_pure_noise_is_diffusers_ddim_prediction_at_t_999(pipe):
    """At initialisation the generator is the teacher's x0 prediction at t = 999 from unit noise."""
    from diffusers import DDIMScheduler

    from fewstep.training.pipelines import PromptEncoder

    model = G.build_distillation(pipe, G.load_config("proxy", **TINY))
    noise = torch.randn(2, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size, generator=torch.Generator().manual_seed(1))
    cond = PromptEncoder(pipe)(["a cat", "a dog"])
    with torch.no_grad():
        ours = model.generate(noise, cond)
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        scheduler.set_timesteps(1)
        t = torch.tensor(999)
        eps = pipe.unet(noise * scheduler.init_noise_sigma, t, **cond).sample
        reference = scheduler.step(eps, t, noise).pred_original_sample
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_the_feature_network_gets_no_gradient_and_keeps_its_weights(pipe):
    from fewstep.training.loop import training_loop

    model = G.build_distillation(pipe, G.load_config("proxy", variant="full", **TINY))
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    terms = model(_batch(pipe, 1), torch.Generator().manual_seed(0))
    terms["loss"].mean().backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    model.zero_grad(set_to_none=True)
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        trained = training_loop(run_dir, model, lambda m, b, g: m(b, g), lambda g: _batch(pipe, 0), 3, lr=1e-3,
                                ema_decay=None, progress=False, checkpoint_every=100)
    assert all(torch.equal(v, teacher_before[k]) for k, v in trained.teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in trained.student.state_dict().items())


def test_r1_is_applied_every_interval_steps_and_scaled_by_it(pipe):
    config = G.load_config("proxy", **{**TINY, "r1_interval": 3, "r1_gamma": 0.5})
    model = G.build_distillation(pipe, config)
    for step in range(6):
        terms = model(_batch(pipe, step), torch.Generator().manual_seed(step))
        assert ("r1" in terms) == (step % 3 == 0)
        if "r1" in terms:
            assert (terms["r1"] > 0).all()
            torch.testing.assert_close(terms["loss"], terms["generator"] + terms["discriminator"] + 0.5 * 0.5 * 3 * terms["r1"])
        else:
            torch.testing.assert_close(terms["loss"], terms["generator"] + terms["discriminator"])


def test_gdd_i_freezes_the_convolutions_and_projections(pipe):
    student = G.make_generator(pipe.unet, G.load_config("proxy", variant="gdd_i"))
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Conv2d) or name.endswith(("proj_in", "proj_out")):
            assert not any(p.requires_grad for p in module.parameters(recurse=False)), name
    assert all(p.requires_grad for n, p in student.named_parameters() if ".attn1.to_q." in n)
    assert 0.0 < G.trained_fraction(student) < 1.0
    assert G.trained_fraction(G.make_generator(pipe.unet, G.load_config("proxy", variant="full"))) == 1.0
    lora = G.make_generator(pipe.unet, G.load_config("proxy", variant="lora", lora_rank=4))
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, pipe):
    path = tmp_path_factory.mktemp("gdd") / "tiny-sd15"
    pipe.save_pretrained(path)
    return path


def _train(teacher, data, run_dir, out, config, **kwargs):
    return G.train_gdd(teacher, data, run_dir, out, config, checkpoint_every=2, sample_every=0, progress=False, **kwargs)


@pytest.mark.parametrize("variant", ["gdd_i", "lora"])
def test_kill_and_resume_gives_the_uninterrupted_result_and_the_file_reads_back(tiny_teacher, proxy_data, tmp_path, variant):
    config = G.load_config("proxy", variant=variant, **TINY)
    whole = _train(tiny_teacher, proxy_data, tmp_path / "whole", tmp_path / "whole.safetensors", config)
    assert _train(tiny_teacher, proxy_data, tmp_path / "cut", tmp_path / "cut.safetensors", config, stop_after=2) is None
    resumed = _train(tiny_teacher, proxy_data, tmp_path / "cut", tmp_path / "cut.safetensors", config)
    a, b = read_adapter(whole, expected_base="sd15"), read_adapter(resumed, expected_base="sd15")
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    meta = a.metadata
    assert (meta.kind, meta.sampler, meta.steps, meta.timesteps, meta.extra["variant"]) == ("gdd_student", "onestep", 1, [999], variant)
    if variant == "lora":
        modules, _ = read_lora(a.tensors)
        assert modules and all(m.rank == 4 for m in modules.values())
    else:   # the whole UNet, in diffusers' names: it loads into the teacher's architecture with every key matched
        unet = build_tiny_pipeline("sd15", seed=1).unet
        missing, unexpected = unet.load_state_dict({k: v.float() for k, v in a.tensors.items()}, strict=False)
        assert not missing and not unexpected
        assert 0.0 < meta.extra["trained_fraction"] < 1.0


def test_cli_dry_run_prints_the_options_and_a_bad_variant_is_named(tiny_teacher, tmp_path, capsys):
    assert main(["train", "gdd", "--teacher", str(tiny_teacher), "--run-dir", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "2", "--variant", "lora", "--lora-rank", "4", "--sample-every", "0", "--data",
                 "proxy", "--gan-timesteps", "10,500", "--dry-run"]) == 0
    assert '"variant": "lora"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["train", "gdd", "--teacher", str(tiny_teacher), "--variant", "gddi", "--run-dir", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "invalid choice: 'gddi'" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["gdd_i", "lora"])
def test_the_exported_file_samples_as_the_training_code_does(pipe, tmp_path, variant):
    """`fewstep bench` / `eval` sample the file (whole UNet or LoRA) to the generator's own one-step latents."""
    from fewstep.training.bench import _with_adapters, bench_label
    from fewstep.training.evaluation import StudentEntry
    from fewstep.training.students import AdaptedTeacher, load_student

    model = G.build_distillation(pipe, G.load_config("proxy", variant=variant, **TINY))
    with torch.no_grad():   # as if trained: every trained weight moved (the LoRA's up-projections start at zero)
        for p in model.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = tmp_path / f"{variant}.safetensors"
    meta = G.export_gdd_student(model, path, "sd15", provenance={"train_steps": 3, "images": 10, "batch_size": 4})
    captions, seeds = ["a cat", "the digit 3"], [5, 6]
    student = load_student(pipe, path)
    assert isinstance(student, AdaptedTeacher)
    expected = model.sample(captions, seeds)
    torch.testing.assert_close(student.latents(captions, seeds), expected, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(expected, G.build_distillation(pipe, G.load_config("proxy", **TINY)).sample(captions, seeds), atol=1e-2)

    label = bench_label(meta)
    assert label == {"gdd_i": "gdd_i", "lora": "gdd_lora"}[variant]
    full = G.build_distillation(pipe, G.load_config("proxy", variant="full", **TINY))
    other, longer, unnamed = tmp_path / "full.safetensors", tmp_path / "full_long.safetensors", tmp_path / "full_b.safetensors"
    G.export_gdd_student(full, other, "sd15", {"train_steps": 3})
    files = [str(other), str(path)]

    def rows(entry_label, files):
        return [(e.label, e.adapter) for e in _with_adapters(StudentEntry(1, adapter=None, label=entry_label), files)]

    assert rows(label, files) == [(label, str(path))]
    assert rows("gdd", files) == [("gdd", str(other))]
    assert rows("guided", files) == [("guided", None)]
    # One variant trained for two lengths: a row each, told apart by training steps, else by file name.
    G.export_gdd_student(full, longer, "sd15", {"train_steps": 9})
    assert rows("gdd", [str(other), str(path), str(longer)]) == [("gdd@3", str(other)), ("gdd@9", str(longer))]
    G.export_gdd_student(full, unnamed, "sd15", {"train_steps": 3})
    assert rows("gdd", [str(other), str(unnamed)]) == [("gdd@full", str(other)), ("gdd@full_b", str(unnamed))]
    # Trained on the teacher's samples: rows of their own, beside the real-data ones.
    synth = tmp_path / "full_synth.safetensors"
    assert bench_label(G.export_gdd_student(full, synth, "sd15", {"train_steps": 3, "synthesized": {"prompts": "proxy"}})) == "gdd_synth"
    assert rows("gdd_synth", [str(other), str(synth)]) == [("gdd_synth", str(synth))]
    assert rows("gdd", [str(other), str(synth)]) == [("gdd", str(other))]


def test_the_head_judges_image_and_prompt_together_with_the_text_projection(pipe):
    """With the projection term the same features score differently under another prompt; without it they cannot."""
    from fewstep.training.methods.gan import Discriminator

    features = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    texts = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    head = Discriminator(8, 8, 4, text_dim=16)
    with torch.no_grad():
        head.text_projection.weight.normal_()
    assert not torch.allclose(head(features, texts), head(features, texts.flip(0)))
    plain = Discriminator(8, 8, 4)
    torch.testing.assert_close(plain(features), plain(features, texts.flip(0)))
    model = G.build_distillation(pipe, G.load_config("proxy", **TINY))
    assert model.discriminator.text_projection.in_features == pipe.unet.config.cross_attention_dim
    terms = model(_batch(pipe, 0), torch.Generator().manual_seed(0))
    terms["loss"].mean().backward()
    assert model.discriminator.text_projection.weight.grad.abs().sum() > 0
    assert G.build_distillation(pipe, G.load_config("proxy", disc_text_projection=False, **TINY)).discriminator.text_projection is None
