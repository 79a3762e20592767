"""`fewstep train teacher`: an SD-architecture latent text-to-image model trained from scratch.

Same parts as Stable Diffusion 1.5, small: an AutoencoderKL (32x32 RGB -> 8x8x4 latents, scaling factor
measured on the data), a frozen CLIPTextModel behind the real CLIP tokenizer (frozen like SD's; randomly
initialised here, since no pretrained weights can be downloaded), and a UNet2DConditionModel with
cross-attention trained with SD's scaled-linear schedule, eps-prediction and 10% caption dropout for CFG.
Two stages on the shared loop (autoencoder, then UNet), each resumable; the result is a standard diffusers
StableDiffusionPipeline folder, loaded by every later tool exactly as SD1.5 would be.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.parameterization import diffuse
from ..core.schedule import NUM_TRAIN_TIMESTEPS, DiscreteSchedule, select_timesteps
from ..core.samplers import sample_ddim
from .clip_tokenizer import VOCAB_SIZE, load_clip_tokenizer
from .data import CaptionedImages
from .diffusers_sampling import CFGDenoiser, UNetDenoiser, run_sampler
from .images import save_grid, to_pixels, to_uint8
from .loop import training_loop
from .teacher_data import encode_dataset
from .tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, sd_scheduler_config

log = logging.getLogger("fewstep")


@dataclass(frozen=True)
class TeacherPreset:
    """Network sizes. ``proxy`` is the bundled teacher (fits one CPU session); ``tiny`` is for tests."""

    vae_channels: tuple[int, ...] = (32, 64, 64)   # 3 levels: 32x32 -> 8x8
    text_hidden: int = 48                           # CLIP width; the 49,408-token embedding dominates file size
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 2
    attention_head_dim: int = 8
    norm_groups: int = 16


PRESETS = {
    "proxy": TeacherPreset(),
    "tiny": TeacherPreset(vae_channels=(8, 16, 16), text_hidden=16, text_layers=1, unet_channels=(16, 32),
                          unet_layers_per_block=1, attention_head_dim=4, norm_groups=8),
}


def build_components(preset: TeacherPreset, seed: int = 0):
    """(vae, text_encoder, tokenizer, unet), freshly initialised from the preset."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    levels = len(preset.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=preset.vae_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=preset.norm_groups, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=preset.text_hidden, intermediate_size=4 * preset.text_hidden,
        num_hidden_layers=preset.text_layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID,
    )).requires_grad_(False).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=preset.unet_channels,
        layers_per_block=preset.unet_layers_per_block,
        # SD1.5's pattern: cross-attention at every level but the innermost.
        down_block_types=("CrossAttnDownBlock2D",) * (len(preset.unet_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(preset.unet_channels) - 1),
        cross_attention_dim=preset.text_hidden, attention_head_dim=preset.attention_head_dim,
        norm_num_groups=preset.norm_groups,
    )
    return vae, text_encoder, load_clip_tokenizer(), unet


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class AutoencoderTraining(torch.nn.Module):
    """The autoencoder with its loss as ``forward``: reconstruction (MSE) plus a small KL to N(0, I), as SD's
    autoencoder (without its GAN term). In ``forward`` because DDP syncs only gradients of calls through its wrapper."""

    def __init__(self, vae, kl_weight: float = 1e-4):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        posterior = self.vae.encode(batch["pixels"]).latent_dist
        recon = self.vae.decode(posterior.sample(generator=gen)).sample
        mse = (recon - batch["pixels"]).pow(2).flatten(1).mean(1)
        return mse + self.kl_weight * posterior.kl() / posterior.mean[0].numel()


class EpsilonLoss:
    """DDPM's simple loss (Ho et al. 2020): predict the noise at a uniformly drawn timestep, with caption dropout."""

    def __init__(self, schedule: DiscreteSchedule, text_encoder, empty_ids: torch.Tensor, caption_dropout: float = 0.1):
        self.schedule, self.text_encoder, self.empty_ids, self.caption_dropout = schedule, text_encoder, empty_ids, caption_dropout

    def __call__(self, unet, batch: dict, gen: torch.Generator) -> torch.Tensor:
        latents, ids = batch["latents"], batch["input_ids"]
        n = latents.shape[0]
        drop = torch.rand(n, generator=gen) < self.caption_dropout
        ids = torch.where(drop[:, None].to(ids.device), self.empty_ids.to(ids.device), ids)
        with torch.no_grad():
            context = self.text_encoder.to(ids.device)(ids)[0]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        eps = unet(diffuse(self.schedule, latents, noise, t), t.to(latents.device), encoder_hidden_states=context).sample
        return (eps.float() - noise.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def sample_images(unet, vae, text_encoder, tokenizer, captions: Sequence[str], seeds: Sequence[int], steps: int = 25,
                  cfg_scale: float = 5.0, spacing: str = "leading", negative: str = "") -> np.ndarray:
    """Teacher samples with DDIM and CFG (``negative`` as the unconditional prompt) through core's sampler; uint8 (N, 32, 32, 3)."""
    schedule = DiscreteSchedule.stable_diffusion()
    device = unet.device
    cond = text_encoder.to(device)(tokenize(tokenizer, captions).to(device))[0]
    uncond = text_encoder(tokenize(tokenizer, [negative] * len(captions)).to(device))[0]
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)
    model = CFGDenoiser(UNetDenoiser(unet, schedule), cond, uncond, cfg_scale)
    sigmas = schedule.sigmas_for_timesteps(select_timesteps(spacing, steps))
    latents = run_sampler(sample_ddim, model, noise, sigmas, progress=False)
    return to_uint8(vae.decode(latents / vae.config.scaling_factor).sample)


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, provenance: dict) -> None:
    """A StableDiffusionPipeline folder in fp16 (halves the bundled size), written to a temp folder then renamed."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**sd_scheduler_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float16)
    write_pipeline(pipe, out, provenance)


PROVENANCE_FILE = "fewstep_teacher.json"


def pipeline_provenance(folder: str | Path) -> dict:
    """What ``write_pipeline`` recorded about how a pipeline folder was made (empty for other teachers)."""
    made = Path(folder) / PROVENANCE_FILE
    return json.loads(made.read_text()) if made.is_file() else {}


def write_pipeline(pipe, out: Path, provenance: dict) -> None:
    """Save a diffusers pipeline folder with its provenance (PROVENANCE_FILE), written to a temp folder then renamed (a
    killed run leaves the old folder or none, never half of one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-pipeline-"))
    tmp.chmod(0o755)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def train_teacher(
    data: CaptionedImages,                   # training images (uint8 NHWC) and captions
    run_dir: str | Path,                     # stage checkpoints, logs and sample grids
    out: str | Path,                         # the finished diffusers pipeline folder
    preset: str = "proxy",                   # network sizes, see PRESETS
    vae_steps: int = 3000,                   # autoencoder training steps
    unet_steps: int = 12000,                 # UNet training steps
    batch_size: int = 64,                    # images per step, both stages
    vae_lr: float = 1e-3,                    # autoencoder learning rate
    unet_lr: float = 5e-4,                   # UNet learning rate
    caption_dropout: float = 0.1,            # fraction of captions replaced by "" (teaches the unconditional model for CFG)
    ema_decay: float = 0.999,                # EMA of the UNet weights (the exported ones)
    mixed_precision: str = "no",             # accelerate mixed precision: "no" | "fp16" | "bf16"
    checkpoint_every: int = 500,             # steps between checkpoints in each stage
    sample_every: int = 1000,                # steps between sample grids of the UNet stage
    seed: int = 0,                           # initialisation, batches and noise
    resume: bool = True,                     # continue each stage from its newest checkpoint
    stop_after: Optional[int] = None,        # stop the UNet stage after this step (time-boxed runs, tests)
    progress: bool = True,                   # progress bars
) -> Optional[Path]:
    """Train both stages and write the pipeline; returns ``out``, or None when stopped early by ``stop_after``."""
    run_dir, out = Path(run_dir), Path(out)
    vae, text_encoder, tokenizer, unet = build_components(PRESETS[preset], seed)
    pixels = to_pixels(data.images)

    # 1. The autoencoder.
    def pixel_batch(gen):
        return {"pixels": pixels[torch.randint(len(pixels), (batch_size,), generator=gen)]}

    vae = training_loop(run_dir / "vae", AutoencoderTraining(vae), lambda m, b, g: m(b, g), pixel_batch, vae_steps,
                        lr=vae_lr, ema_decay=None, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
                        seed=seed, resume=resume, progress=progress, desc="autoencoder").vae
    vae.requires_grad_(False)

    # 2. Latents of the whole set, and SD's scaling factor measured on them (0.18215 for SD1.5's VAE).
    mean, std = encode_dataset(vae, pixels)
    scaling_factor = float(1.0 / (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log.info("latent scaling factor %.5f", scaling_factor)

    # 3. The UNet on scaled latents, captions dropped 10% of the time.
    captions = sorted(set(data.captions))
    caption_ids = tokenize(tokenizer, captions)
    caption_index = torch.tensor([captions.index(c) for c in data.captions])
    loss = EpsilonLoss(DiscreteSchedule.stable_diffusion(), text_encoder, tokenize(tokenizer, [""])[0], caption_dropout)

    def latent_batch(gen):
        idx = torch.randint(len(mean), (batch_size,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        return {"latents": z * scaling_factor, "input_ids": caption_ids[caption_index[idx]]}

    preview_captions = captions[:20]
    preview_seeds = list(range(len(preview_captions)))

    def preview(model, step):
        images = sample_images(model, vae, text_encoder, tokenizer, preview_captions * 2, preview_seeds + [s + 100 for s in preview_seeds])
        save_grid(images, run_dir / "samples" / f"step-{step:08d}.png", columns=len(preview_captions))

    unet = training_loop(run_dir / "unet", unet, loss, latent_batch, unet_steps, lr=unet_lr, warmup_steps=200,
                         ema_decay=ema_decay, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
                         sample_every=sample_every, sample_fn=preview, seed=seed, resume=resume, stop_after=stop_after,
                         progress=progress, desc="unet")
    if stop_after is not None and stop_after < unet_steps:
        return None
    provenance = {"preset": preset, "preset_sizes": asdict(PRESETS[preset]), "vae_steps": vae_steps, "unet_steps": unet_steps,
                  "batch_size": batch_size, "caption_dropout": caption_dropout, "ema_decay": ema_decay,
                  "scaling_factor": scaling_factor, "seed": seed, "captions": len(captions), "images": len(data)}
    from .driver import on_main_process

    on_main_process(lambda: save_pipeline(out, vae, text_encoder, tokenizer, unet, provenance))
    return out


def finetune_teacher(
    teacher: str | Path,                     # an SD1.5-architecture pipeline folder or single file
    data: CaptionedImages | str,             # the fine-tuning images, or a dataset spec for load_dataset
    run_dir: str | Path,                     # checkpoints, logs and sample grids
    out: str | Path,                         # the fine-tuned pipeline folder
    steps: int = 1000,                       # UNet training steps
    batch_size: int = 64,                    # images per step
    lr: float = 1e-4,                        # UNet learning rate
    caption_dropout: float = 0.1,            # keeps the unconditional model (CFG) in step with the fine-tune
    ema_decay: Optional[float] = 0.999,      # EMA of the UNet weights (the exported ones)
    teacher_config: Optional[str | Path] = None,  # for single files: a diffusers folder with configs
    mixed_precision: str = "no",
    checkpoint_every: int = 500,
    sample_every: int = 500,
    seed: int = 0,
    resume: bool = True,
    stop_after: Optional[int] = None,
    progress: bool = True,
) -> Optional[Path]:
    """Fine-tune a teacher's UNet on a dataset (a style, a subject), as users fine-tune SD1.5 models; VAE and text
    encoder stay as they are. Returns ``out``, or None when stopped early by ``stop_after``."""
    from .driver import on_main_process
    from .teacher_data import load_teacher_data
    from .pipelines import base_of

    setup = load_teacher_data(teacher, data, teacher_config=teacher_config)
    pipe = setup.pipe
    if base_of(pipe) != "sd15":
        raise ValueError(f"fewstep finetune handles SD1.5-architecture teachers; {teacher} is {base_of(pipe)}")
    captions = sorted(set(setup.captions))
    caption_ids = tokenize(pipe.tokenizer, captions)
    loss = EpsilonLoss(DiscreteSchedule.stable_diffusion(), pipe.text_encoder.requires_grad_(False),
                       tokenize(pipe.tokenizer, [""])[0], caption_dropout)
    to_latents = setup.batch_fn(batch_size)

    def latent_batch(gen):
        batch = to_latents(gen)
        return {"latents": batch["latents"], "input_ids": caption_ids[[captions.index(c) for c in batch["captions"]]]}

    preview = captions[:20]

    def sample_fn(model, step):
        images = sample_images(model, pipe.vae, pipe.text_encoder, pipe.tokenizer, preview, list(range(len(preview))))
        save_grid(images, Path(run_dir) / "samples" / f"step-{step:08d}.png", columns=len(preview))

    unet = training_loop(run_dir, pipe.unet.requires_grad_(True).train(), loss, latent_batch, steps, lr=lr, warmup_steps=50,
                         ema_decay=ema_decay, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
                         sample_every=sample_every, sample_fn=sample_fn, seed=seed, resume=resume, stop_after=stop_after,
                         progress=progress, desc="fine-tune")
    if stop_after is not None and stop_after < steps:
        return None
    provenance = {"finetuned_from": str(teacher), "steps": steps, "batch_size": batch_size, "lr": lr,
                  "caption_dropout": caption_dropout, "ema_decay": ema_decay, "seed": seed, "images": len(setup.captions)}
    on_main_process(lambda: save_pipeline(Path(out), pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                          unet.requires_grad_(False).eval(), provenance))
    return Path(out)
