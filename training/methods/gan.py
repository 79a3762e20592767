"""Adversarial training on a frozen teacher's features, shared by the methods that use it (Flash's adversarial term,
GDD's whole loss): a small trainable head reads the output of one module of the frozen teacher UNet, run on noised
latents with the prompt, so the discriminator is text-conditioned and works in latent space at any model size. The
teacher only supplies features: it is never trained (its parameters have requires_grad off) and gradients reach the
generator through it."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...core.parameterization import diffuse
from ...core.schedule import DiscreteSchedule
from ..pipelines import PromptEncoder, cast_cond, cat_cond

GAN_LOSSES = ("lsgan", "hinge", "non-saturating")


class Discriminator(torch.nn.Module):
    """The reference head on teacher features: conv 3x3, strided conv 4x4, GroupNorm, conv to one logit map.

    The last convolution is 4x4 as the reference on SD's 8x8 mid-block features and shrinks with smaller
    maps; the logit map is averaged, so any feature size works. With ``text_dim`` the prompt also enters as in a
    projection discriminator (Miyato & Koyama 2018): the logit gains the inner product of the pooled hidden features
    with a projection of the prompt's mean token encoding (``text``), so the head must judge image and prompt together.
    """

    def __init__(self, in_channels: int, channels: int, feature_size: int, text_dim: Optional[int] = None):
        super().__init__()
        last = max(1, min(4, feature_size // 2))
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, channels, 3, 1, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False), torch.nn.SiLU(),
            torch.nn.GroupNorm(4, channels * 2), torch.nn.Conv2d(channels * 2, 1, last, 1, 0, bias=False),
        )
        self.text_projection = torch.nn.Linear(text_dim, channels * 2, bias=False) if text_dim else None

    def forward(self, features: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.net[:-1](features)
        logits = self.net[-1](hidden).flatten(1).mean(1)
        if self.text_projection is not None:
            logits = logits + (hidden.mean((2, 3)) * self.text_projection(text.to(hidden.dtype))).sum(1)
        return logits


class _StopForward(Exception):
    pass


class FeatureTap:
    """The output of one named module of a network, without running the layers after it."""

    def __init__(self, network: torch.nn.Module, module_name: str):
        modules = dict(network.named_modules())
        if module_name not in modules:
            near = [n for n in modules if n.count(".") == 0 and n][:8]
            raise ValueError(f"the teacher has no module {module_name!r} for discriminator features; top-level modules: {near}")
        self.network, self.module = network, modules[module_name]

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        captured = []

        def hook(module, inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = self.module.register_forward_hook(hook)
        try:
            self.network(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]


def teacher_features(tap: FeatureTap, dtype: torch.dtype, schedule: DiscreteSchedule, fake: torch.Tensor,
                     real: torch.Tensor, cond: dict, timesteps: Sequence[int], gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake, real) features from one teacher pass: both noised with the same noise to one of ``timesteps`` per sample."""
    n = fake.shape[0]
    choices = torch.tensor(list(timesteps))
    t = choices[torch.randint(len(choices), (n,), generator=gen)]
    noise = torch.randn(fake.shape, generator=gen).to(fake)
    noisy = torch.cat([diffuse(schedule, fake, noise, t), diffuse(schedule, real.detach(), noise, t)])
    feats = tap(noisy.to(dtype), torch.cat([t, t]).to(noisy.device), **cast_cond(cat_cond(cond, cond), dtype)).float()
    return feats.chunk(2)


def adversarial_terms(discriminator: torch.nn.Module, kind: str, fake_feats: torch.Tensor, real_feats: torch.Tensor,
                      text: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator term, discriminator term) per sample, for one backward pass that trains both: the generator's term
    sees the head with its weights detached, the head's term sees the features detached. ``text``: the prompts'
    encodings for a head with a text projection."""
    frozen_head = {k: p.detach() for k, p in discriminator.named_parameters()}
    fake_for_generator = torch.func.functional_call(discriminator, frozen_head, (fake_feats, text))
    both = None if text is None else torch.cat([text, text])
    fake_logits, real_logits = discriminator(torch.cat([fake_feats.detach(), real_feats.detach()]), both).chunk(2)
    if kind == "lsgan":   # on sigmoid outputs, as Flash's reference
        generator = (torch.sigmoid(fake_for_generator) - 1).pow(2)
        disc = 0.5 * ((torch.sigmoid(real_logits) - 1).pow(2) + torch.sigmoid(fake_logits).pow(2))
    elif kind == "hinge":
        generator = -fake_for_generator
        disc = F.relu(1 - real_logits) + F.relu(1 + fake_logits)
    else:                 # non-saturating
        generator = F.softplus(-fake_for_generator)
        disc = F.softplus(-real_logits) + F.softplus(fake_logits)
    return generator, disc


def r1_penalty(discriminator: torch.nn.Module, real_feats: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
    """R1 (Mescheder et al. 2018) per sample: the squared gradient norm of the head's logit at the real features."""
    real = real_feats.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real, text).sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1)


class AdversarialDistillation(torch.nn.Module):
    """What a method with a discriminator on teacher features holds: the student, the frozen teacher (the feature
    network), the frozen text encoders and the head, sized from the feature map of ``config.disc_feature_module``.
    One module so that ``accelerate`` moves, wraps (DDP) and checkpoints it as a whole."""

    def __init__(self, pipe, student, teacher, config, schedule: DiscreteSchedule):
        super().__init__()
        self.student, self.teacher, self.config, self.schedule = student, teacher, config, schedule
        self.text_encoders = torch.nn.ModuleList(
            [m.requires_grad_(False) for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None])
        self.prompts = PromptEncoder(pipe)
        self.tap = FeatureTap(teacher, config.disc_feature_module)
        features = self._probe_features()
        text_dim = teacher.config.cross_attention_dim if getattr(config, "disc_text_projection", False) else None
        self.discriminator = Discriminator(features.shape[1], config.disc_channels, features.shape[-1], text_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        self.text_encoders.eval()
        return self

    @torch.no_grad()
    def _probe_features(self) -> torch.Tensor:
        size = self.teacher.config.sample_size
        x = torch.zeros(1, self.teacher.config.in_channels, size, size, device=self.teacher.device, dtype=self.teacher.dtype)
        return self.tap(x, torch.tensor([500], device=x.device), **cast_cond(self.prompts([""]), x.dtype))
