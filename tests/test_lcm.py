"""LCM-LoRA: the consistency loss against diffusers' recipe on fixed inputs, training that resumes exactly, and the file
every host loads (diffusers' loader takes every module)."""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fewstep.core import lora as L
from fewstep.core.adapter_file import read_adapter
from fewstep.training import bench
from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.methods import lcm
from fewstep.training.pipelines import load_teacher
from fewstep.training.tiny_models import build_tiny_pipeline

TINY = dict(lora_rank=4, batch_size=4, lr=1e-3, steps=4)


def _tiny_teacher(tmp_path, base="sd15"):
    path = tmp_path / f"tiny-{base}"
    build_tiny_pipeline(base, seed=0).save_pretrained(path)
    return path


def _recipe_loss(student, teacher, z, cond, uncond, index, noise, scale, solver_steps, loss, scheduler_config):
    """diffusers' ``train_lcm_distill_lora_sd_wds.py`` steps 2-10 for given draws, on its own schedulers' arithmetic."""
    from diffusers import DDPMScheduler, LCMScheduler

    ddpm, lcm_scheduler = DDPMScheduler.from_config(scheduler_config), LCMScheduler.from_config(scheduler_config)
    alphas_cumprod = ddpm.alphas_cumprod
    k = ddpm.config.num_train_timesteps // solver_steps
    ddim_timesteps = torch.from_numpy((np.arange(1, solver_steps + 1) * k).round().astype(np.int64) - 1)
    alpha_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])[index].view(-1, 1, 1, 1)
    start = ddim_timesteps[index]
    end = torch.where(start - k < 0, torch.zeros_like(start), start - k)
    c_skip_start, c_out_start = (c.view(-1, 1, 1, 1) for c in lcm_scheduler.get_scalings_for_boundary_condition_discrete(start))
    c_skip, c_out = (c.view(-1, 1, 1, 1) for c in lcm_scheduler.get_scalings_for_boundary_condition_discrete(end))

    def x0_and_eps(unet, x, t, states):
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = unet(x, t, encoder_hidden_states=states).sample
        return (x - (1 - a).sqrt() * eps) / a.sqrt(), eps

    noisy = ddpm.add_noise(z, noise, start)
    model_pred = c_skip_start * noisy + c_out_start * x0_and_eps(student, noisy, start, cond)[0]
    with torch.no_grad():
        (x0_c, eps_c), (x0_u, eps_u) = (x0_and_eps(teacher, noisy, start, s) for s in (cond, uncond))
        w = (scale - 1).view(-1, 1, 1, 1)   # the recipe's w: x0 = cond + w (cond - uncond)
        x_prev = alpha_prev.sqrt() * (x0_c + w * (x0_c - x0_u)) + (1 - alpha_prev).sqrt() * (eps_c + w * (eps_c - eps_u))
        target = c_skip * x_prev + c_out * x0_and_eps(student, x_prev, end, cond)[0]
    diff = (model_pred - target).flatten(1)
    return ((diff ** 2 + 0.001 ** 2).sqrt() - 0.001).mean(1) if loss == "huber" else (diff ** 2).mean(1)


@pytest.mark.parametrize("loss", ["huber", "l2"])
def test_the_consistency_loss_is_the_recipes_on_fixed_inputs(tmp_path, loss):
    pipe = load_teacher(_tiny_teacher(tmp_path))
    config = lcm.load_config("paper", lora_rank=4, loss=loss)
    model = lcm.build_distillation(pipe, config)
    with torch.no_grad():   # a student that differs from its teacher (lora_up starts at zero)
        for name, p in model.student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 4, 8, 8, generator=gen)
    index, noise = torch.tensor([0, 1, 25, 49]), torch.randn(4, 4, 8, 8, generator=gen)
    scale = torch.tensor([6.0, 9.5, 12.0, 16.0])
    cond, uncond = model.prompts.with_unconditional(["a cat", "a digit seven", "", "a dog"])
    ours = model.losses(z, cond, uncond, index, noise, scale)["loss"]
    reference = _recipe_loss(model.student, model.teacher, z, cond["encoder_hidden_states"], uncond["encoder_hidden_states"],
                             index, noise, scale, config.solver_steps, loss, pipe.scheduler.config)
    assert ours.shape == (4,) and ours.min() > 0
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-7)


def test_the_solver_grid_and_the_exported_timesteps_are_lcms():
    assert lcm.solver_timesteps(50)[:3].tolist() == [19, 39, 59] and lcm.solver_timesteps(50)[-1] == 999
    assert lcm.exported_metadata(lcm.LCMConfig(), "sd15", lcm.DiscreteSchedule.stable_diffusion()).timesteps == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="loss 'l1' is not one of huber, l2"):
        lcm.load_config("paper", loss="l1")
    with pytest.raises(ValueError, match="guidance_min <= guidance_max"):
        lcm.load_config("proxy", guidance_min=7.0)


def test_lcm_trains_resumes_and_writes_a_file_diffusers_loads_whole(tmp_path, proxy_data):
    teacher = _tiny_teacher(tmp_path)
    config = lcm.load_config("paper", **TINY)   # the recipe's targets: every linear and convolution layer
    kw = dict(sample_every=0, checkpoint_every=2, progress=False)
    lcm.train_lcm(teacher, proxy_data, tmp_path / "straight", tmp_path / "a.safetensors", config, **kw)
    assert lcm.train_lcm(teacher, proxy_data, tmp_path / "killed", tmp_path / "b.safetensors", config, stop_after=2, **kw) is None
    lcm.train_lcm(teacher, proxy_data, tmp_path / "killed", tmp_path / "b.safetensors", config, **kw)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(v.abs().max() for k, v in a.items() if k.endswith("lora_up.weight")) > 0

    adapter = read_adapter(tmp_path / "a.safetensors")
    meta = adapter.metadata
    assert (meta.kind, meta.sampler, meta.timesteps, meta.provenance["method"]) == ("flash_lora", "consistency", [999, 759, 499, 259], "lcm")
    assert bench.bench_label(meta) == "lcm"   # not mistaken for a Flash file in a bench set
    modules, _ = L.read_lora(adapter.tensors)
    assert any(name.endswith("time_emb_proj") for name in modules) and any(name.endswith("downsamplers.0.conv") for name in modules)
    pipe = load_teacher(teacher)
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"))
    loaded = sum(1 for _, m in pipe.unet.named_modules() if "default_0" in getattr(m, "lora_A", {}))
    assert loaded == len(modules)


def test_lcm_training_brings_few_step_samples_towards_the_teachers_on_the_bundled_teacher(tmp_path, proxy_data):
    """60 steps on a 5-step solver grid (short, so the boundary's pull reaches pure noise in a test's budget): from the
    same noise, the student's 1- and 2-step samples come closer to the teacher's 25-step CFG 4 samples than the
    untrained student's (the teacher's own) do."""
    from fewstep.core.parameterization import start_noise_scaling
    from fewstep.core.samplers import sample_ddim
    from fewstep.core.schedule import timesteps_lcm, timesteps_trailing
    from fewstep.training.diffusers_sampling import CFGDenoiser, UNetDenoiser
    from fewstep.training.students import sample_student
    from fewstep.training.teacher_data import schedule_of

    config = lcm.load_config("proxy", steps=60, batch_size=8, lr=1e-3, solver_steps=5)
    lcm.train_lcm(BUNDLED_TEACHER, proxy_data, tmp_path / "run", tmp_path / "l.safetensors", config, sample_every=0,
                  progress=False, checkpoint_every=100)
    pipe = load_teacher(BUNDLED_TEACHER)
    schedule, trained = schedule_of(pipe), copy.deepcopy(pipe.unet)
    L.merge_lora(trained, L.read_lora(read_adapter(tmp_path / "l.safetensors").tensors)[0])
    captions, seeds = proxy_data.captions[:32], list(range(32))
    cond, uncond = lcm.PromptEncoder(pipe).with_unconditional(captions)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    sigmas = schedule.sigmas_for_timesteps(timesteps_trailing(25))
    with torch.no_grad():
        teacher = sample_ddim(CFGDenoiser(UNetDenoiser(pipe.unet, schedule), cond, uncond, 4.0), noise * start_noise_scaling(sigmas[0]), sigmas)
        for steps in (1, 2):
            fresh, distilled = ((sample_student(unet, schedule, cond, seeds, timesteps_lcm(steps, 1000, 5)) - teacher).pow(2).mean()
                                for unet in (pipe.unet, trained))
            assert distilled < 0.9 * fresh, (steps, fresh, distilled)
