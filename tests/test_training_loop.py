"""The shared training loop: the loss falls, checkpoints are atomic, and a killed run resumes exactly."""
import json

import pytest
import torch

from fewstep.training.loop import latest_checkpoint, load_checkpoint, training_loop


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)


TRUE_W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def batch_fn(gen):
    x = torch.randn(32, 4, generator=gen)
    return {"x": x, "y": x @ TRUE_W}


def loss_fn(model, batch, gen):
    noise = 0.01 * torch.randn(batch["y"].shape, generator=gen)
    return (model.net(batch["x"]) - batch["y"] - noise).pow(2).mean(1)


def run(tmp, **kw):
    options = dict(total_steps=12, lr=1e-2, checkpoint_every=4, ema_decay=0.9, progress=False, log_every=2)
    return training_loop(tmp, Regression(), loss_fn, batch_fn, **{**options, **kw})


def test_loss_falls_and_metrics_are_logged(tmp_path):
    run(tmp_path, total_steps=60)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < 0.2 * losses[0]


def test_killed_run_resumes_to_identical_weights(tmp_path):
    straight = run(tmp_path / "straight")
    run(tmp_path / "killed", stop_after=6)  # as if killed after step 6
    assert load_checkpoint(latest_checkpoint(tmp_path / "killed"))["step"] == 6
    resumed = run(tmp_path / "killed")
    assert load_checkpoint(latest_checkpoint(tmp_path / "killed"))["step"] == 12
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoints_are_pruned_and_leave_no_temporary_files(tmp_path):
    run(tmp_path, keep_checkpoints=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000008.pt", "step-00000012.pt"]
    # Only trainable parameters are stored; the frozen layer comes from the model definition.
    assert all(k.startswith("net.") for k in load_checkpoint(tmp_path / "checkpoints" / names[-1])["model"])


def test_no_resume_starts_over(tmp_path):
    run(tmp_path, total_steps=4)
    run(tmp_path, total_steps=4, resume=False, stop_after=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002.pt"]


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    run(tmp_path, total_steps=4)

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.other = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="does not belong to this model"):
        training_loop(tmp_path, Other(), loss_fn, batch_fn, total_steps=8, progress=False)


def test_ema_follows_the_model_to_its_device():
    """accelerate moves the model after the EMA is made (and a resumed EMA comes from a CPU checkpoint)."""
    from fewstep.training.loop import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    model.to("meta")
    ema.update(model, 1)
    assert all(t.device.type == "meta" for t in ema.shadow.values())


def test_ema_warms_up_like_diffusers_ema_model():
    """A short run's EMA must be its recent weights, not the initial ones; diffusers' EMAModel is the reference."""
    from diffusers.training_utils import EMAModel

    from fewstep.training.loop import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ours, reference = EMA(model, decay=0.999), EMAModel(model.parameters(), decay=0.999)
    for step in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model, step)
        reference.step(model.parameters())
    for value, expected in zip(ours.shadow.values(), reference.shadow_params):
        torch.testing.assert_close(value, expected)


def test_two_processes_draw_their_own_batches_and_train_one_model(tmp_path):
    """DDP as ``accelerate launch``/``torchrun`` runs it, on the CPU (gloo): each process its own batch, one set of
    weights, equal to one process stepping on both batches; only the main process writes metrics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fewstep.training.loop import step_generator

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.MULTI_CPU"} and ranks[0]["processes"] == 2
    assert all(a != b for a, b in zip(ranks[0]["first_rows"], ranks[1]["first_rows"]))
    assert ranks[0]["weights"] == ranks[1]["weights"]

    # The same six steps in one process on the two batches together (DDP averages the per-process mean gradients).
    reference = Regression()
    params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for step in range(6):
        losses = []
        for process in range(2):
            gen = step_generator(0, step, process)
            losses.append(loss_fn(reference, batch_fn(gen), gen).mean())
        optimizer.zero_grad()
        torch.stack(losses).mean().backward()
        optimizer.step()
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(torch.tensor(ranks[0]["weights"][name]), p.detach(), atol=1e-6, rtol=1e-5)
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [3, 6]
