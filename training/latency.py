"""Latency measured as the benchmark quotes it: calls interleaved so that drifts of clock or load hit all alike, the
median per call, CUDA synchronised around each; a UNet pass's inputs at the teacher's native size."""

from __future__ import annotations

import statistics
import time

import torch

from .pipelines import PromptEncoder, cast_cond


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
