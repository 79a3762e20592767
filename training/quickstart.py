"""`fewstep quickstart`: the main job end to end on the bundled teacher, in minutes on a laptop CPU.

Samples the teacher at full steps and at few steps (the gap distillation closes), distils a few-step
student with the best method available for a short budget, samples it, and puts the bundled fully
trained student beside it; writes a side-by-side grid and a metrics table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .bench import BUNDLED_FLASH, BUNDLED_TEACHER, StudentEntry, TeacherEntry, evaluate_entry, markdown_table
from .metrics import proxy_classifier_metadata
from .pipelines import load_teacher

log = logging.getLogger("fewstep")

# The distillation methods available to the quickstart, best first; it trains the first one.
STUDENT_METHODS: list[str] = ["flash"]


def run_quickstart(out_dir: str | Path = "quickstart", teacher: str | Path = BUNDLED_TEACHER, per_class: int = 10,
                   student_steps: int = 80) -> dict:
    """Write ``out_dir/grid.png`` (rows: configurations; columns: the 20 prompts) and ``out_dir/metrics.md``.

    ``student_steps``: training steps of the quickstart's own Flash student (spread over the method's four phases).
    """
    from .data import load_proxy_dataset
    from .methods.flash import load_config, train_flash

    out_dir = Path(out_dir)
    pipe = load_teacher(teacher)
    per_phase = max(1, student_steps // 4)
    config = load_config("proxy", phase_steps=[per_phase] * 4)
    log.info("distilling a Flash student for %d steps (the bundled one had %d)", config.total_steps,
             load_config("proxy").total_steps)
    student = train_flash(teacher, load_proxy_dataset("train"), out_dir / "flash-run", out_dir / "flash_lora.safetensors", config,
                          sample_every=0, checkpoint_every=max(1, config.total_steps // 4), resume=False)
    entries = [TeacherEntry(25), TeacherEntry(4), StudentEntry(4, str(student), label="flash-quickstart")]
    if BUNDLED_FLASH.is_file():
        entries.append(StudentEntry(4, str(BUNDLED_FLASH), label="flash-bundled"))
    rows = [evaluate_entry(pipe, e, per_class, batch_size=200, grid_path=out_dir / "grids" / f"{e.name}.png") for e in entries]
    # Stack each configuration's first grid row: same prompts and seeds, one configuration per row.
    strips = [np.asarray(Image.open(r["grid"]))[:32] for r in rows]
    Image.fromarray(np.concatenate(strips)).resize((strips[0].shape[1] * 3, 32 * len(strips) * 3), Image.NEAREST).save(out_dir / "grid.png")
    document = {"samples_per_configuration": per_class * 20, "reference": "proxy held-out split, EfficientNet-Lite0 features",
                "classifier_heldout_accuracy": proxy_classifier_metadata().get("heldout_accuracy"), "machine": "this machine",
                "results": rows}
    (out_dir / "metrics.md").write_text(markdown_table(document))
    return document
