"""From a network's raw output to the denoised x0 the samplers consume, in sigma space.

The network sees the DDPM-scaled input x_t = x / sqrt(1 + sigma^2) and a training timestep; what it
returns depends on its prediction type. Consistency-distilled students (LCM, Flash Diffusion) add the
boundary condition of Song et al. (2023), in the discrete form of Luo et al. (2023, LCM).
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import DiscreteSchedule

# LCM's boundary condition constants: sigma_data of the consistency parameterisation and the factor
# that stretches SD's integer timesteps so that c_skip is ~0 away from t = 0.
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that x broadcasts against a tensor of target_ndim dims."""
    return x.reshape(x.shape + (1,) * (target_ndim - x.ndim))


def input_scaling(sigma: torch.Tensor) -> torch.Tensor:
    """c_in = 1 / sqrt(1 + sigma^2): from sigma space to the DDPM-scaled input the network was trained on."""
    return (sigma**2 + 1.0).rsqrt()


def start_noise_scaling(sigma: torch.Tensor) -> torch.Tensor:
    """Factor turning unit noise into the pure-noise latent at sigma: sqrt(1 + sigma^2), not sigma.

    A DDPM sampler starts from x_T ~ N(0, I) in scaled space; in sigma space that is sqrt(1 + sigma^2) eps,
    which is what ComfyUI does for a full denoise (``max_denoise``).
    """
    return (sigma**2 + 1.0).sqrt()


def denoised_from_output(prediction_type: str, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """x0 from the network output; x and the result are in sigma space."""
    sigma = append_dims(sigma, x.ndim)
    if prediction_type == "epsilon":
        return x - sigma * output
    elif prediction_type == "v_prediction":
        return x / (sigma**2 + 1.0) - output * sigma * (sigma**2 + 1.0).rsqrt()
    elif prediction_type == "sample":
        return output
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'")


def consistency_boundary_scalings(
    timestep: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM's discrete boundary condition: c_skip(0) = 1, c_out(0) = 0.

    Computed and returned in float64 on the CPU (MPS has no float64); callers cast to their tensor."""
    scaled = timestep.detach().to("cpu", torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def apply_consistency_boundary(
    denoised: torch.Tensor, scaled_input: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """f(x, t) = c_skip(t) x_t + c_out(t) x0, with x_t the DDPM-scaled input, as LCM's training and scheduler do."""
    c_skip, c_out = consistency_boundary_scalings(timestep)
    c_skip = append_dims(c_skip.to(denoised.device, denoised.dtype), denoised.ndim)
    c_out = append_dims(c_out.to(denoised.device, denoised.dtype), denoised.ndim)
    return c_out * denoised + c_skip * scaled_input


def consistency_boundary_denoised(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The boundary condition on a k-diffusion-style denoiser's x0, whose input ``x`` is in sigma space (hosts that wrap
    the denoiser rather than the network: ComfyUI's APPLY_MODEL wrapper, A1111's sampler)."""
    scaled_input = x * append_dims(input_scaling(sigma), x.ndim)
    return apply_consistency_boundary(denoised, scaled_input.to(denoised.dtype), timestep)


def distillation_weight(sigma: torch.Tensor, space: str = "x") -> torch.Tensor:
    """Per-sample weight on the x0 squared error of a distillation loss.

    "x": max(SNR, 1), the truncated-SNR weighting of progressive distillation (Salimans & Ho 2022) that Meng et al.
    and SnapFusion use; "eps": SNR, which makes the loss the squared error of the implied noise. SNR = 1 / sigma^2.
    """
    snr = sigma.to(torch.float32).pow(-2)
    if space == "x":
        return snr.clamp(min=1.0)
    elif space == "eps":
        return snr
    else:
        raise ValueError(f"unknown loss space {space!r}; expected 'x' or 'eps'")


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step in sigma space, per sample: keep the implied noise, move to sigma_next."""
    ratio = append_dims(torch.as_tensor(sigma_next / sigma, device=x.device), x.ndim).to(x.dtype)
    return denoised + ratio * (x - denoised)


def progressive_distillation_target(
    x: torch.Tensor, x_next: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """The x0 whose single DDIM step from (x, sigma) lands on x_next at sigma_next (Salimans & Ho 2022, Algorithm 2):
    x~ = (x_next - (sigma_next / sigma) x) / (1 - sigma_next / sigma); at sigma_next = 0 it is x_next itself."""
    ratio = append_dims(sigma_next / sigma, x.ndim)
    return (x_next - ratio * x) / (1.0 - ratio)


def diffuse(schedule: DiscreteSchedule, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process in the network's (scaled) space: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a = schedule.alphas_cumprod[timestep.cpu().long()].to(x0.device, x0.dtype)
    return append_dims(a.sqrt(), x0.ndim) * x0 + append_dims((1 - a).sqrt(), x0.ndim) * noise


NetworkFn = Callable[..., torch.Tensor]


def denoise(
    network: NetworkFn,
    x: torch.Tensor,
    sigma: torch.Tensor,
    schedule: DiscreteSchedule,
    consistency_boundary: bool = False,
    **network_kwargs,
) -> torch.Tensor:
    """One network pass in sigma space: scale the input, look up the timestep, convert the output to x0.

    ``network(x_t, timestep, **network_kwargs)`` is the bare model (a diffusers UNet's forward, a ComfyUI
    apply_model); it returns what the schedule's prediction type says.
    """
    sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
    scaled_input = x * append_dims(input_scaling(sigma), x.ndim)
    timestep = schedule.timestep(sigma)
    output = network(scaled_input, timestep, **network_kwargs)
    denoised = denoised_from_output(schedule.prediction_type, x, sigma, output)
    if consistency_boundary:
        denoised = apply_consistency_boundary(denoised, scaled_input, timestep)
    return denoised
