"""The one training loop every fewstep trainer shares (teacher, and each distillation method).

A trainer supplies the module to optimise, a loss callable returning the *unreduced* per-sample loss
(EDM's ``training/loss.py`` convention) and a batch sampler; the loop owns everything else: accelerate,
mixed precision, gradient clipping, EMA, atomic checkpoints and resume, logs, progress bar, periodic samples.
The loss callable may instead return a dict with the loss under ``"loss"`` and other per-sample terms
(logged, not optimised); the batch it gets carries the optimiser step under ``"step"`` for phase schedules.

Randomness is drawn from generators seeded by (seed, step, process), so a run killed and resumed from a
checkpoint takes exactly the same batches and noise as one that never stopped. Under ``accelerate launch`` (or
``torchrun``) every process draws its own batch of ``batch_size``, DDP averages their gradients, and only the main
process writes checkpoints, metrics (averaged over the processes) and previews.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

log = logging.getLogger("fewstep")

CHECKPOINT_DIR = "checkpoints"
LossFn = Callable[[torch.nn.Module, dict, torch.Generator], "torch.Tensor | dict[str, torch.Tensor]"]
BatchFn = Callable[[torch.Generator], dict]
SampleFn = Callable[[torch.nn.Module, int], None]


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, process): the source of all per-step randomness.

    Process 0 draws what a single-process run draws. Other processes are moved by multiples of the 32-bit golden
    ratio constant, because the CPU generator keeps only the low 32 bits of its seed (2**40 apart is the same seed).
    """
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7 + process * 0x9E3779B9) & 0xFFFFFFFF)


class EMA:
    """Exponential moving average of the trainable parameters. The decay warms up as in diffusers' EMAModel,
    min(decay, (1 + step) / (10 + step)): with a fixed 0.999 a 1,000-step fine-tune would still be a third the
    initial weights (a style fine-tune came out without its style)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """``step``: optimiser steps taken before this one (0 for the first)."""
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step)) if step else 1.0
        for n, p in model.named_parameters():
            if n in self.shadow:
                if self.shadow[n].device != p.device:   # created (or resumed) before accelerate moved the model
                    self.shadow[n] = self.shadow[n].to(p.device)
                self.shadow[n].lerp_(p.detach().float(), weight)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, value in self.shadow.items():
            params[n].copy_(value.to(params[n].device, params[n].dtype))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``checkpoints/step-XXXXXXXX.pt`` atomically (temp file + rename) and keep the newest ``keep``."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    """Checkpoints hold only tensors, numbers and strings: loaded with ``weights_only=True``, never unpickled freely."""
    return torch.load(path, map_location="cpu", weights_only=True)


def training_loop(
    run_dir: str | Path,                      # checkpoints/, logs/, metrics.jsonl and samples go here
    model: torch.nn.Module,                   # parameters with requires_grad are trained
    loss_fn: LossFn,                          # (model, batch, generator) -> per-sample loss, unreduced
    batch_fn: BatchFn,                        # (generator) -> batch dict of tensors on the CPU
    total_steps: int,                         # optimiser steps in the whole run, counting resumed ones
    lr: float = 1e-4,                         # AdamW learning rate
    lr_scales: Optional[dict[str, float]] = None,  # parameter-name prefix or pattern -> factor on lr (a discriminator's own rate)
    weight_decay: float = 0.0,                # AdamW weight decay
    warmup_steps: int = 0,                    # linear learning-rate warm-up
    grad_clip: float = 1.0,                   # max gradient norm; 0 disables
    ema_decay: Optional[float] = 0.999,       # None: no EMA; the returned model then holds the raw weights
    mixed_precision: str = "no",              # "no" | "fp16" | "bf16", passed to accelerate
    checkpoint_every: int = 500,              # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2,                # newest checkpoints kept on disk
    log_every: int = 25,                      # steps between log lines
    sample_every: int = 0,                    # steps between sample_fn calls; 0: only at the end
    sample_fn: Optional[SampleFn] = None,     # (EMA model, step) -> writes previews into run_dir
    seed: int = 0,                            # all batches and noise derive from (seed, step)
    resume: bool = True,                      # continue from the newest checkpoint in run_dir if there is one
    stop_after: Optional[int] = None,         # stop (as if killed) after this step; for tests and time-boxed runs
    progress: bool = True,                    # show a progress bar
    desc: str = "training",                   # progress bar label
) -> torch.nn.Module:
    """Train ``model`` and return it with EMA weights copied in (if EMA is on). See the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _release_accelerator_state(mixed_precision)
    # A model whose steps leave some parameters unused (SnapFusion's skipped blocks) says so; DDP must then look for them.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if getattr(model, "has_unused_parameters", False) else []
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=_tracker(), project_dir=str(run_dir / "logs"),
                              kwargs_handlers=ddp)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    optimizer = torch.optim.AdamW(_param_groups(model, lr, lr_scales or {}), lr=lr, weight_decay=weight_decay)
    ema = EMA(model, ema_decay) if ema_decay is not None else None

    start = 0
    if not resume and latest_checkpoint(run_dir) is not None:
        # Starting over: old checkpoints would otherwise be taken for this run's by the next resume.
        log.warning("starting over in %s: removing its earlier checkpoints and metrics", run_dir)
        shutil.rmtree(run_dir / CHECKPOINT_DIR)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        unexpected = model.load_state_dict(state["model"], strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{checkpoint} does not belong to this model: unexpected keys {unexpected[:3]}")
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.shadow = {n: t.float() for n, t in state["ema"].items()}
        start = int(state["step"])
        log.info("resumed from %s at step %d of %d", checkpoint, start, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.log_with:
        accelerator.init_trackers("fewstep")

    def checkpoint_now(step: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(run_dir, step, {
                "step": step, "model": trainable_state(accelerator.unwrap_model(model)),
                "optimizer": optimizer.state_dict(), "ema": ema.shadow if ema is not None else {},
            }, keep_checkpoints)

    end = total_steps if stop_after is None else min(total_steps, stop_after)
    metrics_file = run_dir / "metrics.jsonl"
    running: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=total_steps, desc=desc, disable=not progress or not accelerator.is_main_process)
    model.train()
    for step in bar:
        gen = step_generator(seed, step, accelerator.process_index)
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch_fn(gen).items()}
        batch["step"] = step
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * min(1.0, (step + 1) / warmup_steps) if warmup_steps else group["base_lr"]
        with accelerator.autocast():
            terms = loss_fn(model, batch, gen)
            if not isinstance(terms, dict):
                terms = {"loss": terms}
            loss = terms["loss"].float().mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if grad_clip:
            accelerator.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step)
        for name, value in terms.items():
            running[name] = running.get(name, 0.0) + value.detach().float().mean().item()
        done = step + 1
        if done % log_every == 0 or done == end:
            n = done % log_every or log_every
            means = accelerator.reduce(torch.tensor(list(running.values()), device=accelerator.device) / n, "mean")
            record = {"step": done, **dict(zip(running, means.tolist())), "lr": optimizer.param_groups[0]["lr"],
                      "seconds_per_step": (time.perf_counter() - t0) / n}
            running, t0 = {}, time.perf_counter()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if accelerator.is_main_process:
                with open(metrics_file, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k not in ("step", "seconds_per_step")}, step=done)
        if done % checkpoint_every == 0 or done == end:
            checkpoint_now(done)
        if sample_fn is not None and accelerator.is_main_process and sample_every and done % sample_every == 0 \
                and done != total_steps:
            _with_ema(accelerator.unwrap_model(model), ema, lambda m: sample_fn(m, done))
    bar.close()
    # Not accelerator.end_training(): it also destroys the process group, which the export after the loop and the
    # next loop of a multi-round method still need.
    for tracker in accelerator.trackers:
        tracker.finish()
    final = accelerator.unwrap_model(model)
    final.eval()
    if ema is not None:
        ema.copy_to(final)
    if sample_fn is not None and accelerator.is_main_process and end == total_steps:
        sample_fn(final, total_steps)
    return final


def end_process_group() -> None:
    """Destroy the process group of a distributed run before the interpreter exits (a no-op otherwise).

    Left to interpreter teardown, gloo's worker threads can still hold tensors whose release needs the GIL, and
    the process aborts ("terminate called without an active exception") after its work is done. The barrier
    keeps one process from tearing down while another is still in a collective.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _release_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another precision; runs in one
    process (the quickstart, tests, notebooks) may differ in it. The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()


def _param_groups(model: torch.nn.Module, lr: float, lr_scales: dict[str, float]) -> list[dict]:
    """AdamW groups: trainable parameters by the first key of lr_scales that is a prefix of their name or an fnmatch
    pattern matching it ("adapter.*_alpha"), the rest at lr."""
    from fnmatch import fnmatchcase

    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            prefix = next((k for k in lr_scales if name.startswith(k) or fnmatchcase(name, k)), "")
            groups.setdefault(prefix, []).append(p)
    return [{"params": ps, "lr": lr * lr_scales.get(k, 1.0), "base_lr": lr * lr_scales.get(k, 1.0)} for k, ps in groups.items()]


def _with_ema(model: torch.nn.Module, ema: Optional[EMA], fn: Callable[[torch.nn.Module], None]) -> None:
    """Run fn on the EMA weights, then put the training weights back."""
    if ema is None:
        fn(model)
        return
    backup = trainable_state(model)
    ema.copy_to(model)
    was_training = model.training
    model.eval()
    try:
        fn(model)
    finally:
        model.load_state_dict(backup, strict=False)
        model.train(was_training)


def _tracker() -> Optional[str]:
    """TensorBoard when it is installed; metrics.jsonl is written either way."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return "tensorboard"
