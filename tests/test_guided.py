"""Guided distillation, stage 1: the w-embedding, the objective against the teacher's own CFG, training, export."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from fewstep.core.adapter_file import AdapterFileError, read_adapter, write_adapter
from fewstep.core.guidance import cfg_imagen
from fewstep.core.parameterization import distillation_weight
from fewstep.training import methods
from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.cli import main
from fewstep.training.diffusers_sampling import w_condition
from fewstep.training.methods import guided as G
from fewstep.training.teacher_data import load_teacher_data
from fewstep.training.pipelines import PromptEncoder, load_teacher
from fewstep.training.students import GuidedStudent, load_student
from fewstep.training.tiny_models import build_tiny_pipeline, build_tiny_unet, sd_scheduler_config

TINY = dict(steps=6, batch_size=4, lr=1e-3, ema_decay=None, sample_steps=4)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("guided") / "tiny-sd15"
    build_tiny_pipeline("sd15", seed=0).save_pretrained(path)
    return path


def test_w_embedding_starts_at_zero_so_the_student_is_the_teacher():
    teacher = build_tiny_unet("sd15")
    student = G.add_w_embedding(teacher, 256)
    projection = student.time_embedding.cond_proj.weight
    assert projection.shape == (teacher.config.block_out_channels[0], 256) and not projection.any()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
    context = torch.randn(2, 77, teacher.config.cross_attention_dim)
    with torch.no_grad():
        expected = teacher(x, t, context).sample
        for w in (0.0, 7.0):
            torch.testing.assert_close(student(x, t, context, **w_condition(w, 256, x, 2)).sample, expected)
    assert G.add_w_embedding(student, 256).time_embedding.cond_proj is not student.time_embedding.cond_proj  # a copy


def test_a_trained_w_projection_makes_w_an_input():
    student = G.add_w_embedding(build_tiny_unet("sd15"), 256)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.1)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        low, high = (student(x, t, context, **w_condition(w, 256, x, 1)).sample for w in (0.0, 5.0))
    assert (low - high).abs().max() > 1e-3


def test_distillation_weight_is_truncated_snr_in_x_space():
    alphas_cumprod = DDPMScheduler(**sd_scheduler_config()).alphas_cumprod.double()
    t = torch.tensor([0, 100, 500, 999])
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])           # alpha^2 / sigma^2 in DDPM's terms
    sigma = ((1 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt()
    torch.testing.assert_close(distillation_weight(sigma, "x").double(), snr.clamp(min=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(distillation_weight(sigma, "eps").double(), snr, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="unknown loss space"):
        distillation_weight(sigma, "v")


def _fixed_batch(pipe, n=4):
    gen = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(n, 4, 8, 8, generator=gen), "captions": ["a handwritten digit three", "a silhouette of a cat"] * (n // 2)}


def test_at_w_zero_the_initial_student_already_matches_and_the_loss_is_the_cfg_gap(tiny_teacher):
    pipe = load_teacher(tiny_teacher)
    batch = _fixed_batch(pipe)
    at_zero = G.build_stage1(pipe, G.load_config("proxy", w_min=0.0, w_max=0.0, default_w=0.0))
    assert at_zero(batch, torch.Generator().manual_seed(1))["loss"].abs().max() < 1e-8
    # At w = 4 the initial loss is the weighted gap between the teacher's conditional prediction and its CFG one.
    model = G.build_stage1(pipe, G.load_config("proxy", w_min=4.0, w_max=4.0, default_w=4.0))
    gen = torch.Generator().manual_seed(1)
    loss = model(batch, gen)["loss"]
    gen = torch.Generator().manual_seed(1)
    cond, uncond = PromptEncoder(pipe).with_unconditional(batch["captions"])
    t = torch.randint(0, 1000, (4,), generator=gen)
    sigma = model.schedule.sigmas[t].float()
    x = batch["latents"] + sigma.view(-1, 1, 1, 1) * torch.randn(batch["latents"].shape, generator=gen)

    def x0(text):
        eps = pipe.unet(x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), t, text["encoder_hidden_states"]).sample
        return x - sigma.view(-1, 1, 1, 1) * eps

    with torch.no_grad():
        gap = (x0(cond) - cfg_imagen(x0(cond), x0(uncond), 4.0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, distillation_weight(sigma) * gap, rtol=1e-4, atol=1e-6)


def _fit_fixed_batch(model, batch, steps=30, lr=1e-4, warmup=10) -> list[float]:
    """Adam on one batch with t, noise and w fixed: the objective and its gradients, without data noise."""
    optimizer = torch.optim.Adam([p for p in model.student.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = model(batch, torch.Generator().manual_seed(0))["loss"].mean()
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    return losses


def test_stage1_student_learns_the_teachers_cfg_output(proxy_data):
    """On the proxy teacher: from the teacher's conditional prediction, the student moves to its CFG output."""
    setup = load_teacher_data(BUNDLED_TEACHER, proxy_data)
    model = G.build_stage1(setup.pipe, G.load_config("proxy"))
    losses = _fit_fixed_batch(model, setup.batch_fn(16)(torch.Generator().manual_seed(0)))
    assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_export_round_trip_and_metadata(tiny_teacher, proxy_data, tmp_path):
    config = G.load_config("proxy", **TINY)
    out = G.train_guided(tiny_teacher, proxy_data, tmp_path / "run", tmp_path / "g.safetensors", config, sample_every=3,
                         progress=False)
    adapter = read_adapter(out, expected_base="sd15", expected_kinds=["guided_student"])
    meta = adapter.metadata
    assert meta.sampler == "ddim" and meta.steps == 4 and meta.timesteps == [999, 749, 499, 249]
    assert meta.guidance == {"convention": "imagen", "w_min": 0.0, "w_max": 8.0, "default_w": 3.0}
    assert meta.extra["embedding_dim"] == 256 and meta.provenance["method"] == "guided"
    assert (tmp_path / "run" / "samples" / "step-00000003-w3.png").is_file()
    pipe = load_teacher(tiny_teacher)
    student = load_student(pipe, out)
    assert isinstance(student, GuidedStudent)
    seeds, captions = [0, 1], ["a handwritten digit three", "a silhouette of a cat"]
    images = student.images(captions, seeds, 2, w=3.0)
    assert images.shape == (2, 32, 32, 3)
    # Without a w, the file's default w is used.
    torch.testing.assert_close(student.latents(captions, seeds, 2), student.latents(captions, seeds, 2, w=3.0))
    broken = {k: v for k, v in adapter.tensors.items() if "cond_proj" not in k}
    with pytest.raises(AdapterFileError, match="without its w-embedding"):
        write_adapter(tmp_path / "broken.safetensors", broken, meta)   # never written
    save_file(broken, str(tmp_path / "broken.safetensors"), metadata=meta.to_strings())   # made elsewhere
    with pytest.raises(AdapterFileError, match="without its w-embedding"):
        read_adapter(tmp_path / "broken.safetensors")


def test_stage1_resumes_to_the_uninterrupted_result(tiny_teacher, proxy_data, tmp_path):
    config = G.load_config("proxy", **TINY)
    kw = dict(sample_every=0, checkpoint_every=2, progress=False)
    G.train_guided(tiny_teacher, proxy_data, tmp_path / "straight", tmp_path / "a.safetensors", config, **kw)
    assert G.train_guided(tiny_teacher, proxy_data, tmp_path / "killed", tmp_path / "b.safetensors", config, stop_after=4, **kw) is None
    G.train_guided(tiny_teacher, proxy_data, tmp_path / "killed", tmp_path / "b.safetensors", config, **kw)
    a, b = read_adapter(tmp_path / "a.safetensors").tensors, read_adapter(tmp_path / "b.safetensors").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["time_embedding.cond_proj.weight"].abs().max() > 0   # the w projection trained


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="need 0 <= w_min <= w_max"):
        G.load_config("paper", w_min=5.0, w_max=2.0)
    with pytest.raises(ValueError, match="default_w 20.0 lies outside"):
        G.load_config("paper", default_w=20.0)
    with pytest.raises(ValueError, match=r"w_mni \(did you mean w_min\?\)"):
        G.load_config("paper", w_mni=1.0)
    with pytest.raises(ValueError, match="sampler 'euler' is not one of"):
        G.load_config("paper", sampler="euler")
    assert methods.guided.PRESETS["paper"].w_min == 2.0


def test_cli_trains_stops_resumes_and_bench_needs_an_adapter(tiny_teacher, tmp_path, capsys):
    args = ["train", "guided", "--teacher", str(tiny_teacher), "--run-dir", str(tmp_path / "run"), "--steps", "4",
            "--batch-size", "2", "--sample-every", "0", "--sample-steps", "4"]
    assert main(args + ["--stop-after", "2"]) == 0
    assert "stopped after step 2" in capsys.readouterr().out
    assert main(args) == 0
    assert "guided student written to" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert main(["train", "guided", "--teacher", str(tiny_teacher), "--w-min", "3", "--w-max", "1", "--dry-run"]) == 2
    assert "need 0 <= w_min <= w_max" in capsys.readouterr().err
    assert main(["bench", "--set", "guided"]) == 2
    assert "needs --adapter" in capsys.readouterr().err


def test_progressive_target_is_what_one_ddim_step_must_predict():
    from fewstep.core.parameterization import ddim_step, progressive_distillation_target

    gen = torch.Generator().manual_seed(0)
    x, x_next = torch.randn(3, 4, 8, 8, generator=gen) * 5, torch.randn(3, 4, 8, 8, generator=gen)
    sigma, sigma_next = torch.tensor([14.6, 3.0, 0.5]), torch.tensor([3.0, 0.5, 0.0])
    target = progressive_distillation_target(x, x_next, sigma, sigma_next)
    torch.testing.assert_close(ddim_step(x, target, sigma, sigma_next), x_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target[2], x_next[2])   # the last step: the teacher's final x0 itself


def test_ddim_step_is_the_core_ddim_sampler_step():
    from fewstep.core.parameterization import ddim_step
    from fewstep.core.samplers import sample_ddim

    x0 = torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([10.0, 2.0])
    x = x0 + 10.0 * torch.randn(2, 4, 8, 8)
    reference = sample_ddim(lambda x, sigma, **_: x0, x, sigmas)
    torch.testing.assert_close(ddim_step(x, x0, sigmas[:1].expand(2), sigmas[1:].expand(2)), reference)


def _stage1_file(pipe, config, path):
    """An untrained stage-1 student (the teacher plus a zero w projection), as `train guided --stage 1` writes it."""
    model = G.build_stage1(pipe, config)
    G.export_guided_student(model.student, model.schedule, config, path, "sd15", config.start_steps, 1, {})
    return path


def test_bench_and_eval_rows_carry_the_plans_note_for_a_w_outside_the_trained_range(tiny_teacher, tmp_path):
    """The diffusers students sample through core's plan, so its notes reach `fewstep bench` and `fewstep eval`."""
    from fewstep.training.evaluation import StudentEntry, evaluate_entry

    pipe = load_teacher(tiny_teacher)
    config = G.load_config("proxy", **TINY)
    path = _stage1_file(pipe, config, tmp_path / "g.safetensors")
    inside, outside = (evaluate_entry(pipe, StudentEntry(1, str(path), "guided", w=w), 1, 20) for w in (config.w_max, config.w_max + 1))
    assert "notes" not in inside
    assert outside["notes"] == [f"w = {config.w_max + 1:g} lies outside the trained range [{config.w_min:g}, {config.w_max:g}]: "
                                "expect weaker control"]


def test_a_progressive_round_fits_two_teacher_steps_with_one(proxy_data):
    """The round objective on one fixed batch (t, noise, w fixed too): the student, which starts as its teacher,
    learns to land in one DDIM step where the teacher lands in two."""
    config = G.load_config("proxy", start_steps=4, target_steps=2)
    setup = load_teacher_data(BUNDLED_TEACHER, proxy_data)
    teacher = G.build_stage1(setup.pipe, config).student.requires_grad_(False)
    model = G.ProgressiveRound(setup.pipe, G.add_w_embedding(teacher, 256).requires_grad_(True), teacher, config,
                               G.schedule_of(setup.pipe), 2)
    losses = _fit_fixed_batch(model, setup.batch_fn(16)(torch.Generator().manual_seed(0)))
    assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_stage2_writes_a_student_per_round_with_halved_steps(proxy_data, tiny_teacher, tmp_path):
    config = G.load_config("proxy", **{**TINY, "start_steps": 4, "target_steps": 1, "round_steps": 2})
    pipe = load_teacher(tiny_teacher)
    stage1 = _stage1_file(pipe, config, tmp_path / "stage1.safetensors")
    out = G.train_progressive(tiny_teacher, stage1, proxy_data, tmp_path / "run", tmp_path / "final.safetensors", config,
                              sample_every=1, progress=False)
    for steps, timesteps in ((2, [999, 499]), (1, [999])):
        meta = read_adapter(tmp_path / "run" / f"round-{steps:02d}steps" / "guided_student.safetensors").metadata
        assert meta.steps == steps and meta.timesteps == timesteps and meta.extra["stage"] == 2
        assert meta.provenance["round"] == f"{2 * steps} -> {steps} steps"
        assert (tmp_path / "run" / f"round-{steps:02d}steps" / "samples" / "step-00000001.png").is_file()
    assert read_adapter(out).metadata.steps == 1


def test_stage2_rounds_resume_and_skip_finished_ones(tiny_teacher, proxy_data, tmp_path):
    config = G.load_config("proxy", **{**TINY, "start_steps": 8, "target_steps": 2, "round_steps": 3})
    assert config.rounds == [4, 2]
    pipe = load_teacher(tiny_teacher)
    stage1 = _stage1_file(pipe, config, tmp_path / "stage1.safetensors")
    kw = dict(sample_every=0, checkpoint_every=1, progress=False)
    straight = G.train_progressive(tiny_teacher, stage1, proxy_data, tmp_path / "a", tmp_path / "a.safetensors", config, **kw)
    # Killed in round one; rerun, round one resumes from its checkpoint and ends, round two is killed; rerun again.
    assert G.train_progressive(tiny_teacher, stage1, proxy_data, tmp_path / "b", tmp_path / "b.safetensors", config,
                               stop_after=2, **kw) is None
    assert not (tmp_path / "b" / "round-04steps" / "guided_student.safetensors").exists()
    assert G.train_progressive(tiny_teacher, stage1, proxy_data, tmp_path / "b", tmp_path / "b.safetensors", config,
                               stop_after=4, **kw) is None
    assert (tmp_path / "b" / "round-04steps" / "guided_student.safetensors").is_file()
    resumed = G.train_progressive(tiny_teacher, stage1, proxy_data, tmp_path / "b", tmp_path / "b.safetensors", config, **kw)
    a, b = read_adapter(straight).tensors, read_adapter(resumed).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_adapter(straight).metadata.steps == 2


def test_stage2_config_and_cli_errors(tiny_teacher, capsys):
    with pytest.raises(ValueError, match="start_steps must be target_steps times a power of two"):
        G.load_config("paper", start_steps=12, target_steps=1)
    assert G.load_config("paper").rounds == [8, 4, 2, 1]
    assert main(["train", "guided", "--stage", "2", "--teacher", str(tiny_teacher)]) == 2
    assert "--stage 2 needs --student" in capsys.readouterr().err


def test_a_lora_student_trains_only_its_lora_and_w_projection_and_stays_a_lora_through_stage_2(tiny_teacher, proxy_data,
                                                                                                 tmp_path, capsys):
    """--lora-rank: stage 1 trains a LoRA plus the w projection; the file holds kohya LoRA keys and the projection,
    samples like the trained module, and stage 2 trains the same LoRA further (one LoRA on the base model at the end)."""
    config = G.load_config("proxy", **{**TINY, "lora_rank": 4, "start_steps": 4, "target_steps": 2, "round_steps": 2})
    pipe = load_teacher(tiny_teacher)
    model = G.build_stage1(pipe, config)
    trained = {n for n, p in model.student.named_parameters() if p.requires_grad}
    assert "time_embedding.cond_proj.weight" in trained and all(".lora_" in n for n in trained - {"time_embedding.cond_proj.weight"})
    assert len(trained) > 1 and not any(p.requires_grad for p in model.teacher.parameters())

    out = G.train_guided(tiny_teacher, proxy_data, tmp_path / "run", tmp_path / "lora.safetensors", config, sample_every=0,
                         progress=False)
    adapter = read_adapter(out, expected_base="sd15", expected_kinds=["guided_student"])
    meta = adapter.metadata
    assert meta.lora_weights and meta.extra["rank"] == 4 and meta.extra["targets"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert all(k.startswith("lora_unet_") for k in adapter.tensors if k != "time_embedding.cond_proj.weight")
    assert adapter.tensors["time_embedding.cond_proj.weight"].abs().max() > 0   # the projection learnt
    whole = G.load_config("proxy", **TINY)
    full_file = G.export_guided_student(G.build_stage1(pipe, whole).student, G.schedule_of(pipe), whole, tmp_path / "f.safetensors",
                                        "sd15", 4, 1, {})
    assert not full_file.lora_weights
    assert out.stat().st_size < 0.5 * (tmp_path / "f.safetensors").stat().st_size

    # The file samples what the module it was exported from samples (LoRA merged into the teacher's UNet).
    trained_unet = G.load_guided_unet(pipe, out, config)
    captions, seeds = ["a handwritten digit three", "a silhouette of a cat"], [0, 1]
    student = load_student(pipe, out)
    module = G.GuidedStage1(pipe, trained_unet.eval(), pipe.unet, config, G.schedule_of(pipe))
    torch.testing.assert_close(student.latents(captions, seeds, 2, w=2.0), module.sample(captions, seeds, 2, 2.0),
                               atol=2e-3, rtol=1e-3)   # the file is fp16

    final = G.train_progressive(tiny_teacher, out, proxy_data, tmp_path / "rounds", tmp_path / "final.safetensors", config,
                                sample_every=0, progress=False)
    rounded = read_adapter(final)
    assert rounded.metadata.lora_weights and rounded.metadata.steps == 2 and rounded.tensors.keys() == adapter.tensors.keys()
    assert any(not torch.equal(rounded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    assert main(["train", "guided", "--stage", "2", "--teacher", str(tiny_teacher), "--student", str(out),
                 "--lora-rank", "8", "--run-dir", str(tmp_path / "x")]) == 2
    assert "--lora-rank is a stage-1 option" in capsys.readouterr().err
