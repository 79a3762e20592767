"""Run by ``torchrun --nproc_per_node 2`` from tests: the shared loop under DDP on the CPU (gloo), each process
writing what it saw and what it ended with to ``<out>/rank<i>.json``."""
import json
import sys
from pathlib import Path

from accelerate import PartialState

from fewstep.training.loop import end_process_group, training_loop

sys.path.insert(0, str(Path(__file__).parent))
from test_training_loop import Regression, batch_fn, loss_fn  # noqa: E402


class Forwarded(Regression):
    """The loss in ``forward``, as every fewstep method has it: DDP syncs gradients only of calls through its wrapper."""

    def forward(self, batch, gen):
        return loss_fn(self, batch, gen)


def main(out: str) -> None:
    seen = []

    def recording_batch_fn(gen):
        batch = batch_fn(gen)
        seen.append(batch["x"][0].tolist())
        return batch

    model = training_loop(Path(out) / "run", Forwarded(), lambda m, b, g: m(b, g), recording_batch_fn, 6, lr=1e-2, grad_clip=0, ema_decay=None, progress=False, log_every=3)
    state = PartialState()
    weights = {n: p.tolist() for n, p in model.named_parameters() if p.requires_grad}
    (Path(out) / f"rank{state.process_index}.json").write_text(json.dumps(
        {"distributed_type": str(state.distributed_type), "processes": state.num_processes, "first_rows": seen, "weights": weights}))
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
