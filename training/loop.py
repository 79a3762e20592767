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

A run holds its folder (``fewstep.lock``, see ``lock_run_dir``): a second run on the same folder is refused with the
holder's process id instead of both overwriting each other's checkpoints. Checkpoints are fsynced before the rename
that publishes them; an unreadable newest one (power loss) is set aside and the run resumes from the one before.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from .errors import UserError

log = logging.getLogger("fewstep")

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "fewstep.lock"
TMP_PREFIX = ".tmp-"
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


class RunDirError(UserError):
    """The run folder cannot be used: another run holds it, it cannot be written, or it holds another model's run."""


_held_locks: dict[str, tuple[object, int]] = {}   # resolved run folder -> (open lock file, depth), in this process


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir/fewstep.lock`` while the block runs; re-entrant within a process.

    A second process gets a RunDirError naming the holder ("process PID on HOST"). The lock is an flock, which the
    kernel drops when its holder dies, so a killed run's lock file never blocks the next run. Under ``accelerate
    launch`` only the main process (RANK 0) takes it. Creating the folder and the lock file is also the first write
    of a run, so a read-only or full folder fails here, before any expensive work.
    """
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held_locks or int(os.environ.get("RANK", "0")) != 0:
        fh, depth = _held_locks.get(key, (None, 0))
        _held_locks[key] = (fh, depth + 1)
        try:
            yield
        finally:
            fh, depth = _held_locks.pop(key)
            if depth > 1:
                _held_locks[key] = (fh, depth - 1)
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(run_dir / LOCK_FILE, "a+")
    except OSError as exc:
        raise RunDirError(f"cannot write in the run folder {run_dir}: {exc.strerror or exc}") from None
    if not _try_lock(fh):
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunDirError(f"{run_dir} is in use by {holder}: wait for that run to end, or give this one another run folder")
    try:
        fh.truncate(0)
        fh.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        os.fsync(fh.fileno())
    except OSError as exc:
        fh.close()
        raise RunDirError(f"cannot write in the run folder {run_dir}: {exc.strerror or exc}") from None
    _held_locks[key] = (fh, 1)
    try:
        yield
    finally:
        del _held_locks[key]
        with contextlib.suppress(OSError):
            fh.truncate(0)   # a later refusal must not name a process that has ended
        fh.close()           # releases the lock


def _try_lock(fh) -> bool:
    """Take an exclusive lock on the open lock file without waiting; False if another process has it."""
    try:
        import fcntl
    except ImportError:   # Windows: lock one byte far past the holder's line, which stays readable
        import msvcrt

        fh.seek(1 << 20)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            fh.seek(0)
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``checkpoints/step-XXXXXXXX.pt`` atomically and durably (temp file, fsync, rename, fsync of the folder:
    without the first fsync a power loss can publish an empty file) and keep the newest ``keep``."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / f"step-{step:08d}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_folder(folder)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as exc:
        kept = latest_checkpoint(run_dir)
        raise RunDirError(f"cannot write checkpoint {path}: {exc.strerror or exc}; "
                          + (f"{kept.name} is kept to resume from" if kept else "no checkpoint is kept")) from None
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder, and needs no such step)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    """Checkpoints hold only tensors, numbers and strings: loaded with ``weights_only=True``, never unpickled freely."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest_checkpoint(run_dir: Path, set_aside: bool = True) -> tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint that loads, and its state. Unreadable newer ones (truncated or empty after a power loss)
    are skipped with a warning and, with ``set_aside`` (the main process only: the others would race it), renamed
    ``*.corrupt``; (None, None) if none is left."""
    for path in sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
            log.warning("checkpoint %s is unreadable (%s: %s); resuming from the one before", path,
                        exc.__class__.__name__, str(exc).splitlines()[0][:120] if str(exc) else "")
            if set_aside:
                os.replace(path, path.with_name(path.name + ".corrupt"))
    return None, None


def _remove_orphans(run_dir: Path) -> None:
    """Temp files of checkpoints a killed run never finished (only run under the run folder's lock)."""
    for orphan in (Path(run_dir) / CHECKPOINT_DIR).glob(TMP_PREFIX + "*"):
        log.info("removing %s, left by a run that stopped while writing a checkpoint", orphan)
        orphan.unlink(missing_ok=True)


def _trim_metrics(metrics_file: Path, step: int) -> None:
    """Keep the records up to ``step`` (where the run resumes): a killed run may have logged steps after its last
    checkpoint, which the resumed run logs again. A record cut short by the kill goes too."""
    if not metrics_file.is_file():
        return
    lines = metrics_file.read_text().splitlines()
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) < len(lines):
        tmp = metrics_file.with_name(TMP_PREFIX + metrics_file.name)
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics_file)


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, TypeError, KeyError, ValueError):
        return math.inf


def _check_loop_options(lr: float, **counts: int) -> None:
    """One UserError for every option the loop cannot run with (the CLI checks its flags before this)."""
    problems = [f"{name} must be a positive integer (got {value!r})" for name, value in counts.items()
                if not isinstance(value, int) or value < 1]
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        problems.append(f"lr must be a finite positive number (got {lr!r})")
    if problems:
        raise UserError("; ".join(problems))


def holding_run_dir(fn: Callable) -> Callable:
    """Run ``fn`` while this process holds the folder its first parameter names (see ``lock_run_dir``)."""
    signature = inspect.signature(fn)
    first = next(iter(signature.parameters))

    @functools.wraps(fn)
    def holding(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with lock_run_dir(bound.arguments[first]):
            return fn(*bound.args, **bound.kwargs)
    return holding


@holding_run_dir
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

    _check_loop_options(lr, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, log_every=log_every)
    if min(total_steps, warmup_steps, sample_every) < 0:
        raise UserError("total_steps, warmup_steps and sample_every must not be negative")
    run_dir = Path(run_dir)

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

    metrics_file = run_dir / "metrics.jsonl"
    start = 0
    # The loss terms summed since the last metrics record, and over how many steps: checkpointed, so that the first
    # record after a resume averages the same steps as an uninterrupted run's.
    running: dict[str, float] = {}
    counted = 0
    if accelerator.is_main_process:
        _remove_orphans(run_dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        # Starting over: old checkpoints would otherwise be taken for this run's by the next resume.
        log.warning("starting over in %s: removing its earlier checkpoints and metrics", run_dir)
        shutil.rmtree(run_dir / CHECKPOINT_DIR)
        metrics_file.unlink(missing_ok=True)
    checkpoint, state = load_latest_checkpoint(run_dir, accelerator.is_main_process) if resume else (None, None)
    if checkpoint is not None:
        unexpected = model.load_state_dict(state["model"], strict=False).unexpected_keys
        if unexpected:
            raise RunDirError(f"{checkpoint} does not belong to this model: unexpected keys {unexpected[:3]}; "
                              "resume it with the model it was made with, or start over in another run folder")
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.shadow = {n: t.float() for n, t in state["ema"].items()}
        start = int(state["step"])
        running, counted = dict(state.get("running", {})), int(state.get("running_steps", 0))
        log.info("resumed from %s at step %d of %d", checkpoint, start, total_steps)
    if resume and accelerator.is_main_process:
        _trim_metrics(metrics_file, start)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.log_with:
        accelerator.init_trackers("fewstep")

    def reduced(sums: dict[str, float]) -> list[float]:
        """The sums averaged over the processes (a collective: every process calls it)."""
        if not sums:
            return []
        # float64: the sums travel through checkpoints, and must add up as the uninterrupted run's python floats do
        values = torch.tensor(list(sums.values()), dtype=torch.float64, device=accelerator.device)
        return accelerator.reduce(values, "mean").tolist()

    def checkpoint_now(step: int) -> None:
        sums = dict(zip(running, reduced(running)))
        if accelerator.is_main_process:
            save_checkpoint(run_dir, step, {
                "step": step, "model": trainable_state(accelerator.unwrap_model(model)),
                "optimizer": optimizer.state_dict(), "ema": ema.shadow if ema is not None else {},
                "running": sums, "running_steps": counted,
            }, keep_checkpoints)

    end = total_steps if stop_after is None else min(total_steps, stop_after)
    timed, t0 = 0, time.perf_counter()
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
        counted, timed = counted + 1, timed + 1
        done = step + 1
        if done % log_every == 0 or done == end:
            means = [v / counted for v in reduced(running)]
            record = {"step": done, **dict(zip(running, means)), "lr": optimizer.param_groups[0]["lr"],
                      "seconds_per_step": (time.perf_counter() - t0) / timed}
            if done % log_every == 0 or done == total_steps:
                running, counted, timed, t0 = {}, 0, 0, time.perf_counter()
            # else stopped by stop_after mid-window: the sums go into the checkpoint, and the resumed run's record
            # for this window is the uninterrupted run's.
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
