"""core.samplers against diffusers' schedulers on the same UNet and noise, plus toy denoisers with exact answers."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

from fewstep.core import samplers as K
from fewstep.core.parameterization import start_noise_scaling
from fewstep.core.schedule import DiscreteSchedule, select_timesteps
from fewstep.training.diffusers_sampling import UNetDenoiser, run_sampler
from fewstep.training.tiny_models import sd_scheduler_config

SD = DiscreteSchedule.stable_diffusion()
SEED = 1234
F64 = torch.float64


def _start_latent(shape=(2, 4, 8, 8), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _reference(scheduler_cls, n, **config):
    """A diffusers scheduler set to n steps, holding our float64 schedule (equal to its own to 1e-6, see
    test_schedule) so that the comparison isolates the sampling algorithm from float32 table rounding."""
    scheduler = scheduler_cls(**sd_scheduler_config(), **config)
    scheduler.alphas_cumprod = SD.alphas_cumprod.clone()
    scheduler.set_timesteps(n)
    return scheduler


@pytest.fixture(scope="module")
def unet64(tiny_sd15_unet):
    """The tiny UNet in float64: an untrained UNet's x0 reaches |40| at sigma_max, beyond float32's 1e-5."""
    import copy

    return copy.deepcopy(tiny_sd15_unet).to(F64)


@pytest.fixture
def context64(text_context):
    return text_context.to(F64)


def _diffusers_loop(scheduler, unet, context, latents, step_kwargs=None):
    """The loop diffusers' pipelines run; returns (final sample, per-step samples, last output)."""
    samples, outputs = [], []
    for t in scheduler.timesteps:
        samples.append(latents)
        eps = unet(latents, t, encoder_hidden_states=context).sample
        out = scheduler.step(eps, t, latents, return_dict=False, **(step_kwargs or {}))
        latents = out[0]
        outputs.append(out)
    return latents, samples, outputs


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_consistency_reproduces_lcm_scheduler(n, unet64, context64):
    ref = _reference(LCMScheduler, n)
    noise = _start_latent(dtype=F64)
    _, _, outputs = _diffusers_loop(ref, unet64, context64, noise, {"generator": torch.Generator().manual_seed(SEED)})
    expected = outputs[-1][1]  # LCMScheduler returns (prev_sample, denoised); pipelines decode the last denoised

    model = UNetDenoiser(unet64, SD, consistency_boundary=True)
    sigmas = SD.sigmas_for_timesteps(select_timesteps("lcm", n), dtype=F64)
    got = run_sampler(K.sample_consistency, model, noise, sigmas, {"encoder_hidden_states": context64}, seed=SEED, progress=False)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("gamma", [0.3, 0.7])
def test_consistency_with_gamma_reproduces_tcd_scheduler(gamma, unet64, context64):
    ref = _reference(TCDScheduler, 4)
    noise = _start_latent(dtype=F64)
    _, ref_samples, outputs = _diffusers_loop(
        ref, unet64, context64, noise, {"eta": gamma, "generator": torch.Generator().manual_seed(SEED)}
    )
    seen = []
    sigmas = SD.sigmas_for_timesteps(ref.timesteps.tolist(), dtype=F64)
    got = run_sampler(K.sample_consistency, UNetDenoiser(unet64, SD), noise, sigmas, {"encoder_hidden_states": context64},
                      seed=SEED, progress=False, callback=seen.append, gamma=gamma, schedule=SD)
    # Every intermediate state agrees (diffusers' samples are DDPM-scaled: times sqrt(1 + sigma^2) to sigma space).
    for info, ref_x, t in zip(seen, ref_samples, ref.timesteps):
        assert (info["x"] - ref_x * start_noise_scaling(SD.sigmas[t])).abs().max() < 1e-5
    # TCDScheduler's last output is still noised to timestep 0: sqrt(a_0) (x0 + sigma(0) eps). Ours is the x0 itself.
    last = seen[-1]
    eps_hat = (last["x"] - last["denoised"]) / last["sigma"]
    x0_plus_noise = outputs[-1][1] / SD.alphas_cumprod[0].sqrt()
    assert torch.equal(got, last["denoised"])
    assert (got + SD.sigmas[0] * eps_hat - x0_plus_noise).abs().max() < 1e-5


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_reproduces_ddim_scheduler(n, spacing, unet64, context64):
    ref = _reference(DDIMScheduler, n, set_alpha_to_one=True, steps_offset=1, timestep_spacing=spacing, clip_sample=False)
    noise = _start_latent(dtype=F64)
    expected, _, _ = _diffusers_loop(ref, unet64, context64, noise)
    sigmas = SD.sigmas_for_timesteps(select_timesteps(spacing, n), dtype=F64)
    got = run_sampler(K.sample_ddim, UNetDenoiser(unet64, SD), noise, sigmas, {"encoder_hidden_states": context64}, progress=False)
    assert (got - expected).abs().max() < 1e-5


def test_ddim_with_eta_reproduces_ddim_scheduler(unet64, context64):
    ref = _reference(DDIMScheduler, 4, set_alpha_to_one=True, timestep_spacing="trailing", clip_sample=False)
    noise = _start_latent(dtype=F64)
    expected, _, _ = _diffusers_loop(ref, unet64, context64, noise, {"eta": 0.5, "generator": torch.Generator().manual_seed(SEED)})
    sigmas = SD.sigmas_for_timesteps(select_timesteps("trailing", 4), dtype=F64)
    got = run_sampler(K.sample_ddim, UNetDenoiser(unet64, SD), noise, sigmas, {"encoder_hidden_states": context64},
                      seed=SEED, progress=False, eta=0.5)
    assert (got - expected).abs().max() < 1e-5


def test_float32_sampling_agrees_with_lcm_scheduler_relative_to_scale(tiny_sd15_unet, text_context):
    """The everyday float32 path with diffusers' own float32 tables: equal up to float32 rounding."""
    ref = LCMScheduler(**sd_scheduler_config())
    ref.set_timesteps(4)
    noise = _start_latent()
    _, _, outputs = _diffusers_loop(ref, tiny_sd15_unet, text_context, noise, {"generator": torch.Generator().manual_seed(SEED)})
    got = run_sampler(K.sample_consistency, UNetDenoiser(tiny_sd15_unet, SD, consistency_boundary=True), noise,
                      SD.sigmas_for_timesteps(select_timesteps("lcm", 4)), {"encoder_hidden_states": text_context},
                      seed=SEED, progress=False)
    expected = outputs[-1][1]
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


class _Dirac:
    """The exact denoiser of a one-point data distribution: always returns that point."""

    def __init__(self, point):
        self.point = point

    def __call__(self, x, sigma, **_):
        return self.point.expand_as(x).clone()


@pytest.mark.parametrize("name", ["consistency", "ddim", "stochastic"])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_every_sampler_lands_on_the_data_point(name, n):
    point = torch.full((1, 4, 2, 2), 0.37)
    sigmas = SD.sigmas_for_timesteps(select_timesteps("trailing", n))
    x = _start_latent((3, 4, 2, 2)) * sigmas[0]
    out = K.get_sampler(name)(_Dirac(point), x, sigmas, extra_args={"seed": 0})
    torch.testing.assert_close(out, point.expand_as(out))


def test_stochastic_sampler_steps_twice_then_renoises_once():
    """Meng et al.'s stochastic sampler, worked out by hand for three steps with the Gaussian denoiser D = x / (1 + s^2)."""
    D = lambda x, s, **_: x / (1 + s**2)  # exact x0-predictor for unit-Gaussian data
    s0, s1, s2 = 8.0, 2.0, 0.5
    sigmas = torch.tensor([s0, s1, s2, 0.0])
    x = torch.tensor([[3.0]])
    noises = iter([torch.tensor([[0.4]]), torch.tensor([[-1.1]])])
    out = K.sample_stochastic(lambda x, s, **kw: D(x, s), x, sigmas, noise_sampler=lambda a, b: next(noises))

    def ddim(x, s_from, s_to):
        d = D(x, s_from)
        return d + (x - d) * s_to / s_from

    x1 = ddim(x, s0, s2) + math.sqrt(s1**2 - s2**2) * 0.4  # double-length step, then back up to s1
    x2 = ddim(x1, s1, 0.0) + s2 * -1.1  # to sigmas[3] = 0, then back up to s2
    x3 = ddim(x2, s2, 0.0)  # last step deterministic
    assert out.item() == pytest.approx(x3.item(), rel=1e-6)


def test_callback_reports_each_step_with_k_diffusion_keys():
    seen = []
    sigmas = SD.sigmas_for_timesteps([999, 499, 249])
    K.sample_consistency(_Dirac(torch.zeros(1, 4, 2, 2)), torch.randn(1, 4, 2, 2) * sigmas[0], sigmas, callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2]
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_seed_in_extra_args_makes_sampling_reproducible():
    model = lambda x, s, **_: 0.5 * x / (1 + s**2)
    sigmas = SD.sigmas_for_timesteps(select_timesteps("lcm", 4))
    x = torch.randn(1, 4, 4, 4) * sigmas[0]
    a = K.sample_consistency(model, x, sigmas, extra_args={"seed": 3})
    b = K.sample_consistency(model, x, sigmas, extra_args={"seed": 3})
    c = K.sample_consistency(model, x, sigmas, extra_args={"seed": 4})
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_onestep_takes_one_pass_and_rejects_more_steps():
    calls = []
    model = lambda x, s, **_: calls.append(s) or torch.zeros_like(x)
    sigmas = SD.sigmas_for_timesteps([999])
    out = K.sample_onestep(model, torch.randn(2, 4, 2, 2), sigmas)
    assert len(calls) == 1 and torch.equal(out, torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"takes sigmas \[sigma_start, 0\]; got 2 steps"):
        K.sample_onestep(model, torch.randn(1, 4, 2, 2), SD.sigmas_for_timesteps([999, 499]))


def test_unknown_names_and_options_are_rejected():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        K.get_sampler("euler")
    with pytest.raises(ValueError, match="gamma must be in"):
        K.sample_consistency(_Dirac(torch.zeros(1)), torch.zeros(1, 1), torch.tensor([1.0, 0.0]), gamma=1.5)


@pytest.mark.parametrize("t", [0, 1, 5, 20, 259, 999])
def test_consistency_boundary_matches_lcm_scheduler(t):
    from fewstep.core.parameterization import consistency_boundary_scalings

    ref_skip, ref_out = LCMScheduler(**sd_scheduler_config()).get_scalings_for_boundary_condition_discrete(t)
    c_skip, c_out = consistency_boundary_scalings(torch.tensor(t))
    assert float(c_skip) == pytest.approx(float(ref_skip), rel=1e-9) and float(c_out) == pytest.approx(float(ref_out), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n,start", [(4, 0), (16, 0), (32, 0), (32, 8), (32, 24)])
def test_dpmpp_2m_reproduces_dpm_solver_multistep(n, start, unet64, context64):
    """Flash's teacher rollout: the full trailing grid, and the tail of it from a start index (first order there)."""
    from diffusers import DPMSolverMultistepScheduler

    ref = _reference(DPMSolverMultistepScheduler, n, timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2)
    sigmas = SD.sigmas_for_timesteps(select_timesteps("trailing", n), dtype=F64)
    x = _start_latent(dtype=F64) * start_noise_scaling(sigmas[start])
    # diffusers starts mid-grid from its own step index: set it as a pipeline resuming at `start` would.
    ref._step_index = start
    latents = x / start_noise_scaling(sigmas[start])
    for t in ref.timesteps[start:]:
        eps = unet64(latents, t, encoder_hidden_states=context64).sample
        latents = ref.step(eps, t, latents, return_dict=False)[0]
    got = K.sample_dpmpp_2m(UNetDenoiser(unet64, SD), x, sigmas[start:], extra_args={"encoder_hidden_states": context64})
    assert (got - latents).abs().max() < 1e-5 * latents.abs().max()
