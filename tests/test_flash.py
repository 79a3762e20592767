"""Flash Diffusion: the method's schedule, training on real teachers, resume, export through diffusers' and PEFT's loaders."""
import copy
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.core import lora as L
from fewstep.core.adapter_file import AdapterFileError, read_adapter
from fewstep.core.parameterization import start_noise_scaling
from fewstep.core.samplers import sample_ddim, sample_dpmpp_2m
from fewstep.core.schedule import DiscreteSchedule, select_timesteps
from fewstep.training.bundled import BUNDLED_FLASH, BUNDLED_TEACHER
from fewstep.training.cli import main
from fewstep.training.data import CaptionedImages, load_proxy_dataset
from fewstep.training.diffusers_sampling import CFGDenoiser, UNetDenoiser
from fewstep.training.driver import student_lora_modules
from fewstep.training.methods import flash as F
from fewstep.training.pipelines import PromptEncoder, load_teacher
from fewstep.training.students import AdaptedTeacher
from fewstep.training.tiny_models import build_tiny_pipeline

SD = DiscreteSchedule.stable_diffusion()


def test_start_index_mixture_puts_the_phase_probabilities_on_the_grid_modes():
    config = F.FlashConfig()
    for phase, probs in enumerate(config.mode_probs):
        p = F.start_index_probabilities(config, phase)
        assert p.shape == (32,) and p.sum() == pytest.approx(1.0)
        at_modes = p[[0, 8, 16, 24]]
        # Modes are far apart for var 0.5, so each mode's mass is its probability share (times the same bump).
        assert (at_modes / at_modes.sum()).tolist() == pytest.approx(list(probs), abs=1e-6)
    assert F.start_index_probabilities(config, 0)[:12].sum() < 1e-6   # phase 0 never starts above t ~ 624


def test_phases_follow_the_step_counts():
    config = F.FlashConfig(phase_steps=(2, 3, 1, 4))
    assert [config.phase(s) for s in range(12)] == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3]
    assert config.total_steps == 10


def test_exported_timesteps_are_the_training_modes():
    assert F.export_timesteps(F.FlashConfig()) == [999, 749, 499, 249]
    assert F.export_timesteps(F.PRESETS["proxy"]) == [999, 749, 499, 249]


def test_shared_rollout_start_indices_each_follow_the_phase_mixture():
    config = F.FlashConfig(teacher_steps=8, pairs_per_rollout=4)
    gen = torch.Generator().manual_seed(0)
    for phase in (0, 3):
        draws = torch.cat([F.start_indices(config, phase, gen) for _ in range(3000)])
        observed = torch.bincount(draws, minlength=8).double() / len(draws)
        assert observed.tolist() == pytest.approx(F.start_index_probabilities(config, phase).tolist(), abs=0.015)


def test_a_shared_rollout_trains_on_its_own_states_at_a_fraction_of_the_teacher_batch():
    """pairs_per_rollout 4 on a batch of 8: the teacher's rollout passes carry 2 samples (x2 for CFG), and every
    student input is a state the rollout passed through, at that state's noise level, for that sample's caption."""
    pipe = build_tiny_pipeline("sd15", seed=0)
    config = F.FlashConfig(**{**TINY, "batch_size": 8}, pairs_per_rollout=4, mode_probs=((0.25, 0.25, 0.25, 0.25),) * 4)
    model = F.build_distillation(pipe, config)
    teacher_inputs, student_inputs = [], []
    model.teacher.register_forward_pre_hook(lambda m, a, kw: teacher_inputs.append((a[0], a[1], kw["encoder_hidden_states"])),
                                            with_kwargs=True)
    model.student.register_forward_pre_hook(lambda m, a, kw: student_inputs.append((a[0], a[1], kw["encoder_hidden_states"])),
                                            with_kwargs=True)
    z = torch.randn(8, 4, 8, 8)
    captions = [f"a photo of object {i}" for i in range(8)]
    for seed in range(3):
        teacher_inputs.clear(), student_inputs.clear()
        terms = model({"latents": z, "captions": captions, "step": 0}, torch.Generator().manual_seed(seed))
        assert terms["loss"].shape == (8,)
        rollout = [(x[:2], t[:2], text[:2]) for x, t, text in teacher_inputs if len(x) == 4]   # the cond half
        assert rollout, [len(x) for x, *_ in teacher_inputs]
        x, t, text = student_inputs[0]
        assert len(x) == 8
        for pair in range(8):
            sample = pair % 2
            assert any(torch.equal(x[pair], rx[sample]) and t[pair] == rt[sample] and torch.equal(text[pair], rtext[sample])
                       for rx, rt, rtext in rollout), (seed, pair)


def test_student_inputs_are_the_students_own_ddim_step_from_the_rollout_start():
    """student_inputs 1: a start point past the rollout's first gets x0 + (x_start - x0) sigma_i / sigma_start, the
    deterministic DDIM step of the student's own x0 from the rollout's start (2-step sampling's second input), at its
    noise level; a start point at the rollout's start keeps the start."""
    pipe = build_tiny_pipeline("sd15", seed=0)
    config = F.FlashConfig(**{**TINY, "batch_size": 8}, pairs_per_rollout=4, student_inputs=1.0, sampler="ddim",
                           mode_probs=((0.25, 0.25, 0.25, 0.25),) * 4, dmd_weights=(0.0,) * 4)
    model = F.build_distillation(pipe, config)
    calls = []
    model.student.register_forward_pre_hook(lambda m, a, kw: calls.append((a[0], a[1], kw["encoder_hidden_states"])),
                                            with_kwargs=True)
    z, captions = torch.randn(8, 4, 8, 8), [f"a photo of object {i}" for i in range(8)]
    moved = 0
    for seed in range(4):
        calls.clear()
        model({"latents": z, "captions": captions, "step": 0}, torch.Generator().manual_seed(seed))
        (first, t_first, text_first), (x, t, text) = calls[0], calls[-1]
        if len(first) == 8:   # every start point drew the rollout's start: nothing to replace
            continue
        sigma_start = SD.sigma(t_first[0])
        start = first * (sigma_start**2 + 1).sqrt()                       # undo the UNet input scaling
        with torch.no_grad():
            x0 = UNetDenoiser(model.student, model.schedule, consistency_boundary=True)(
                start, sigma_start.expand(2), encoder_hidden_states=text_first)
        for pair in range(8):
            sample, sigma = pair % 2, SD.sigma(t[pair])
            expected = start[sample] if t[pair] == t_first[0] else x0[sample] + (start[sample] - x0[sample]) * sigma / sigma_start
            moved += int(t[pair] != t_first[0])
            assert torch.allclose(x[pair] * (sigma**2 + 1).sqrt(), expected, atol=1e-4), (seed, pair)
            assert torch.equal(text[pair], text_first[sample])
    assert moved >= 4
    with pytest.raises(ValueError, match="student_inputs .* needs pairs_per_rollout > 1"):
        F.load_config("paper", student_inputs=0.5)


def test_lazy_dmd_comes_every_interval_steps_at_interval_times_the_weight():
    pipe = build_tiny_pipeline("sd15", seed=0)
    config = F.FlashConfig(**TINY, dmd_interval=3, dmd_weights=(0.5,) * 4, adversarial_weights=(0.0,) * 4)
    model = F.build_distillation(pipe, config)
    batch = {"latents": torch.randn(4, 4, 8, 8), "captions": ["a photo"] * 4}
    for step in range(4):
        terms = model({**batch, "step": step}, torch.Generator().manual_seed(step))
        assert ("dmd" in terms) == (step % 3 == 0), step
        expected = terms["distill"] + 1.5 * terms.get("dmd", 0.0) + terms["discriminator"]
        assert torch.allclose(terms["loss"], expected), step


def test_dmd2_fake_score_learns_every_step_and_the_student_every_interval_without_a_rollout():
    """fake_score separate, generator_interval 3, no distillation: the student gets gradient only every third step;
    the fake score (the teacher at first) gets the denoising loss every step and stands in for the student in DMD;
    with nothing reading it, the teacher's multistep rollout is never run."""
    pipe = build_tiny_pipeline("sd15", seed=0)
    config = F.FlashConfig(**TINY, fake_score="separate", generator_interval=3, distill_weights=(0.0,) * 4,
                           dmd_weights=(1.0,) * 4, adversarial_weights=(0.1,) * 4)
    model = F.build_distillation(pipe, config)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(model.fake_score(x, t, text).sample, model.teacher(x, t, text).sample)
    teacher_batches, fake_calls = [], []
    model.teacher.register_forward_pre_hook(lambda m, a: teacher_batches.append(len(a[0])))
    model.fake_score.register_forward_pre_hook(lambda m, a: fake_calls.append(len(a[0])))
    batch = {"latents": torch.randn(4, 4, 8, 8), "captions": ["a photo"] * 4}
    for step in range(4):
        teacher_batches.clear(), fake_calls.clear()
        terms = model({**batch, "step": step}, torch.Generator().manual_seed(step))
        model.zero_grad(set_to_none=True)
        terms["loss"].mean().backward()
        student_grads = [p.grad for p in model.student.parameters() if p.requires_grad]
        fake_grads = [p.grad for p in model.fake_score.parameters() if p.requires_grad]
        generator_step = step % 3 == 0
        assert "distill" not in terms and ("dmd" in terms) == generator_step, step
        assert all(g is not None for g in student_grads) == generator_step, step
        assert all(g is None for g in student_grads) != generator_step, step
        assert all(g is not None for g in fake_grads), step
        # DMD: one fake-score pass beside its own loss's; the teacher: CFG (2x batch) for DMD, features (2x) for the head
        assert fake_calls == [4, 4] if generator_step else fake_calls == [4], (step, fake_calls)
        assert sorted(teacher_batches) == ([8, 8] if generator_step else [8]), (step, teacher_batches)
    with pytest.raises(ValueError, match="generator_interval > 1 needs fake_score 'separate'"):
        F.load_config("paper", generator_interval=5)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"lora_rnak \(did you mean lora_rank\?\)"):
        F.load_config("paper", lora_rnak=4)
    with pytest.raises(ValueError, match="dmd_weights has 3 entries but there are 4 phases"):
        F.load_config("paper", dmd_weights=[0, 1, 1])
    with pytest.raises(ValueError, match="distill_loss 'lpips' needs lpips_weights"):
        F.load_config("paper", distill_loss="lpips")
    with pytest.raises(ValueError, match="unknown Flash preset"):
        F.load_config("fast")
    with pytest.raises(ValueError, match="sampler 'euler' is not one of consistency, ddim"):
        F.load_config("paper", sampler="euler")


def test_config_file_sits_between_preset_and_flags(tmp_path):
    path = tmp_path / "flash.json"
    path.write_text(json.dumps({"lora_rank": 16, "phase_steps": [1, 2, 3, 4], "gan_loss": "hinge"}))
    config = F.load_config("paper", path, lora_rank=8)
    assert (config.lora_rank, config.phase_steps, config.gan_loss, config.teacher_steps) == (8, (1, 2, 3, 4), "hinge", 32)
    path.write_text(json.dumps({"gan_los": "hinge"}))
    with pytest.raises(ValueError, match="gan_los"):
        F.load_config("paper", path)


def _tiny_teacher(tmp_path, base="sd15"):
    path = tmp_path / f"tiny-{base}"
    build_tiny_pipeline(base, seed=0).save_pretrained(path)
    return path


TINY = dict(lora_rank=4, teacher_steps=8, phase_steps=(2, 2, 2, 2), batch_size=4, lr=1e-3, disc_lr=1e-3)


@pytest.mark.parametrize("base,options", [("sd15", {}), ("sdxl", {}),
                                          ("sd15", {"fake_score": "separate", "generator_interval": 2})])
def test_kill_and_resume_gives_the_uninterrupted_result(base, options, tmp_path, proxy_data):
    teacher = _tiny_teacher(tmp_path, base)
    config = F.load_config("proxy", **TINY, **options)
    kw = dict(sample_every=0, checkpoint_every=3, progress=False)
    F.train_flash(teacher, proxy_data, tmp_path / "straight", tmp_path / "a.safetensors", config, **kw)
    assert F.train_flash(teacher, proxy_data, tmp_path / "killed", tmp_path / "b.safetensors", config, stop_after=5, **kw) is None
    assert not (tmp_path / "b.safetensors").exists()
    F.train_flash(teacher, proxy_data, tmp_path / "killed", tmp_path / "b.safetensors", config, **kw)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The LoRA moved away from its init (lora_up starts at zero) in every phase's terms.
    assert max(v.abs().max() for k, v in a.items() if k.endswith("lora_up.weight")) > 0
    terms = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"distill", "dmd", "adversarial", "discriminator", "loss"} <= set(terms)


def test_bf16_autocast_half_teacher_and_gradient_checkpointing_run(tmp_path, proxy_data):
    """The GPU configuration's dtypes (bf16 teacher, fp32 LoRA under autocast), on the CPU."""
    teacher = _tiny_teacher(tmp_path, "sdxl")
    config = F.load_config("proxy", **{**TINY, "phase_steps": (1, 1, 1, 1), "gradient_checkpointing": True})
    out = F.train_flash(teacher, proxy_data, tmp_path / "run", tmp_path / "o.safetensors", config, mixed_precision="bf16",
                        sample_every=2, progress=False)
    assert read_adapter(out).metadata.base == "sdxl"   # written only if every tensor is finite
    assert (tmp_path / "run" / "samples" / "step-00000002-4steps.png").is_file()


def test_distillation_loss_falls_on_the_bundled_teacher(tmp_path, proxy_data):
    """40 steps of the distillation term alone: on fixed batches, noise and start points the student gets much closer
    to the teacher's rollout than at initialisation (where it is the teacher's own one-step prediction)."""
    config = F.load_config("proxy", phase_steps=(40,), mode_probs=((0.25, 0.25, 0.25, 0.25),), distill_weights=(1.0,),
                           dmd_weights=(0.0,), adversarial_weights=(0.0,), batch_size=8, lora_rank=8, lr=1e-3)
    F.train_flash(BUNDLED_TEACHER, proxy_data, tmp_path / "run", tmp_path / "s.safetensors", config, sample_every=0,
                  progress=False, checkpoint_every=100)
    pipe = load_teacher(BUNDLED_TEACHER)
    fresh = F.build_distillation(pipe, config)
    trained = F.build_distillation(load_teacher(BUNDLED_TEACHER), config, init_lora=tmp_path / "s.safetensors")
    batches = [_batch(proxy_data, pipe, start) for start in (0, 4, 8, 12)]
    before = sum(_distill_at(fresh, *b) for b in batches)
    after = sum(_distill_at(trained, *b) for b in batches)
    assert after < 0.85 * before, (before, after)


def _batch(data, pipe, start):
    from fewstep.training.images import to_pixels

    gen = torch.Generator().manual_seed(start)
    idx = torch.randint(len(data), (8,), generator=gen)
    with torch.no_grad():
        z = pipe.vae.encode(to_pixels(data.images[idx.numpy()])).latent_dist.mean * pipe.vae.config.scaling_factor
    return z, [data.captions[i] for i in idx], start


@torch.no_grad()
def _distill_at(model, z, captions, start):
    """The distillation term from grid index ``start`` with fixed noise and CFG 4."""
    cond, uncond = model.prompts.with_unconditional(captions)
    sigmas = model.grid[start:].to(z)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(100 + start))
    x = z + noise * sigmas[0] if start else noise * start_noise_scaling(sigmas[0])
    student = UNetDenoiser(model.student, model.schedule, consistency_boundary=True)(x, sigmas[0].expand(len(z)), **cond)
    target = sample_dpmpp_2m(CFGDenoiser(UNetDenoiser(model.teacher, model.schedule), cond, uncond, 4.0), x, sigmas)
    return model._distill(student, target).mean().item()


def test_bundled_student_beats_the_teacher_at_equal_steps():
    """The shipped proxy Flash LoRA without CFG against the teacher with CFG 4 (twice the NFE):
    at 1 step it lands closer to the teacher's converged sample from the same noise (both deterministic),
    and at 2 steps its samples score a better FID on the fixed prompt set."""
    from fewstep.training.evaluation import StudentEntry, TeacherEntry, evaluate_entry

    pipe = load_teacher(BUNDLED_TEACHER)
    student = AdaptedTeacher(pipe, BUNDLED_FLASH)
    captions = ["a handwritten digit three", "a silhouette of a cat", "a handwritten digit seven", "a silhouette of a horse"] * 4
    seeds = list(range(len(captions)))
    cond, uncond = PromptEncoder(pipe).with_unconditional(captions)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    teacher = CFGDenoiser(UNetDenoiser(pipe.unet, SD), cond, uncond, 4.0)

    def teacher_at(sampler, steps):
        sigmas = SD.sigmas_for_timesteps(select_timesteps("trailing", steps))
        with torch.no_grad():
            return sampler(teacher, noise * start_noise_scaling(sigmas[0]), sigmas)

    reference = teacher_at(sample_dpmpp_2m, 32)
    distance_student = (student.latents(captions, seeds, 1) - reference).pow(2).mean()
    distance_teacher = (teacher_at(sample_ddim, 1) - reference).pow(2).mean()
    assert distance_student < 0.5 * distance_teacher, (float(distance_student), float(distance_teacher))

    flash = evaluate_entry(pipe, StudentEntry(2, str(BUNDLED_FLASH)), per_class=10, batch_size=200)
    ddim = evaluate_entry(pipe, TeacherEntry(2), per_class=10, batch_size=200)
    assert flash["fid"] < ddim["fid"] and flash["nfe"] * 2 == ddim["nfe"], (flash["fid"], ddim["fid"])


def test_the_bundled_students_own_sampler_beats_lcm_renoising():
    """The bundled file names DDIM because it measured better than the paper's LCM re-noising at 4 steps on the
    validation split (bench/results/flash_validation.json: FID 34.5 vs 40.2, class FID 4.0 vs 7.1): the same LoRA,
    the same prompts and seeds, only the sampler differs."""
    from fewstep.training.evaluation import StudentEntry, evaluate_entry

    pipe = load_teacher(BUNDLED_TEACHER)
    assert read_adapter(BUNDLED_FLASH).metadata.sampler == "ddim"
    own = evaluate_entry(pipe, StudentEntry(4, str(BUNDLED_FLASH)), per_class=10, batch_size=200)
    lcm = evaluate_entry(pipe, StudentEntry(4, str(BUNDLED_FLASH), sampler="consistency"), per_class=10, batch_size=200)
    assert own["fid"] < lcm["fid"] - 2, (own["fid"], lcm["fid"])


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny-teacher Flash file per base, alpha != rank so that a loader taking alpha = rank would be caught."""
    root = tmp_path_factory.mktemp("flash")
    data = load_proxy_dataset("train")
    data = CaptionedImages(data.images[:64], data.captions[:64])
    out = {}
    for base in ("sd15", "sdxl"):
        teacher = _tiny_teacher(root, base)
        config = F.load_config("proxy", **{**TINY, "lora_alpha": 2.0, "phase_steps": (1, 1, 1, 1)})
        out[base] = (teacher, F.train_flash(teacher, data, root / f"run-{base}", root / f"{base}.safetensors", config,
                                            sample_every=0, progress=False))
    return out


def _probe(unet, base, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    kw = {"encoder_hidden_states": ctx}
    if base == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2).float()}
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([999, 400]), **kw).sample


def _count_lora_layers(unet):
    return sum(1 for _, m in unet.named_modules() if hasattr(m, "lora_A") and "default_0" in getattr(m, "lora_A", {}))


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_exported_file_loads_in_diffusers_with_every_key_matched(base, trained_tiny):
    teacher, path = trained_tiny[base]
    adapter = read_adapter(path)
    assert adapter.metadata.kind == "flash_lora" and adapter.metadata.base == base and not adapter.inferred
    assert adapter.metadata.sampler == F.PRESETS["proxy"].sampler == "ddim" and F.PRESETS["paper"].sampler == "consistency"
    assert all(k.startswith("lora_unet_") for k in adapter.tensors)
    modules, _ = L.read_lora(adapter.tensors)
    assert {m.alpha for m in modules.values()} == {2.0} and {m.rank for m in modules.values()} == {4}

    pipe = load_teacher(teacher)
    expected_unet = copy.deepcopy(pipe.unet)
    L.merge_lora(expected_unet, modules)
    pipe.load_lora_weights(str(path))
    # Every module of the file became a LoRA layer in diffusers, and the outputs agree: nothing unmatched either way.
    assert _count_lora_layers(pipe.unet) == len(modules)
    assert (_probe(pipe.unet, base) - _probe(expected_unet, base)).abs().max() < 1e-4
    assert (_probe(load_teacher(teacher).unet, base) - _probe(expected_unet, base)).abs().max() > 1e-4


def test_export_to_diffusers_and_peft_keeps_alpha_and_metadata(trained_tiny, tmp_path):
    from peft import PeftModel

    teacher, path = trained_tiny["sd15"]
    assert main(["export", str(path), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors")]) == 0
    assert main(["export", str(tmp_path / "d.safetensors"), "--to", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert main(["export", str(tmp_path / "peft"), "--to", "fewstep", "--out", str(tmp_path / "back.safetensors")]) == 0
    original, back = read_adapter(path), read_adapter(tmp_path / "back.safetensors")
    assert back.metadata.timesteps == original.metadata.timesteps and back.metadata.kind == "flash_lora"
    assert original.tensors.keys() == back.tensors.keys()
    assert all(torch.equal(original.tensors[k].float(), back.tensors[k].float()) for k in original.tensors)

    modules, _ = L.read_lora(original.tensors)
    expected = copy.deepcopy(load_teacher(teacher).unet)
    L.merge_lora(expected, modules)
    pipe = load_teacher(teacher)
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
    assert (_probe(pipe.unet, "sd15") - _probe(expected, "sd15")).abs().max() < 1e-4
    peft_unet = PeftModel.from_pretrained(load_teacher(teacher).unet, str(tmp_path / "peft"))
    assert (_probe(peft_unet, "sd15") - _probe(expected, "sd15")).abs().max() < 1e-4


def test_released_flash_layout_imports_into_our_format(trained_tiny, tmp_path, capsys):
    """Released Flash LoRAs are diffusers files (``unet.<path>.lora.down.weight``, alpha = rank, no metadata)."""
    _, path = trained_tiny["sd15"]
    modules, _ = L.read_lora(read_adapter(path).tensors)
    released = {f"unet.{m}.lora.{part}.weight": getattr(lora, part).float() for m, lora in modules.items() for part in ("down", "up")}
    save_file(released, str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert main(["export", str(tmp_path / "pytorch_lora_weights.safetensors"), "--to", "fewstep", "--out", str(tmp_path / "ours.safetensors")]) == 0
    assert "stores no alpha" in capsys.readouterr().out
    ours = read_adapter(tmp_path / "ours.safetensors")
    assert ours.metadata.base == "sd15" and ours.metadata.sampler == "consistency" and not ours.inferred
    back, _ = L.read_lora(ours.tensors)
    assert set(back) == set(modules) and all(b.alpha == b.rank for b in back.values())


def test_an_sdxl_lora_on_an_sd15_teacher_is_refused_with_the_reason(trained_tiny, tmp_path, capsys):
    teacher, _ = trained_tiny["sd15"]
    _, sdxl_file = trained_tiny["sdxl"]
    with pytest.raises(AdapterFileError, match="adapter is for sdxl .* but the model is sd15"):
        F.build_distillation(load_teacher(teacher), F.load_config("proxy", **TINY), init_lora=sdxl_file)
    with pytest.raises(AdapterFileError, match="adapter is for sdxl"):
        AdaptedTeacher(load_teacher(teacher), sdxl_file)
    assert main(["train", "flash", "--teacher", str(teacher), "--init-lora", str(sdxl_file), "--run-dir", str(tmp_path / "r"),
                 "--phase-steps", "1,1,1,1", "--batch-size", "2", "--lora-rank", "4", "--teacher-steps", "8"]) == 2
    assert "adapter is for sdxl" in capsys.readouterr().err


def test_init_lora_continues_from_a_file(trained_tiny):
    teacher, path = trained_tiny["sd15"]
    model = F.build_distillation(load_teacher(teacher), F.load_config("proxy", **TINY), init_lora=path)
    exported = student_lora_modules(model.student, model.config)
    original, _ = L.read_lora(read_adapter(path).tensors)
    assert set(exported) == set(original)
    assert all(torch.allclose(exported[m].up.float(), original[m].up.float()) and exported[m].alpha == original[m].alpha for m in original)


def test_cli_errors_say_what_was_wrong(tmp_path, capsys):
    assert main(["train", "flash", "--teacher", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"lora_rnak": 4}')
    assert main(["train", "flash", "--config", str(tmp_path / "bad.json"), "--dry-run", "--run-dir", str(tmp_path / "r")]) == 2
    assert "did you mean lora_rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "flash", "--distill-loss", "lpisp"])
    assert main(["train", "flash", "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    options = json.loads((tmp_path / "r" / "training_options.json").read_text())
    assert options["preset"] == "proxy" and options["flash"]["teacher_steps"] == 16


# ComfyUI's view of a real SD1.5 / SDXL UNet (what its model detection finds in the real checkpoints).
COMFY_UNET_CONFIGS = {
    "sd15": dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1),
    "sdxl": dict(num_res_blocks=[2] * 3, channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10),
}
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
               "time_emb_proj", "conv_shortcut")


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_comfyui_loads_every_module_of_our_file_with_its_alpha(base, tmp_path):
    """ComfyUI's own LoRA key map and loader (``comfy.lora``), run in a ComfyUI process, on a file in our layout
    covering every layer a Flash LoRA may adapt in a real-size UNet: every module becomes a patch, with our alpha."""
    import os
    import subprocess
    from pathlib import Path

    from .test_lora import real_unet

    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI to load the file with")
    stubs = Path(os.environ.get("COMFYUI_STUBS", Path(__file__).resolve().parents[2] / "shared" / "hosts" / "stubs"))
    if not stubs.is_dir():
        pytest.skip("ComfyUI's import stubs for torchvision (shared/hosts/stubs) are not here; set COMFYUI_STUBS")
    layers = {n: m for n, m in real_unet(base).named_modules() if n.endswith(LORA_LAYERS)}
    assert len(layers) > 250

    def lora(m):
        spatial = [1, 1] if m.weight.ndim == 4 else []
        return L.LoraModule(torch.zeros(2, m.weight.shape[1], *spatial), torch.zeros(m.weight.shape[0], 2, *spatial), alpha=3.0)

    save_file(L.write_lora({n: lora(m) for n, m in layers.items()}, "kohya"), str(tmp_path / "lora.safetensors"))
    script = """
import json, sys
from types import SimpleNamespace
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.utils
from safetensors.torch import load_file
config = json.loads(sys.argv[2])
ldm = comfy.utils.unet_to_diffusers(config)
model = SimpleNamespace(state_dict=lambda: {"diffusion_model." + v: None for v in ldm.values()},
                        model_config=SimpleNamespace(unet_config=config))
patches = comfy.lora.load_lora(load_file(sys.argv[1]), comfy.lora.model_lora_keys_unet(model, {}))
print(json.dumps({"patches": len(patches), "alphas": sorted({float(p.weights[2]) for p in patches.values()})}))
"""
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{stubs}"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lora.safetensors"), json.dumps(COMFY_UNET_CONFIGS[base])],
                          cwd=path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"patches": len(layers), "alphas": [3.0]}, done.stderr[-2000:]


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_a1111_maps_every_kohya_name_to_a_unet_layer(base):
    """A1111's Lora extension turns our kohya names into compvis layer names with its own
    ``convert_diffusers_name_to_compvis``; every one must name a layer of the real LDM UNet (whose names
    ComfyUI's map lists: the two hosts agree on LDM naming)."""
    import ast
    import os
    import re
    from pathlib import Path

    from .test_lora import real_unet

    a1111, comfyui = os.environ.get("A1111_PATH"), os.environ.get("COMFYUI_PATH")
    if not a1111 or not comfyui:
        pytest.skip("A1111_PATH and COMFYUI_PATH are both needed: A1111's name conversion, ComfyUI's LDM layer names")
    source = (Path(a1111) / "extensions-builtin" / "Lora" / "networks.py").read_text()
    tree = ast.parse(source)
    wanted = {"re_digits", "re_compiled", "suffix_conversion", "convert_diffusers_name_to_compvis"}
    nodes = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in wanted)
             or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in wanted for t in n.targets))]
    namespace = {"re": re}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "networks.py", "exec"), namespace)
    convert = namespace["convert_diffusers_name_to_compvis"]

    sys.path.insert(0, comfyui)
    try:
        from comfy.utils import unet_to_diffusers   # comfy.utils imports no device code
    finally:
        sys.path.remove(comfyui)
    ldm_layers = {"diffusion_model_" + v[: -len(".weight")].replace(".", "_")
                  for v in unet_to_diffusers(COMFY_UNET_CONFIGS[base]).values() if v.endswith(".weight")}
    names = [L.module_to_kohya_name(n) for n, _ in real_unet(base).named_modules() if n.endswith(LORA_LAYERS)]
    unmatched = [n for n in names if convert(n, False) not in ldm_layers]
    assert len(names) > 250 and unmatched == []


def test_teacher_paths_that_cannot_load_say_what_to_pass(tmp_path):
    from fewstep.training.pipelines import TeacherError

    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(TeacherError, match="no model_index.json"):
        load_teacher(tmp_path / "folder")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TeacherError, match="--teacher-config"):
        load_teacher(tmp_path / "model.safetensors")


def test_cli_trains_stops_resumes_and_exports(tmp_path, capsys):
    teacher = _tiny_teacher(tmp_path)
    args = ["train", "flash", "--teacher", str(teacher), "--run-dir", str(tmp_path / "run"), "--phase-steps", "1,1,1,1",
            "--batch-size", "2", "--lora-rank", "2", "--teacher-steps", "8", "--sample-every", "0"]
    assert main(args + ["--stop-after", "2"]) == 0
    assert "stopped after step 2" in capsys.readouterr().out
    assert main(args) == 0
    assert "Flash LoRA written to" in capsys.readouterr().out
    adapter = read_adapter(tmp_path / "run" / "flash_lora.safetensors")
    assert adapter.metadata.provenance["train_steps"] == 4 and adapter.metadata.extra["rank"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]   # resumed at 2, not restarted


def test_every_trainer_resumes_by_default():
    from fewstep.training.cli import build_parser

    parser = build_parser()
    for kind in ("teacher", "flash", "lcm"):
        assert parser.parse_args(["train", kind]).no_resume is False
        assert parser.parse_args(["train", kind, "--resume"]).no_resume is False
        assert parser.parse_args(["train", kind, "--no-resume"]).no_resume is True


def test_two_processes_train_stop_resume_and_export_once(tmp_path):
    """``torchrun``/``accelerate launch`` with two processes (DDP on the CPU, gloo): the run stops, resumes from
    the main process's checkpoint and exports one file, identical to the uninterrupted two-process run."""
    import os
    import subprocess

    teacher = _tiny_teacher(tmp_path)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    def launch(run_dir, *extra):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                               "fewstep.training.cli", "train", "flash", "--teacher", str(teacher), "--run-dir", str(run_dir),
                               "--phase-steps", "1,1,1,1", "--batch-size", "2", "--lora-rank", "2", "--teacher-steps", "8",
                               "--sample-every", "2", "--checkpoint-every", "1", *extra],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert "stopped after step 2" in launch(tmp_path / "cut", "--stop-after", "2")
    assert launch(tmp_path / "cut").count("Flash LoRA written to") == 1
    launch(tmp_path / "whole")
    a, b = (load_file(tmp_path / run / "flash_lora.safetensors") for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "whole" / "samples").glob("step-00000002-*.png")) == \
        ["step-00000002-1steps.png", "step-00000002-2steps.png", "step-00000002-4steps.png"]
