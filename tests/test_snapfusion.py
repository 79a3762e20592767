"""SnapFusion's block skipping and measurement, checked against the same UNet with the block's own contribution
zeroed (a transformer's proj_out, a ResNet's conv2: the residual structure then gives what skipping must give)."""

from __future__ import annotations

import copy

import pytest
import torch

from fewstep.training.methods import snap_blocks as B
from fewstep.training.methods import snapfusion as S
from fewstep.training.teacher_data import schedule_of
from fewstep.training.tiny_models import build_tiny_pipeline


@pytest.fixture(scope="module")
def unet():
    return build_tiny_pipeline("sd15", seed=0).unet.eval()


def _inputs(unet, n=2):
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    return {"sample": torch.randn(n, unet.config.in_channels, size, size, generator=g),
            "timestep": torch.tensor([500] * n),
            "encoder_hidden_states": torch.randn(n, 7, unet.config.cross_attention_dim, generator=g)}


def _zeroed(unet, name):
    """A copy of ``unet`` whose block ``name`` adds nothing to its residual path."""
    other = copy.deepcopy(unet)
    module = dict(other.named_modules())[name]
    last = module.proj_out if hasattr(module, "proj_out") else module.conv2
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return other


def test_every_block_kind_is_found_and_each_skip_is_the_block_adding_nothing(unet):
    reference_unet, unet = unet, copy.deepcopy(unet)
    skipping = B.BlockSkipping(unet)
    kinds = {b.kind for b in skipping.blocks}
    assert kinds == {"resnet", "attention"}
    assert any(b.name.startswith("mid_block") for b in skipping.blocks)
    inputs = _inputs(unet)
    with torch.no_grad():
        full = unet(**inputs).sample
        torch.testing.assert_close(full, reference_unet(**inputs).sample)   # installing changes nothing
        for block in skipping.blocks:
            with skipping.skip([block.name]):
                skipped = unet(**inputs).sample
            assert skipped.shape == full.shape
            torch.testing.assert_close(skipped, _zeroed(reference_unet, block.name)(**inputs).sample, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(skipped, full), block.name
        with skipping.skip([b.name for b in skipping.blocks]):
            assert unet(**inputs).sample.shape == full.shape
        torch.testing.assert_close(unet(**inputs).sample, full)   # the context restores


def test_keys_stay_the_teachers_and_unknown_blocks_are_named(unet):
    model = copy.deepcopy(unet)
    skipping = B.BlockSkipping(model)
    assert list(model.state_dict()) == list(unet.state_dict())
    with pytest.raises(ValueError, match="no such block.*down_blocks.9.resnets.0"):
        with skipping.skip(["down_blocks.9.resnets.0"]):
            pass


def test_the_robust_training_draw_skips_at_the_given_rate():
    blocks = [B.Block(f"b{i}", "resnet") for i in range(10)]
    g = torch.Generator().manual_seed(0)
    draws = [B.sample_skipped_blocks(blocks, 0.25, g) for _ in range(400)]
    assert abs(sum(map(len, draws)) / 4000 - 0.25) < 0.03
    assert B.sample_skipped_blocks(blocks, 0.0, g) == [] and len(B.sample_skipped_blocks(blocks, 1.0, g)) == 10


def test_block_latencies_name_every_block(unet):
    other = copy.deepcopy(unet)
    skipping = B.BlockSkipping(other)
    result = B.block_latencies(other, skipping, _inputs(other), repeats=2)
    assert result["unet"] > 0 and set(result["saved"]) == {b.name for b in skipping.blocks}


ROBUST_TINY = dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=0, skip_probability=0.3)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "tiny-sd15"
    build_tiny_pipeline("sd15", seed=0).save_pretrained(path)
    return path


def test_robust_training_skips_blocks_and_learns_to_do_without_them(tiny_teacher):
    """Trained with blocks skipped, the UNet's loss with those blocks skipped falls, and (the teacher term weighted up,
    so that fitting the tiny batch does not pull it away) it comes closer to the full teacher without them; the
    teacher stays frozen."""
    from fewstep.training.loop import training_loop
    from fewstep.training.pipelines import load_teacher

    pipe = load_teacher(tiny_teacher)
    model = S.RobustTraining(pipe, S.load_config("proxy", **{**ROBUST_TINY, "distill_weight": 100.0}))
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    size = pipe.unet.config.sample_size
    batch = {"latents": torch.randn(8, 4, size, size, generator=torch.Generator().manual_seed(0)),
             "captions": ["a cat", "the digit 3", "a horse", "the digit 7"] * 2}

    def skipped_loss():   # always the same draw: skip probability 0.3 at a fixed seed
        return model(batch, torch.Generator().manual_seed(3))

    before = skipped_loss()
    assert before["skipped_blocks"][0] > 0
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        trained = training_loop(run_dir, model, lambda m, b, g: m(b, g), lambda g: batch, 30, lr=1e-3, ema_decay=None,
                                progress=False, checkpoint_every=100)
    after = skipped_loss()
    assert after["loss"].mean() < 0.8 * before["loss"].mean()
    assert after["teacher"].mean() < 0.8 * before["teacher"].mean()
    assert all(torch.equal(v, teacher[k]) for k, v in trained.teacher.state_dict().items())


def test_robust_training_resumes_and_writes_a_pipeline_with_the_teachers_keys(tiny_teacher, proxy_data, tmp_path):
    from safetensors.torch import load_file

    config = S.load_config("proxy", **ROBUST_TINY)
    run = dict(checkpoint_every=2, sample_every=0, progress=False)
    whole = S.train_robust(tiny_teacher, proxy_data, tmp_path / "whole", tmp_path / "whole-pipe", config, **run)
    assert S.train_robust(tiny_teacher, proxy_data, tmp_path / "cut", tmp_path / "cut-pipe", config, stop_after=3, **run) is None
    resumed = S.train_robust(tiny_teacher, proxy_data, tmp_path / "cut", tmp_path / "cut-pipe", config, **run)
    a = load_file(whole / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    original = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == original.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], original[k]) for k in a)
    assert (whole / "fewstep_teacher.json").is_file()


def test_snap_plan_measures_every_block_on_a_copy_and_writes_json(tiny_teacher, tmp_path, capsys):
    import json

    from fewstep.training.cli import main
    from fewstep.training.pipelines import load_teacher

    out = tmp_path / "plan.json"
    assert main(["snap", "plan", "--teacher", str(tiny_teacher), "--per-class", "1", "--steps", "2", "--repeats", "1",
                 "--budget", "0.8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = json.loads(out.read_text())
    names = [b.name for b in B.unet_blocks(load_teacher(tiny_teacher).unet)]
    assert [r["block"] for r in table["blocks"]] == names and all(name in printed for name in names)
    assert all(set(r) >= {"latency_saved", "fid", "fid_increase", "prompt_accuracy"} for r in table["blocks"])
    assert table["quality"]["samples"] == 20 and "proposal" in table and "for a pass within 0.8" in printed
    assert table["teacher"] == str(tiny_teacher.resolve()) and "fewstep snap slim --plan" in printed
    assert table["dtype"] == "float32"
    assert main(["snap", "plan", "--teacher", str(tiny_teacher), "--latency-only", "--repeats", "1", "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FID" not in printed and "bfloat16" in printed
    table = json.loads(out.read_text())
    assert table["dtype"] == "bfloat16" and [r["block"] for r in table["blocks"]] == names and "quality" not in table
    assert main(["snap", "plan", "--teacher", str(tiny_teacher), "--budget", "1.5"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_snap_slim_builds_the_planned_unet_from_the_plan_file_and_resumes(tiny_teacher, tmp_path, capsys):
    """The plan's architecture (here: no mid block) comes out as the pipeline's UNet, loadable by diffusers with no
    missing key, initialised from and trained towards the teacher; a cut run resumes to the same weights."""
    import json

    from diffusers import UNet2DConditionModel

    from fewstep.training.cli import main
    from fewstep.training.methods.snap_architecture import SlimArchitecture
    from fewstep.training.pipelines import load_teacher

    teacher = load_teacher(tiny_teacher)
    full = SlimArchitecture.of_teacher(teacher.unet.config)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"teacher": str(tiny_teacher), "proposal": {"architecture": {**full.to_dict(), "mid": False}}}))
    common = ["snap", "slim", "--plan", str(plan), "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--sample-every", "0",
              "--checkpoint-every", "2", "--ema-decay", "0"]
    assert main(common + ["--run-dir", str(tmp_path / "whole"), "--out", str(tmp_path / "whole-pipe")]) == 0
    assert main(common + ["--run-dir", str(tmp_path / "cut"), "--out", str(tmp_path / "cut-pipe"), "--stop-after", "2"]) == 0
    assert main(common + ["--run-dir", str(tmp_path / "cut"), "--out", str(tmp_path / "cut-pipe")]) == 0
    assert "slim pipeline written to" in capsys.readouterr().out
    whole, info = UNet2DConditionModel.from_pretrained(tmp_path / "whole-pipe" / "unet", output_loading_info=True)
    assert not any(info.values()) and whole.mid_block is None
    resumed = UNet2DConditionModel.from_pretrained(tmp_path / "cut-pipe" / "unet")
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    moved = [k for k, v in whole.state_dict().items() if not torch.equal(v, teacher.unet.state_dict()[k])]
    assert moved and all(not k.startswith("mid_block") for k in whole.state_dict())
    made = json.loads((tmp_path / "whole-pipe" / "fewstep_teacher.json").read_text())
    assert made["architecture"]["mid"] is False and made["slim_of"] == str(tiny_teacher)
    plan.write_text("{}")
    assert main(common + ["--run-dir", str(tmp_path / "bad")]) == 2
    assert "snap plan --out" in capsys.readouterr().err


def _round_batch(pipe, n=4):
    size = pipe.unet.config.sample_size
    return {"latents": torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(0)),
            "captions": ["a cat", "the digit 3", "a horse", "the digit 7"][:n]}


def test_a_snapfusion_round_is_cfg_aware_in_the_share_of_batches_asked(tiny_teacher):
    """p = 0: the plain progressive loss only. p = 1: the student's CFG'd x0 (CFGDenoiser over the student, the
    binding sampling uses) against the CFG'd teacher's two-step target, plus gamma times the plain loss."""
    from fewstep.core.parameterization import distillation_weight
    from fewstep.training.diffusers_sampling import CFGDenoiser, UNetDenoiser
    from fewstep.training.pipelines import PromptEncoder, load_teacher

    pipe = load_teacher(tiny_teacher)
    schedule = schedule_of(pipe)
    student = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = _round_batch(pipe)
    plain = S.SnapRound(pipe, student, pipe.unet, S.SnapConfig(cfg_probability=0.0), schedule, 4)
    assert set(plain(batch, torch.Generator().manual_seed(1))) == {"loss", "original"}
    config = S.SnapConfig(cfg_probability=1.0, cfg_original_weight=0.2)
    aware = S.SnapRound(pipe, student, pipe.unet, config, schedule, 4)
    with torch.no_grad():
        terms = aware(batch, torch.Generator().manual_seed(1))
    torch.testing.assert_close(terms["loss"], terms["cfg"] + 0.2 * terms["original"])
    # The same draws by hand: the grid point, the coin, the scales.
    gen = torch.Generator().manual_seed(1)
    x, sigma, sigma_mid, sigma_next = aware.grid.draw(batch["latents"], gen)
    assert torch.rand((), generator=gen) < 1.0
    scale = 2.0 + 12.0 * torch.rand(4, generator=gen)
    cond, uncond = PromptEncoder(pipe).with_unconditional(batch["captions"])
    teacher = CFGDenoiser(UNetDenoiser(pipe.unet, schedule), cond, uncond, scale)
    target = S.RoundGrid.target(teacher, x, sigma, sigma_mid, sigma_next)
    with torch.no_grad():
        guided = CFGDenoiser(UNetDenoiser(student, schedule), cond, uncond, scale)(x, sigma)
    expected = distillation_weight(sigma, "x") * (guided - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms["cfg"], expected, rtol=1e-4, atol=1e-6)


def test_a_snapfusion_round_learns_one_step_where_its_teacher_takes_two(proxy_data):
    """On the proxy teacher, one fixed CFG-aware batch (grid points, noise, coin and scales fixed): the student, which
    starts as its teacher, learns to land in one guided DDIM step where the guided teacher lands in two."""
    from fewstep.training.bundled import BUNDLED_TEACHER
    from fewstep.training.teacher_data import load_teacher_data

    from .test_guided import _fit_fixed_batch

    setup = load_teacher_data(BUNDLED_TEACHER, proxy_data)
    teacher = setup.pipe.unet.requires_grad_(False)
    batch = setup.batch_fn(16)(torch.Generator().manual_seed(0))
    model = S.SnapRound(setup.pipe, copy.deepcopy(teacher).requires_grad_(True), teacher, S.SnapConfig(cfg_probability=1.0),
                        schedule_of(setup.pipe), 2)
    losses = _fit_fixed_batch(model, batch)
    assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_snap_distill_writes_a_snap_student_per_round_and_resumes(tiny_teacher, tmp_path, capsys):
    from fewstep.core.adapter_file import read_adapter
    from fewstep.training.cli import main
    from fewstep.training.pipelines import load_teacher
    from fewstep.training.students import SnapStudent

    common = ["snap", "distill", "--teacher", str(tiny_teacher), "--start-steps", "8", "--target-steps", "2",
              "--round-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--ema-decay", "0", "--cfg-probability", "0.5",
              "--sample-cfg-scale", "3", "--sample-every", "2", "--checkpoint-every", "1"]
    assert main(common + ["--run-dir", str(tmp_path / "whole")]) == 0
    assert main(common + ["--run-dir", str(tmp_path / "cut"), "--stop-after", "4"]) == 0
    assert (tmp_path / "cut" / "round-04steps" / "snap_student.safetensors").is_file()
    assert not (tmp_path / "cut" / "round-02steps" / "snap_student.safetensors").exists()
    assert main(common + ["--run-dir", str(tmp_path / "cut")]) == 0
    assert "snap_student written to" in capsys.readouterr().out
    whole = read_adapter(tmp_path / "whole" / "snap_student.safetensors")
    resumed = read_adapter(tmp_path / "cut" / "snap_student.safetensors")
    assert all(torch.equal(v, resumed.tensors[k]) for k, v in whole.tensors.items())
    meta = whole.metadata
    assert (meta.kind, meta.steps, meta.timesteps, meta.sampler, meta.extra["cfg_scale"]) == ("snap_student", 2, [999, 499], "ddim", 3.0)
    assert meta.provenance["round"] == "4 -> 2 steps" and meta.provenance["config"]["cfg_probability"] == 0.5
    assert (tmp_path / "whole" / "round-02steps" / "samples" / "step-00000002.png").is_file()
    images = SnapStudent(load_teacher(tiny_teacher), tmp_path / "whole" / "snap_student.safetensors").images(["a cat"], [0])
    assert images.shape[0] == 1
    assert main(common + ["--run-dir", str(tmp_path / "bad"), "--target-steps", "3"]) == 2
    assert "power of two" in capsys.readouterr().err
