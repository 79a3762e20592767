"""core.schedule against diffusers' schedulers (independent implementation) and ComfyUI's rules."""
import math
import os

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from fewstep.core import schedule as S
from fewstep.core.parameterization import denoised_from_output
from fewstep.training.tiny_models import sd_scheduler_config

STEP_COUNTS = [1, 2, 4, 8]


def test_sigmas_match_diffusers_alphas_cumprod():
    ref = DDPMScheduler(**sd_scheduler_config()).alphas_cumprod.double()
    ours = S.DiscreteSchedule.stable_diffusion()
    torch.testing.assert_close(ours.alphas_cumprod, ref, rtol=1e-6, atol=0)
    assert ours.sigma_min == pytest.approx(0.0292, abs=1e-4) and ours.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_linear_betas_match_diffusers():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod
    ours = S.DiscreteSchedule.from_betas("linear", 1e-4, 0.02)
    torch.testing.assert_close(ours.alphas_cumprod, ref.double(), rtol=1e-5, atol=0)


def test_timestep_sigma_round_trip_and_nearest_in_log_sigma():
    sch = S.DiscreteSchedule.stable_diffusion()
    t = torch.arange(1000)
    assert torch.equal(sch.timestep(sch.sigma(t)), t)
    # Between two table entries the nearer one in log-sigma wins, as ComfyUI's ModelSamplingDiscrete.timestep.
    lo, hi = sch.sigmas[500].item(), sch.sigmas[501].item()
    assert int(sch.timestep(math.exp(0.6 * math.log(lo) + 0.4 * math.log(hi)))) == 500
    assert int(sch.timestep(math.exp(0.4 * math.log(lo) + 0.6 * math.log(hi)))) == 501
    assert int(sch.timestep(0.0)) == 0 and int(sch.timestep(1e6)) == 999
    # Fractional timesteps interpolate in log-sigma.
    mid = sch.sigma(torch.tensor(500.5, dtype=torch.float64))
    assert float(mid) == pytest.approx(math.sqrt(lo * hi), rel=1e-9)


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_spacings_match_ddim_scheduler(spacing, n):
    ref = DDIMScheduler(**sd_scheduler_config(), steps_offset=1, timestep_spacing=spacing)
    ref.set_timesteps(n)
    assert S.select_timesteps(spacing, n) == ref.timesteps.tolist()


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_lcm_spacing_matches_lcm_scheduler(n):
    ref = LCMScheduler(**sd_scheduler_config())
    ref.set_timesteps(n)
    assert S.timesteps_lcm(n) == ref.timesteps.tolist()


def test_documented_examples():
    assert S.timesteps_trailing(4) == [999, 749, 499, 249]
    assert S.timesteps_lcm(4) == [999, 759, 499, 259]
    assert S.timesteps_leading(4) == [751, 501, 251, 1]


def test_explicit_timesteps_are_checked():
    assert S.timesteps_explicit([999, 500, 10]) == [999, 500, 10]
    for bad, why in [([500, 999], "decreasing"), ([1000, 10], r"\[0, 1000\)"), ([], "empty")]:
        with pytest.raises(ValueError, match=why):
            S.timesteps_explicit(bad)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        S.select_timesteps("karras", 4)


def test_sigma_vector_ends_in_zero():
    sch = S.DiscreteSchedule.stable_diffusion()
    sig = sch.sigmas_for_timesteps([999, 499])
    assert sig.tolist() == pytest.approx([sch.sigmas[999].item(), sch.sigmas[499].item(), 0.0], rel=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoised_from_output_inverts_diffusers_forward_process(prediction):
    """x0 recovered from diffusers' noised sample and its epsilon / velocity target."""
    ref = DDPMScheduler(**sd_scheduler_config(), prediction_type=prediction)
    sch = S.DiscreteSchedule.stable_diffusion(prediction)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500, 999])
    x_t = ref.add_noise(x0, noise, t)
    target = noise if prediction == "epsilon" else ref.get_velocity(x0, noise, t)
    sigma = sch.sigmas[t].float()
    x = x_t / (1 + sigma**2).rsqrt().view(-1, 1, 1, 1)  # DDPM scale -> sigma space
    torch.testing.assert_close(denoised_from_output(prediction, x, sigma, target), x0, atol=2e-4, rtol=1e-4)


@pytest.mark.host
def test_agrees_with_comfyui_model_sampling_discrete():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI to compare ModelSamplingDiscrete with")
    import sys

    sys.path.insert(0, path)
    try:
        from comfy.model_sampling import ModelSamplingDiscrete
    finally:
        sys.path.remove(path)
    comfy = ModelSamplingDiscrete()  # defaults: SD's scaled-linear 0.00085-0.012 ("linear" in LDM naming)
    ours = S.DiscreteSchedule.stable_diffusion()
    torch.testing.assert_close(ours.sigmas.float(), comfy.sigmas, rtol=1e-6, atol=0)
    probe = torch.exp(torch.linspace(math.log(0.03), math.log(14.6), 257))
    assert torch.equal(ours.timestep(probe), comfy.timestep(probe))
    frac = torch.linspace(0, 999, 301)
    torch.testing.assert_close(ours.sigma(frac), comfy.sigma(frac), rtol=1e-5, atol=0)


def test_diffuse_matches_diffusers_add_noise():
    from fewstep.core.parameterization import diffuse

    ref = DDPMScheduler(**sd_scheduler_config())
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999])
    torch.testing.assert_close(diffuse(S.DiscreteSchedule.stable_diffusion(), x0, noise, t), ref.add_noise(x0, noise, t))


@pytest.mark.parametrize("steps,denoise", [(4, 0.5), (4, 0.25), (2, 0.5), (8, 0.5), (4, 0.8), (1, 0.5)])
def test_partial_denoise_keeps_the_step_count_as_comfyui_basic_scheduler(steps, denoise):
    """ComfyUI's BasicScheduler takes the last N of a steps/denoise schedule; for trailing spacing the squeeze is that."""
    total = round(steps / denoise)
    assert S.timesteps_for_denoise(S.timesteps_trailing(steps), denoise) == S.timesteps_trailing(total)[-steps:]


def test_partial_denoise_edges():
    assert S.timesteps_for_denoise([999, 759, 499, 259], 1.0) == [999, 759, 499, 259]
    assert S.timesteps_for_denoise([999, 749, 499, 249], 0.002) == [1, 0]   # coinciding steps merge, none below 0
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="denoise must be in"):
            S.timesteps_for_denoise([999], bad)


def test_schedule_from_a_hosts_sigma_table():
    """A host's own sigma table (float32, as ComfyUI keeps it) gives back the same sigmas and timestep lookups."""
    sd = S.DiscreteSchedule.stable_diffusion()
    host = S.DiscreteSchedule.from_sigmas(sd.sigmas.float())
    torch.testing.assert_close(host.sigmas, sd.sigmas, rtol=1e-6, atol=0)
    sigmas = host.sigmas_for_timesteps([999, 749, 499, 249])
    assert host.timestep(sigmas[:-1]).tolist() == [999, 749, 499, 249]
