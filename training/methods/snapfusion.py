"""SnapFusion (Li et al. 2023): a UNet trained to tolerate skipped blocks, each block's worth measured per unit of
latency, the cheapest-to-lose removed. This module so far: which blocks there are, skipping them, robust training
(the teacher fine-tuned with blocks skipped at random), and measuring each block's latency.

A block is one ResNet (``ResnetBlock2D``) or one cross-attention transformer (``Transformer2DModel``) of a diffusers
``UNet2DConditionModel``, named by its module path. A skipped block passes its input through what it would have added
to: a transformer is residual, so its input; a ResNet its shortcut (the input, or the 1x1 convolution where channels
change: the first ResNet of a level, every up-block ResNet, which reads the skip connection too). Shapes therefore
never change, whichever blocks are skipped, and the UNet's state dict keys stay the teacher's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import statistics
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ...core.adapter_file import AdapterMetadata, write_adapter
from ...core.guidance import cfg
from ...core.parameterization import append_dims, distillation_weight
from ...core.schedule import NUM_TRAIN_TIMESTEPS, PREDICTIONS, DiscreteSchedule, select_timesteps
from ..diffusers_sampling import CFGDenoiser, UNetDenoiser
from ..pipelines import PromptEncoder, cast_cond, cat_cond
from ..students import sample_student
from .common import RunOptions, fit, load_options, load_teacher_data, on_main_process, provenance, replace_options, schedule_of
from .guided import RoundGrid, halving_problems, halving_rounds, progressive_rounds
from .snap_architecture import SlimArchitecture, build_slim_unet

log = logging.getLogger("fewstep")

BLOCK_KINDS = {"ResnetBlock2D": "resnet", "Transformer2DModel": "attention"}


@dataclass(frozen=True)
class Block:
    name: str   # module path in the UNet, e.g. "down_blocks.0.attentions.1"
    kind: str   # "resnet" | "attention"


def unet_blocks(unet: torch.nn.Module) -> list[Block]:
    """Every ResNet and cross-attention transformer block, in module order (down, up, mid as diffusers registers them)."""
    return [Block(name, BLOCK_KINDS[type(module).__name__]) for name, module in unet.named_modules()
            if type(module).__name__ in BLOCK_KINDS]


def _skipped_resnet(resnet, input_tensor, *args, **kwargs):
    return resnet.conv_shortcut(input_tensor) if resnet.conv_shortcut is not None else input_tensor


def _skipped_transformer(transformer, hidden_states, *args, return_dict: bool = True, **kwargs):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


class BlockSkipping:
    """Skips chosen blocks of ``unet`` inside ``with skipping.skip(names):``; outside, the UNet is unchanged. Installed
    once, on the block instances' ``forward`` (no wrapper modules, so checkpoints and exports keep the teacher's keys)."""

    def __init__(self, unet: torch.nn.Module):
        self.blocks = unet_blocks(unet)
        self.skipped: frozenset[str] = frozenset()
        modules = dict(unet.named_modules())
        for block in self.blocks:
            module = modules[block.name]
            skipped_forward = _skipped_resnet if block.kind == "resnet" else _skipped_transformer
            module.forward = types.MethodType(self._switch(block.name, type(module).forward, skipped_forward), module)

    def _switch(self, name: str, full, skipped):
        def forward(module, *args, **kwargs):
            return (skipped if name in self.skipped else full)(module, *args, **kwargs)
        return forward

    @contextlib.contextmanager
    def skip(self, names: Iterable[str]) -> Iterator[None]:
        names = frozenset(names)
        unknown = names - {b.name for b in self.blocks}
        if unknown:
            raise ValueError(f"no such block(s): {', '.join(sorted(unknown))}; the UNet's blocks: "
                             f"{', '.join(b.name for b in self.blocks)}")
        previous, self.skipped = self.skipped, names
        try:
            yield
        finally:
            self.skipped = previous


def sample_skipped_blocks(blocks: Sequence[Block], probability: float, generator: torch.Generator) -> list[str]:
    """Robust training's draw: each block skipped independently with ``probability``."""
    draws = torch.rand(len(blocks), generator=generator)
    return [b.name for b, u in zip(blocks, draws.tolist()) if u < probability]


@torch.no_grad()
def interleaved_medians(calls: dict, repeats: int = 10) -> dict:
    """Seconds per call of each ``calls[key]()``: one warm-up each, then ``repeats`` rounds calling each in turn (so
    drifts of clock or load hit all alike), the median per key; CUDA is synchronised around each call."""
    def timed(call) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for call in calls.values():
        timed(call)
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            times[key].append(timed(call))
    return {key: statistics.median(t) for key, t in times.items()}


def block_latencies(unet, skipping: BlockSkipping, inputs: dict, repeats: int = 10) -> dict:
    """Seconds per UNet pass on ``inputs`` with nothing skipped (``"unet"``) and the time each block saves when it
    alone is skipped (``"saved"``: name -> seconds). Measured as the whole pass minus the pass without the block, so
    launch and memory effects count as they will."""
    def skipped(names):
        def call():
            with skipping.skip(names):
                unet(**inputs)
        return call

    seconds = interleaved_medians({(): skipped(())} | {(b.name,): skipped((b.name,)) for b in skipping.blocks}, repeats)
    full = seconds[()]
    return {"unet": full, "saved": {b.name: full - seconds[(b.name,)] for b in skipping.blocks}}


@dataclass
class SnapConfig:
    """SnapFusion's options. The paper gives no skip probability or robust-training loss weights: those are ours."""

    skip_probability: float = 0.1      # each block skipped independently per step during robust training (ours)
    distill_weight: float = 1.0        # the full teacher's prediction as a second target, next to the data (ours)
    caption_dropout: float = 0.1       # keeps the unconditional prediction (CFG) trained
    slim_prediction: str = "v_prediction"  # what the slim UNet learns to predict (SnapFusion fine-tunes to v before step distillation)
    steps: int = 10000                 # robust and slim training
    lr: float = 1e-5
    warmup_steps: int = 100
    batch_size: int = 8
    ema_decay: Optional[float] = 0.999
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    # Step distillation: progressive rounds (two teacher DDIM steps -> one student step) from start_steps to target_steps.
    start_steps: int = 32
    target_steps: int = 8
    round_steps: int = 2000
    cfg_probability: float = 0.1       # p: the share of batches distilled CFG-aware (0: plain progressive distillation)
    cfg_scale_min: float = 2.0         # their CFG scale, drawn per sample in [min, max] (diffusers' convention)
    cfg_scale_max: float = 14.0
    cfg_original_weight: float = 0.2   # gamma: the plain loss's weight next to the CFG-aware one
    sample_cfg_scale: float = 7.5      # the CFG scale the exported student proposes

    def validate(self) -> None:
        problems = []
        if not 0.0 <= self.skip_probability < 1.0:
            problems.append("skip_probability must lie in [0, 1)")
        if self.distill_weight < 0 or not 0.0 <= self.caption_dropout < 1.0:
            problems.append("distill_weight must not be negative and caption_dropout must lie in [0, 1)")
        if self.slim_prediction not in PREDICTIONS:
            problems.append(f"slim_prediction must be one of {', '.join(PREDICTIONS)}; got {self.slim_prediction!r}")
        if min(self.steps, self.batch_size, self.round_steps, self.target_steps) < 1 or self.lr <= 0:
            problems.append("steps, batch_size, round_steps, target_steps and lr must be positive")
        else:
            problems += halving_problems(self.start_steps, self.target_steps)
        if not 0.0 <= self.cfg_probability <= 1.0 or self.cfg_original_weight < 0:
            problems.append("cfg_probability must lie in [0, 1] and cfg_original_weight must not be negative")
        if not 1.0 <= self.cfg_scale_min <= self.cfg_scale_max or self.sample_cfg_scale < 1.0:
            problems.append("need 1 <= cfg_scale_min <= cfg_scale_max and sample_cfg_scale >= 1")
        if problems:
            raise ValueError("invalid SnapFusion configuration: " + "; ".join(problems))

    def replace(self, **changes) -> "SnapConfig":
        return replace_options(self, "SnapFusion", **changes)

    @property
    def rounds(self) -> list[int]:
        return halving_rounds(self.start_steps, self.target_steps)


PRESETS = {
    "paper": SnapConfig(),
    # The bundled proxy teacher on a 2-core CPU; it samples with CFG 4.
    "proxy": SnapConfig(steps=1500, lr=5e-5, batch_size=32, warmup_steps=50, round_steps=500, sample_cfg_scale=4.0),
}


def load_config(preset: str = "paper", config_file: Optional[str | Path] = None, **overrides) -> SnapConfig:
    """A preset, then a JSON file of options, then explicit overrides (None values ignored)."""
    return load_options(PRESETS, "SnapFusion", preset, config_file, **overrides)


def _drop_captions(cond, uncond, drop: torch.Tensor):
    """Per sample, the unconditional encoding where ``drop`` is set (nested dicts of batched tensors)."""
    if isinstance(cond, dict):
        return {k: _drop_captions(cond[k], uncond[k], drop) for k in cond}
    return torch.where(append_dims(drop.to(cond.device), cond.ndim), uncond, cond)


class RobustTraining(torch.nn.Module):
    """A student UNet (the teacher's copy, or a slim UNet built from it) trained with random blocks skipped (one draw
    per step, for the whole batch): the denoising loss on the data plus ``distill_weight`` times the same loss against
    the frozen, full teacher's prediction, both as the squared error of the implied noise. ``forward(batch, gen)``
    returns per-sample losses."""

    has_unused_parameters = True   # a skipped block gets no gradient (the training loop tells DDP)

    def __init__(self, pipe, config: SnapConfig, student: Optional[torch.nn.Module] = None,
                 student_prediction: Optional[str] = None):
        super().__init__()
        self.config = config
        self.teacher = pipe.unet.requires_grad_(False).eval()
        self.student = (copy.deepcopy(self.teacher) if student is None else student).requires_grad_(True)
        if config.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.skipping = BlockSkipping(self.student)
        self.schedule = schedule_of(pipe)
        # The student may predict otherwise (v for the slim UNet): both are compared as x0, through their own schedules.
        self.student_schedule = DiscreteSchedule.stable_diffusion(prediction_type=student_prediction or self.schedule.prediction_type)
        self.prompts = PromptEncoder(pipe)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        z = batch["latents"]
        n = len(z)
        cond = _drop_captions(*self.prompts.with_unconditional(batch["captions"]), torch.rand(n, generator=gen) < self.config.caption_dropout)
        sigma = self.schedule.sigmas[torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=gen)].to(z)
        x = z + append_dims(sigma, z.ndim) * torch.randn(z.shape, generator=gen).to(z)
        skipped = sample_skipped_blocks(self.skipping.blocks, self.config.skip_probability, gen)
        with self.skipping.skip(skipped):
            student = UNetDenoiser(self.student, self.student_schedule)(x, sigma, **cond).float()
        weight = distillation_weight(sigma, "eps")
        terms = {"data": weight * (student - z.float()).pow(2).flatten(1).mean(1),
                 "skipped_blocks": torch.full((n,), float(len(skipped)))}
        terms["loss"] = terms["data"]
        if self.config.distill_weight:
            with torch.no_grad():
                teacher = UNetDenoiser(self.teacher, self.schedule)(x, sigma, **cond).float()
            terms["teacher"] = weight * (student - teacher).pow(2).flatten(1).mean(1)
            terms["loss"] = terms["loss"] + self.config.distill_weight * terms["teacher"]
        return terms


def train_robust(
    teacher: str | Path,                     # diffusers pipeline folder or single-file checkpoint (SD1.5 / SDXL UNet)
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,                     # checkpoints, logs, sample grids
    out: str | Path,                         # the robust teacher: a diffusers pipeline folder
    config: SnapConfig = SnapConfig(),
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """SnapFusion's robust training; writes the fine-tuned pipeline (same architecture, same keys) to ``out``."""
    return _train_student(teacher, data, run_dir, out, config, resolution, teacher_config, None, "robust",
                          lambda unet: {"robust_training_of": str(teacher)}, **run_options)


def train_slim(
    teacher: str | Path,                     # the pipeline the plan was measured on (the robust teacher)
    architecture: SlimArchitecture,          # the plan's slim architecture (``propose_architecture``)
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,
    out: str | Path,                         # the slim pipeline folder (the teacher's with the slim UNet)
    config: SnapConfig = SnapConfig(),       # skip_probability applies to the slim UNet's own blocks (0: none skipped)
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    **run_options,
) -> Optional[Path]:
    """The slim UNet, initialised from the teacher's kept blocks, distilled from the full teacher (plus the data
    loss) while it learns to predict ``config.slim_prediction``; writes a pipeline folder whose UNet config is the slim
    one and whose scheduler says that prediction type."""
    def made(unet) -> dict:
        return {"slim_of": str(teacher), "architecture": architecture.to_dict(),
                "slim": architecture != SlimArchitecture.of_teacher(unet.config)}

    return _train_student(teacher, data, run_dir, out, config, resolution, teacher_config,
                          lambda unet: build_slim_unet(unet, architecture), "slim", made, config.slim_prediction, **run_options)


def _train_student(teacher, data, run_dir, out, config: SnapConfig, resolution, teacher_config, make_student, desc: str,
                   made, student_prediction: Optional[str] = None, **run_options) -> Optional[Path]:
    from ..teacher import write_pipeline

    config.validate()
    run_dir, out = Path(run_dir), Path(out)
    setup = load_teacher_data(teacher, data, resolution, teacher_config)
    pipe = setup.pipe
    run = RunOptions(**run_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = RobustTraining(pipe, config, None if make_student is None else make_student(pipe.unet), student_prediction)
    log.info("%s training: %s student parameters (the teacher's: %s), %d blocks each skipped with probability %g", desc,
             f"{_parameters(model.student):,}", f"{_parameters(model.teacher):,}", len(model.skipping.blocks),
             config.skip_probability)
    preview = setup.preview_captions()

    def sample_fn(m, step):   # the whole student, 25 DDIM steps without CFG
        setup.save_grid(sample_student(m.student, m.student_schedule, m.prompts(preview), list(range(len(preview))),
                                       select_timesteps("trailing", 25), "ddim", consistency_boundary=False),
                        run_dir / "samples" / f"step-{step:08d}.png")

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "snapfusion_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    model = fit(model, run_dir, setup.batch_fn(config.batch_size), config, desc, run, sample_fn=sample_fn)
    if run.stops_before(config.steps):
        return None
    made = {**made(pipe.unet), "steps": config.steps, "batch_size": config.batch_size, "images": len(setup.captions),
            "config": dataclasses.asdict(config)}
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=model.student_schedule.prediction_type)
    components = {**pipe.components, "unet": model.student.requires_grad_(False).eval(), "scheduler": scheduler}
    on_main_process(lambda: write_pipeline(pipe.__class__(**components), out, made))
    return out


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SnapRound(torch.nn.Module):
    """One round of SnapFusion's step distillation: the student's single DDIM step against the teacher's two
    (``guided.RoundGrid``), loss on x0 with the truncated-SNR weight max(SNR, 1). In a share ``cfg_probability`` of the
    batches it is CFG-aware: both take CFG at a scale drawn per sample, the student's guided x0 is matched to the guided
    teacher's two-step target, plus ``cfg_original_weight`` times the plain loss. Terms: ``original`` always, ``cfg``
    and ``cfg_aware`` = 1 in CFG-aware batches (so its logged mean is ``cfg`` times the share of such batches)."""

    def __init__(self, pipe, student, teacher, config: SnapConfig, schedule: DiscreteSchedule, steps: int):
        super().__init__()
        self.student, self.teacher, self.config, self.schedule = student, teacher, config, schedule
        self.text_encoders = torch.nn.ModuleList(
            [m.requires_grad_(False) for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None])
        self.prompts = PromptEncoder(pipe)
        self.grid = RoundGrid(schedule, steps)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval(), self.text_encoders.eval()
        return self

    def forward(self, batch: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.config
        z = batch["latents"]
        n = len(z)
        cond, uncond = self.prompts.with_unconditional(batch["captions"])
        x, sigma, sigma_mid, sigma_next = self.grid.draw(z, gen)
        weight = distillation_weight(sigma, "x")
        teacher, student = UNetDenoiser(self.teacher, self.schedule), UNetDenoiser(self.student, self.schedule)

        def error(x0, target):
            return weight * (x0.float() - target.float()).pow(2).flatten(1).mean(1)

        target = self.grid.target(lambda x_, s_: teacher(x_, s_, **cond), x, sigma, sigma_mid, sigma_next)
        if torch.rand((), generator=gen) >= c.cfg_probability:
            terms = {"original": error(student(x, sigma, **cond), target)}
            return {"loss": terms["original"], **terms}
        scale = (c.cfg_scale_min + (c.cfg_scale_max - c.cfg_scale_min) * torch.rand(n, generator=gen)).to(z)
        guided_target = self.grid.target(CFGDenoiser(teacher, cond, uncond, scale), x, sigma, sigma_mid, sigma_next)
        x0_cond, x0_uncond = student(torch.cat([x, x]), torch.cat([sigma, sigma]), **cat_cond(cond, uncond)).chunk(2)
        student_guided, student_cond = cfg(x0_cond, x0_uncond, scale), x0_cond
        terms = {"cfg": error(student_guided, guided_target), "original": error(student_cond, target),
                 "cfg_aware": torch.ones(n, device=z.device)}
        return {"loss": terms["cfg"] + c.cfg_original_weight * terms["original"], **terms}


def train_step_distillation(
    teacher: str | Path,                     # the slim pipeline (``fewstep snap slim``): its UNet is the first round's teacher
    data,                                    # CaptionedImages, or a dataset spec for load_dataset
    run_dir: str | Path,                     # one sub-folder per round: checkpoints, logs, previews, its student
    out: str | Path,                         # the final (target_steps) snap_student file
    config: SnapConfig = SnapConfig(),
    resolution: Optional[int] = None,
    teacher_config: Optional[str | Path] = None,
    decoder: Optional[str | Path] = None,    # a pruned decoder file (``fewstep snap decoder``) to ship in each student file
    **run_options,                           # RunOptions: mixed_precision, checkpoint_every, ..., stop_after
) -> Optional[Path]:
    """SnapFusion's step distillation, start_steps -> ... -> target_steps, exporting each round as a snap_student
    file (the last one to ``out``); None if stopped by ``stop_after``."""
    from ..students import SnapStudent
    from ..teacher import pipeline_provenance
    from .snap_decoder import read_decoder

    config.validate()
    pruned_decoder = read_decoder(decoder) if decoder is not None else None
    run_dir, out = Path(run_dir), Path(out)
    setup = load_teacher_data(teacher, data, resolution, teacher_config)
    schedule = schedule_of(setup.pipe)
    made_by = pipeline_provenance(teacher)
    architecture = made_by.get("architecture")
    preview = setup.preview_captions()

    def build_round(current, steps):
        return SnapRound(setup.pipe, copy.deepcopy(current).requires_grad_(True), current.requires_grad_(False).eval(),
                         config, schedule, steps)

    def sample(m, steps) -> torch.Tensor:
        cond, uncond = m.prompts.with_unconditional(preview)
        return sample_student(m.student, schedule, cond, list(range(len(preview))), select_timesteps("trailing", steps), "ddim",
                              consistency_boundary=False, uncond=uncond, cfg_scale=config.sample_cfg_scale)

    def export(m, path, steps):
        fields = ("cfg_probability", "cfg_scale_min", "cfg_scale_max", "cfg_original_weight", "start_steps", "target_steps")
        export_snap_student(m.student, path, setup.base, schedule.prediction_type, steps, config.sample_cfg_scale,
                            {**provenance("snapfusion", teacher, config.round_steps, setup, config, fields),
                             "round": f"{2 * steps} -> {steps} steps", "made_from": made_by},
                            SlimArchitecture.from_dict(architecture) if architecture else None, slim=made_by.get("slim", False),
                            decoder=pruned_decoder)

    return progressive_rounds(setup, setup.pipe.unet, lambda path: SnapStudent(setup.pipe, path).unet, build_round, export,
                              sample, config, run_dir, out, "snap_student.safetensors", "SnapFusion step distillation",
                              RunOptions(**run_options))


def export_snap_student(unet, path: str | Path, base: str, prediction: str, steps: int, cfg_scale: float, provenance: dict,
                        architecture: Optional[SlimArchitecture] = None, slim: bool = False, decoder=None) -> AdapterMetadata:
    """A SnapFusion student as one adapter file: its UNet's weights (diffusers keys, fp16) and, in the metadata, the
    diffusers config that builds it (hosts construct the slim UNet from it), DDIM at ``steps`` trailing steps with
    CFG ``cfg_scale`` (atomic write). ``slim``: blocks of the teacher were removed. ``decoder``: a pruned VAE decoder
    (``snap_decoder.PrunedDecoder``), stored under ``vae.`` with its config."""
    from ...core.adapter_file import SNAP_DECODER_PREFIX

    meta = AdapterMetadata(
        kind="snap_student", base=base, prediction=prediction, sampler="ddim", steps=steps,
        timesteps=select_timesteps("trailing", steps), provenance=provenance,
        extra={"unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")}, "layout": "diffusers_unet",
               "cfg_scale": cfg_scale, "slim": slim, **({"architecture": architecture.to_dict()} if architecture is not None else {}),
               **({"decoder_config": decoder.config} if decoder is not None else {})})
    tensors = dict(unet.state_dict())
    if decoder is not None:
        tensors.update({SNAP_DECODER_PREFIX + k: v for k, v in decoder.state_dict().items()})
    write_adapter(path, {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, meta)
    return meta


def latency_inputs(pipe, batch_size: int = 2, unet=None) -> dict:
    """One pass's inputs for ``unet`` (default: the teacher's) at the teacher's native size, in the UNet's dtype:
    batch 2 is a CFG pass for one image."""
    unet = pipe.unet if unet is None else unet
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    cond = PromptEncoder(pipe)(["a photo"] * batch_size)
    return {"sample": torch.randn(batch_size, unet.config.in_channels, size, size, generator=g).to(unet.device, unet.dtype),
            "timestep": torch.tensor([500] * batch_size, device=unet.device), **cast_cond(cond, unet.dtype)}


@torch.no_grad()
def pass_latencies(pipe, students: dict, repeats: int = 20) -> dict:
    """Seconds per UNet pass (batch 2: one image with CFG) and per decoder pass (one latent) of the teacher and of each
    SnapFusion student (name -> ``SnapStudent``), interleaved; and each student's as a ratio to the teacher's."""
    inputs = latency_inputs(pipe, 2)
    size = pipe.unet.config.sample_size
    z = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0)).to(pipe.vae.device, pipe.vae.dtype)
    calls = {("unet", "teacher"): lambda: pipe.unet(**inputs), ("decoder", "teacher"): lambda: pipe.vae.decode(z)}
    for name, student in students.items():
        calls[("unet", name)] = lambda unet=student.unet, inputs=latency_inputs(pipe, 2, student.unet): unet(**inputs)
        if student.decoder is not None:
            calls[("decoder", name)] = lambda decoder=student.decoder: decoder(z)
    seconds = interleaved_medians(calls, repeats)
    return {part: {name: {"seconds": t, "ratio_to_teacher": t / seconds[(part, "teacher")]}
                   for (p, name), t in seconds.items() if p == part} for part in ("unet", "decoder")}


def block_table(pipe, per_class: int = 10, steps: int = 25, cfg_scale: float = 4.0, latency_batch: int = 2,
                repeats: int = 10, quality: bool = True, progress: bool = True, dtype: Optional[torch.dtype] = None) -> dict:
    """SnapFusion's per-block measurements on ``pipe`` (the robust-trained teacher): for every block, the latency it
    saves when skipped alone (on this machine, passes in ``dtype``, default the UNet's) and, with ``quality``, the proxy
    benchmark's FID and prompt accuracy with it skipped (DDIM at ``steps`` with CFG, ``per_class`` samples per class,
    in the UNet's own precision) next to the full UNet's."""
    from tqdm.auto import tqdm

    from ..bench import TeacherEntry, evaluate_entry
    from ..data import PROXY_CLASSES

    timed = copy.deepcopy(pipe.unet).eval().to(dtype or pipe.unet.dtype)
    skipping = BlockSkipping(timed)
    latency = block_latencies(timed, skipping, latency_inputs(pipe, latency_batch, timed), repeats)
    rows = [{"block": b.name, "kind": b.kind, "latency_saved": latency["saved"][b.name] / latency["unet"]} for b in skipping.blocks]
    table = {"unet_seconds_per_pass": latency["unet"], "latency_batch": latency_batch, "blocks": rows,
             "device": str(timed.device), "dtype": str(timed.dtype).replace("torch.", "")}
    del timed, skipping
    if quality:
        unet = copy.deepcopy(pipe.unet).eval()
        skipping = BlockSkipping(unet)
        view = pipe.__class__(**{**pipe.components, "unet": unet})
        entry = TeacherEntry(steps, cfg_scale)
        full = evaluate_entry(view, entry, per_class, batch_size=250)
        table["quality"] = {"steps": steps, "cfg_scale": cfg_scale, "samples": per_class * len(PROXY_CLASSES),
                            "fid": full["fid"], "prompt_accuracy": full["prompt_accuracy"]}
        for row in tqdm(rows, desc="blocks skipped one at a time", disable=not progress):
            with skipping.skip([row["block"]]):
                skipped = evaluate_entry(view, entry, per_class, batch_size=250)
            row.update(fid=skipped["fid"], prompt_accuracy=skipped["prompt_accuracy"], fid_increase=skipped["fid"] - full["fid"])
    return table
