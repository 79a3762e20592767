"""`fewstep bench`: named sets of sampling configurations measured on the proxy benchmark.

Each configuration is scored by ``evaluation.evaluate_entry`` (same prompts, same seeds, FID, prompt accuracy, NFE,
seconds per image). Results go to ``bench/results/<set>.json``, a markdown table beside it, and one PNG grid per
configuration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import PROXY_CLASSES
from .evaluation import BUNDLED_FLASH, BUNDLED_TEACHER, DEFAULT_CFG_SCALE, StudentEntry, TeacherEntry, evaluate_entry
from .pipelines import load_teacher
from .teacher import pipeline_provenance

log = logging.getLogger("fewstep")



def is_bundled_lineage(teacher: str | Path) -> bool:
    """Is ``teacher`` the bundled proxy teacher or a fine-tune of it, however many deep (each `fewstep train finetune`
    pipeline records its parent as ``finetuned_from``)? Such teachers take the proxy's defaults, e.g. CFG 4."""
    path, bundled, seen = Path(teacher).resolve(), BUNDLED_TEACHER.resolve(), set()
    while path != bundled:
        parent = pipeline_provenance(path).get("finetuned_from")
        if path in seen or not parent:
            return False
        seen.add(path)
        path = Path(parent).resolve()
    return True


GUIDED_W = DEFAULT_CFG_SCALE - 1.0   # the teacher's CFG 4 as Meng's w


def _guided(steps: int, w: float = GUIDED_W, sampler: str | None = None) -> StudentEntry:
    return StudentEntry(steps, adapter=None, label="guided", w=w, sampler=sampler)


def _sun(steps: int, sampler: str | None = None) -> StudentEntry:
    return StudentEntry(steps, adapter=None, label="sun", sampler=sampler)


GDD_LABELS = {"full": "gdd", "gdd_i": "gdd_i", "lora": "gdd_lora"}   # a gdd_student file's variant -> its rows' label
SNAP_LABELS = ("snap", "snap_nocfg", "snap_slim")   # full-size UNet, the same without CFG-aware distillation, slim UNet


def _snap(label: str) -> StudentEntry:
    return StudentEntry(8, adapter=None, label=label, cfg_scale=DEFAULT_CFG_SCALE)


def bench_label(metadata) -> str:
    """The label of the bench rows an adapter file serves: its method (GDD: per variant; SnapFusion: slim or full
    UNet, with or without CFG-aware distillation)."""
    if metadata.kind == "snap_student":
        if metadata.extra.get("slim"):
            return "snap_slim"
        return "snap_nocfg" if (metadata.provenance or {}).get("config", {}).get("cfg_probability") == 0 else "snap"
    if metadata.kind == "gdd_student":
        label = GDD_LABELS.get(metadata.extra.get("variant"), "gdd")
    else:
        label = metadata.kind.split("_")[0]
    return f"{label}_synth" if "synthesized" in (metadata.provenance or {}) else label


BENCH_SETS = {
    "teacher": [TeacherEntry(s) for s in (50, 25, 8, 4, 2)],
    # The student at its file's sampler, and at 4 and 2 steps also with the paper's LCM re-noising (consistency).
    "flash": [TeacherEntry(50), TeacherEntry(4), TeacherEntry(2), StudentEntry(4), StudentEntry(2), StudentEntry(1),
              StudentEntry(4, sampler="consistency"), StudentEntry(2, sampler="consistency")],
    # Stage 1 at the teacher's step count (half the NFE), the few-step rows both samplers, and w as a control.
    "guided": [TeacherEntry(50), _guided(50), TeacherEntry(8), TeacherEntry(4),
               *[_guided(n, sampler=s) for n in (8, 4, 2, 1) for s in ("ddim", "stochastic")],
               *[e for w in (0.0, 1.0, 6.0) for e in (TeacherEntry(50, w + 1.0), _guided(50, w))]],
    # The adapter's own sampler (DPM-Solver++) and DDIM at 4 steps, then 8 and 2; plus the negative-prompt study.
    "sun": [TeacherEntry(50), TeacherEntry(8), TeacherEntry(4), _sun(4), _sun(4, "ddim"), _sun(8), _sun(2)],
    # One step: the teacher (the generator's starting point, with CFG), Flash, and each GDD variant given (the ablation),
    # trained on the real images or on the teacher's samples (`--data-free`, or `--data` a `fewstep synth` folder).
    "gdd": [TeacherEntry(50), TeacherEntry(1), StudentEntry(1),
            *[StudentEntry(1, adapter=None, label=label + data) for data in ("", "_synth") for label in GDD_LABELS.values()]],
    # Eight steps: the teacher (50 and 8), the guided student, SnapFusion's students with CFG (the ablation, the slim UNet).
    "snapfusion": [TeacherEntry(50), TeacherEntry(8), _guided(8), *[_snap(label) for label in SNAP_LABELS]],
    # Flash on the real training images (the bundled LoRA) next to Flash on a set the teacher synthesized.
    "data_free": [TeacherEntry(50), TeacherEntry(4), *[StudentEntry(n, label=label, adapter=adapter) for n in (4, 2, 1)
                                                       for label, adapter in (("flash", str(BUNDLED_FLASH)), ("flash_synth", None))]],
}

# The negative-prompt study: a prompt that names no class, sampled with an empty negative prompt and with a class's.
# Under the proxy's (randomly initialised, frozen) text encoder "a handwritten digit" gives mostly twos (87% of the
# teacher's samples) and some threes: "two" shows whether a negative prompt removes what a prompt gives; "seven",
# rare under this prompt, is the class named in the SUN issue.
NEUTRAL_PROMPT = "a handwritten digit"
NEGATIVE_CLASSES = ("a handwritten digit two", "a handwritten digit seven")
NEGATIVE_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)


def run_bench(
    set_name: str = "teacher",            # which BENCH_SETS entry
    teacher: str | Path = BUNDLED_TEACHER,  # the pipeline folder to sample
    per_class: int = 50,                  # samples per class (20 classes); 50 -> 1,000 images per configuration
    batch_size: int = 250,                # samples generated together
    out_dir: str | Path = "bench/results",  # JSON, markdown and grids go here
    progress: bool = True,                # progress bar over configurations
    adapter: str | Path | Sequence[str | Path] | None = None,  # student file(s): each student row takes the one made
                                                                # for its step count, else the first (flash: the bundled one)
    plan: str | Path | None = None,       # snapfusion: the `fewstep snap plan --out` file whose block table to include
) -> dict:
    """Run a bench set and write its results; returns the JSON document."""
    from tqdm.auto import tqdm

    from .proxy_classifier import proxy_classifier_metadata

    if set_name not in BENCH_SETS:
        raise ValueError(f"unknown bench set {set_name!r}; expected one of {sorted(BENCH_SETS)}")
    out_dir = Path(out_dir)
    pipe = load_teacher(teacher, device="cuda" if torch.cuda.is_available() else "cpu")
    adapters = [str(a) for a in ([adapter] if isinstance(adapter, (str, Path)) else adapter or [])]
    entries = [resolved for e in BENCH_SETS[set_name]
               for resolved in (_with_adapters(e, adapters) if isinstance(e, StudentEntry) else [e])]
    skipped = [e.name for e in entries if isinstance(e, StudentEntry) and e.adapter is None]
    if skipped:
        log.warning("no --adapter file for %s: left out", ", ".join(skipped))
    entries = [e for e in entries if e.name not in skipped]
    rows = []
    for entry in tqdm(entries, desc=f"bench {set_name}", disable=not progress):
        rows.append(evaluate_entry(pipe, entry, per_class, batch_size, grid_path=out_dir / f"{set_name}-grids" / f"{entry.name}.png"))
        if isinstance(entry, StudentEntry):
            rows[-1]["training"] = training_data(entry.adapter)
        log.info("%s: FID %.2f, accuracy %.3f", entry.name, rows[-1]["fid"], rows[-1]["prompt_accuracy"])
    document = {
        "sanity": fid_sanity(per_class),
        "set": set_name, "teacher": str(teacher), "adapters": sorted({e.adapter for e in entries if isinstance(e, StudentEntry)}),
        "samples_per_configuration": per_class * len(PROXY_CLASSES), "per_class": per_class,
        "reference": "proxy held-out split (1,500 real images), EfficientNet-Lite0 features",
        "classifier_heldout_accuracy": proxy_classifier_metadata().get("heldout_accuracy"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
        "results": rows,
    }
    if set_name == "snapfusion":
        document.update(snapfusion_measurements(pipe, [e for e in entries if getattr(e, "label", None) in SNAP_LABELS], plan))
    if set_name == "data_free":
        document["synth"] = data_free_cost(entries)
    if set_name == "sun":
        document["negative_prompt"] = negative_prompt_study(pipe, next(e.adapter for e in entries if isinstance(e, StudentEntry)),
                                                          per_class * 10, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{set_name}.json").write_text(json.dumps(document, indent=2) + "\n")
    (out_dir / f"{set_name}.md").write_text(markdown_table(document))
    return document


def snapfusion_measurements(pipe, entries: Sequence[StudentEntry], plan: str | Path | None) -> dict:
    """Per-pass latency of each SnapFusion student's UNet and decoder as ratios to the teacher's (on this machine), and
    the block table its architecture was planned from."""
    from .latency import pass_latencies
    from .students import load_student

    measured = {"latency": pass_latencies(pipe, {e.name: load_student(pipe, e.adapter) for e in entries})}
    if plan is not None:
        measured["block_table"] = {"file": str(plan), **json.loads(Path(plan).read_text())}
    return measured


def data_free_cost(entries: Sequence[TeacherEntry | StudentEntry]) -> dict:
    """How each synthesized-data student's set was made and what synthesizing it cost (its ``synth_log.jsonl``)."""
    from ..core.adapter_file import describe, read_header
    from .synth_sets import synth_cost

    sets = {}
    for entry in entries:
        made = describe(read_header(entry.adapter), Path(entry.adapter).name)[0].provenance if isinstance(entry, StudentEntry) else {}
        if "synthesized" in (made or {}):
            settings = made["synthesized"]
            sets[entry.adapter] = {"settings": settings, "cost": synth_cost(settings["path"])}
    return sets


def _with_adapters(entry: StudentEntry, adapters: list[str]) -> list[StudentEntry]:
    """The entry with its file: of the files for its method (``bench_label``), the one made for its step count (e.g. one
    progressive round's student), else the first; the entry's default (Flash: the bundled LoRA) when none is for its
    method. Several files made for its step count (one method trained for different lengths) each get a row, labelled
    with their training steps (or their file name where those do not tell them apart)."""
    from ..core.adapter_file import describe, read_header

    metadata = {path: describe(read_header(path), Path(path).name)[0] for path in adapters}
    mine = [path for path in adapters if bench_label(metadata[path]) == entry.label]
    made_for_steps = [path for path in mine if metadata[path].steps == entry.steps]
    if len(made_for_steps) < 2:
        return [dataclasses.replace(entry, adapter=made_for_steps[0] if made_for_steps else mine[0] if mine else entry.adapter)]
    lengths = [(metadata[path].provenance or {}).get("train_steps") for path in made_for_steps]
    tags = lengths if None not in lengths and len(set(lengths)) == len(lengths) else [Path(p).stem for p in made_for_steps]
    return [dataclasses.replace(entry, adapter=path, label=f"{entry.label}@{tag}") for path, tag in zip(made_for_steps, tags)]


def training_data(adapter: str) -> dict:
    """What a student file learnt from, as its provenance says: dataset size, steps, images seen (steps x batch)."""
    from ..core.adapter_file import describe, read_header

    made = describe(read_header(adapter), Path(adapter).name)[0].provenance or {}
    steps, batch = made.get("train_steps"), made.get("batch_size")
    return {"dataset_images": made.get("images"), "train_steps": steps, "batch_size": batch,
            "images_seen": steps * batch if steps and batch else None}


def fid_sanity(per_class: int) -> dict:
    """FID at the same sample count for real training images (the floor) and uniform noise (the ceiling)."""
    from .data import load_proxy_dataset
    from .metrics import fid_to_heldout

    train = load_proxy_dataset("train")
    idx = np.concatenate([np.flatnonzero(train.labels == c)[:per_class] for c in range(len(PROXY_CLASSES))])
    noise = np.random.default_rng(0).integers(0, 256, size=(len(idx), 32, 32, 3), dtype=np.uint8)
    return {"real_train_images": fid_to_heldout(train.images[idx]), "uniform_noise": fid_to_heldout(noise)}


def negative_prompt_study(pipe, adapter: str, samples: int, batch_size: int, steps: int = 4,
                          strengths: Sequence[float] = NEGATIVE_STRENGTHS, teacher_steps: int = 50,
                          classes: Sequence[str] = NEGATIVE_CLASSES) -> dict:
    """How often the neutral prompt gives a class, with an empty negative prompt and with that class as the negative:
    for the teacher with CFG (at ``teacher_steps``) and the SUN adapter at ``steps``, over negative strengths."""
    from .proxy_classifier import classify_proxy_images
    from .students import load_student

    captions, seeds = [NEUTRAL_PROMPT] * samples, list(range(samples))
    teacher = TeacherEntry(teacher_steps)
    configurations = [(teacher.name, None, lambda neg: teacher.generate(pipe, captions, seeds, batch_size, neg))]
    for strength in strengths:
        student = load_student(pipe, adapter, negative_strength=strength)
        configurations.append((f"sun-{steps}steps", strength, lambda neg, student=student: np.concatenate([
            student.images(captions[i:i + batch_size], seeds[i:i + batch_size], steps, negative=neg)
            for i in range(0, samples, batch_size)])))
    rows = []
    for name, strength, generate in configurations:
        empty = classify_proxy_images(generate(""))
        for negative in classes:
            label = PROXY_CLASSES.index(negative)
            with_empty = float((empty == label).double().mean())
            with_class = float((classify_proxy_images(generate(negative)) == label).double().mean())
            rows.append({"name": name, "negative_strength": strength, "negative": negative, "rate_empty_negative": with_empty,
                         "rate_class_negative": with_class, "ratio": with_class / with_empty if with_empty else None})
    return {"prompt": NEUTRAL_PROMPT, "samples": samples,
            "measure": "share of samples the proxy classifier assigns to the class named as negative prompt", "rows": rows}


def markdown_table(document: dict) -> str:
    trained = any("training" in r for r in document["results"])   # a column for what the students learnt from
    lines = ["| configuration | NFE | FID ↓ | prompt accuracy ↑ | s / image |" + (" training images seen (dataset) |" if trained else ""),
             "|---|---|---|---|---|" + ("---|" if trained else "")]
    for r in document["results"]:
        lines.append(f"| {r['name']} | {r['nfe']} | {r['fid']:.2f} | {r['prompt_accuracy']:.3f} | {r['seconds_per_image']:.4f} |"
                     + (f" {_seen(r.get('training'))} |" if trained else ""))
    if "sanity" in document:
        sanity = document["sanity"]
        blank = " – |" if trained else ""
        lines.append(f"| *real training images* | – | {sanity['real_train_images']:.2f} | – | – |{blank}")
        lines.append(f"| *uniform noise* | – | {sanity['uniform_noise']:.2f} | – | – |{blank}")
    lines.append("")
    lines.append(f"{document['samples_per_configuration']} samples per configuration; {document['reference']}; "
                 f"classifier accuracy on real held-out images {document['classifier_heldout_accuracy']}; {document['machine']}.")
    if "latency" in document:
        lines += ["", "| per-pass latency, ratio to the teacher's | UNet (batch 2) | decoder |", "|---|---|---|"]
        for name, unet in document["latency"]["unet"].items():
            decoder = document["latency"]["decoder"].get(name)
            lines.append(f"| {name} | {unet['ratio_to_teacher']:.3f} | {decoder['ratio_to_teacher']:.3f} |" if decoder else
                         f"| {name} | {unet['ratio_to_teacher']:.3f} | – (the teacher's) |")
    for file, made in document.get("synth", {}).items():
        settings, cost = made["settings"], made["cost"]
        lines += ["", f"{Path(file).name}: trained on {settings['count']} samples the teacher synthesized from the prompts "
                  f"{settings['prompts']!r} ({settings['steps']} DDIM steps, CFG {settings['cfg_scale']:g}, {settings['layout']}): "
                  f"{cost['seconds']:.0f} s to synthesize, {cost['seconds_per_sample']} s per sample"
                  f" ({', '.join(cost['devices'])})."]
    if "negative_prompt" in document:
        study = document["negative_prompt"]
        lines += ["", f"Prompt {study['prompt']!r}, {study['samples']} samples: {study['measure']}.", "",
                  "| configuration | negative strength | class | rate, empty negative | rate, the class as negative | ratio |",
                  "|---|---|---|---|---|---|"]
        for r in study["rows"]:
            strength = "–" if r["negative_strength"] is None else f"{r['negative_strength']:g}"
            ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(f"| {r['name']} | {strength} | {r['negative'].split()[-1]} | {r['rate_empty_negative']:.3f} | "
                         f"{r['rate_class_negative']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def _seen(training: dict | None) -> str:
    if not training:
        return "–"
    seen = "?" if training["images_seen"] is None else f"{training['images_seen']:,}"
    return seen + (f" ({training['dataset_images']:,})" if training["dataset_images"] else "")
