"""`fewstep quickstart`: the main job end to end on the bundled teacher, in minutes on a laptop CPU.

Samples the teacher at full steps and at few steps (the gap distillation closes), distils a few-step
student with the best method available for a short budget, samples it, and puts the bundled fully
trained student beside it; writes a side-by-side grid and a metrics table. A stopped quickstart continues: the
student's training resumes from its checkpoints and configurations already measured are not sampled again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .bench import markdown_table
from .bundled import BUNDLED_FLASH, BUNDLED_TEACHER
from .evaluation import StudentEntry, TeacherEntry, evaluate_entry
from .data import DATA_PACKAGES, require_packages
from .loop import holding_run_dir
from .proxy_classifier import proxy_classifier_metadata
from .scores import RESAMPLES
from .pipelines import load_teacher

log = logging.getLogger("fewstep")

# The distillation methods available to the quickstart, best first; it trains the first one.
STUDENT_METHODS: list[str] = ["flash"]


@holding_run_dir
def run_quickstart(out_dir: str | Path = "quickstart", teacher: str | Path = BUNDLED_TEACHER, per_class: int = 10,
                   student_steps: int = 80, resume: bool = True) -> dict:
    """Write ``out_dir/grid.png`` (rows: configurations; columns: the 20 prompts) and ``out_dir/metrics.md``.

    ``student_steps``: training steps of the quickstart's own Flash student (spread over the method's four phases).
    ``resume``: continue a stopped quickstart in ``out_dir`` made with the same options (else it starts over).
    """
    from .data import load_proxy_dataset
    from .methods.flash import load_config, train_flash

    require_packages(DATA_PACKAGES)   # every one, now: the FID network's are otherwise missed only after training
    out_dir = Path(out_dir)
    resume = _resumable(out_dir, {"teacher": str(Path(teacher).resolve()), "per_class": per_class,
                                  "student_steps": student_steps}, resume)
    pipe = load_teacher(teacher)
    per_phase = max(1, student_steps // 4)
    config = load_config("proxy", phase_steps=[per_phase] * 4)
    log.info("distilling a Flash student for %d steps (the bundled one had %d)", config.total_steps,
             load_config("proxy").total_steps)
    student = train_flash(teacher, load_proxy_dataset("train"), out_dir / "flash-run", out_dir / "flash_lora.safetensors", config,
                          sample_every=0, checkpoint_every=max(1, config.total_steps // 4), resume=resume)
    entries = [TeacherEntry(25), TeacherEntry(4), StudentEntry(4, str(student), label="flash-quickstart")]
    if BUNDLED_FLASH.is_file():
        entries.append(StudentEntry(4, str(BUNDLED_FLASH), label="flash-bundled"))
    rows = [_measured(out_dir, e, lambda e=e: evaluate_entry(pipe, e, per_class, batch_size=200,
                                                              grid_path=out_dir / "grids" / f"{e.name}.png"))
            for e in entries]
    # Stack each configuration's first grid row: same prompts and seeds, one configuration per row.
    strips = [np.asarray(Image.open(r["grid"]))[:32] for r in rows]
    Image.fromarray(np.concatenate(strips)).resize((strips[0].shape[1] * 3, 32 * len(strips) * 3), Image.NEAREST).save(out_dir / "grid.png")
    document = {"samples_per_configuration": per_class * 20, "resamples": RESAMPLES,
                "reference": "class-balanced proxy held-out split (50 real images per class), validation seeds",
                "classifier_heldout_accuracy": proxy_classifier_metadata().get("heldout_accuracy"), "machine": "this machine",
                "results": rows}
    (out_dir / "metrics.md").write_text(markdown_table(document))
    return document


SETTINGS_FILE = "quickstart.json"
ROWS_DIR = "rows"


def _resumable(out_dir: Path, settings: dict, resume: bool) -> bool:
    """Whether to continue a quickstart in ``out_dir``: asked to, and it has these settings. If not, what it measured
    is removed (its student's checkpoints go when the student trains with resume=False)."""
    path = out_dir / SETTINGS_FILE
    same = resume and path.is_file() and json.loads(path.read_text()) == settings
    if not same:
        shutil.rmtree(out_dir / ROWS_DIR, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")
    return same


def _measured(out_dir: Path, entry, measure) -> dict:
    """A configuration's row, measured once: kept in ``out_dir/rows/NAME.json`` (with its grid) for a rerun."""
    path = out_dir / ROWS_DIR / f"{entry.name}.json"
    if path.is_file():
        row = json.loads(path.read_text())
        if Path(row.get("grid", "")).is_file():
            log.info("%s: measured by an earlier run of this quickstart", entry.name)
            return row
    row = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(row, indent=2) + "\n")
    os.replace(tmp, path)
    return row
