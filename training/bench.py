"""`fewstep bench`: named sets of sampling configurations measured on the proxy benchmark.

Each configuration is scored by ``evaluation.evaluate_entry`` on one split (``test`` unless asked otherwise; choices
are made on ``validation``): same prompts, same seeds, both FIDs, class FID, precision and recall, prompt accuracy, each
with its interval, NFE and seconds per image. Every set holds the teacher at 50 steps with CFG 4 and at its best CFG
on validation; every other row says, per score, whether it differs from each of them beyond the noise
(``scores.compare``). Results go to ``bench/results/<set>.json``, a markdown table beside it, and one PNG grid per
configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.adapter_file import atomic_write
from .data import PROXY_CLASSES
from . import attributes
from .bundled import BUNDLED_ATTRIBUTES_TEACHER, BUNDLED_FLASH, BUNDLED_TEACHER, bundled_teacher_data
from .evaluation import ATTRIBUTES_BEST_CFG_SCALE, BEST_CFG_SCALE, DEFAULT_CFG_SCALE, PROXY, PromptSuite, StudentEntry, TeacherEntry, evaluate_entry
from .scores import RESAMPLES, WITHIN_NOISE, Z_95, compare
from .pipelines import load_teacher
from .teacher import pipeline_provenance

log = logging.getLogger("fewstep")



def is_bundled_lineage(teacher: str | Path) -> bool:
    """Is ``teacher`` a bundled proxy teacher or a fine-tune of one, however many deep (each `fewstep train finetune`
    pipeline records its parent as ``finetuned_from``)? Such teachers take the proxy's defaults, e.g. CFG 4."""
    path, seen = Path(teacher).resolve(), set()
    while bundled_teacher_data(path) is None:
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
    else:   # an LCM-LoRA is a consistency LoRA like Flash's: its provenance tells them apart
        label = "lcm" if (metadata.provenance or {}).get("method") == "lcm" else metadata.kind.split("_")[0]
    return f"{label}_synth" if "synthesized" in (metadata.provenance or {}) else label


# The teacher at 50 steps with CFG 4 and at its best CFG: the rows every other row is compared with.
BASELINES = (TeacherEntry(50), TeacherEntry(50, BEST_CFG_SCALE))
CFG_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)


@dataclasses.dataclass(frozen=True)
class BenchSet:
    """A bench set: its rows, the rows the others are compared with, the prompts and scores it is measured on, and the
    bundled teacher it samples unless given another."""

    entries: tuple[TeacherEntry | StudentEntry, ...]
    baselines: tuple[TeacherEntry, ...] = BASELINES
    suite: PromptSuite = PROXY
    teacher: Path = BUNDLED_TEACHER


def _proxy(*entries: TeacherEntry | StudentEntry) -> BenchSet:
    return BenchSet((*BASELINES, *entries))


# The attributes split (attributes.py): its own teacher, trained on it, its prompts and its scores; the same two
# baselines, its best CFG chosen on validation with its own sweep.
ATTRIBUTE_BASELINES = (TeacherEntry(50), TeacherEntry(50, ATTRIBUTES_BEST_CFG_SCALE))


def _attributes(*entries: TeacherEntry | StudentEntry) -> BenchSet:
    return BenchSet(entries, ATTRIBUTE_BASELINES, attributes.SUITE, BUNDLED_ATTRIBUTES_TEACHER)


BENCH_SETS = {
    "teacher": _proxy(*[TeacherEntry(s) for s in (25, 8, 4, 2)]),
    # Where BEST_CFG_SCALE comes from: run on validation only.
    "cfg": BenchSet(tuple(TeacherEntry(50, s) for s in CFG_SWEEP)),
    # The student at its file's sampler, and at 4 and 2 steps also with the paper's LCM re-noising (consistency).
    "flash": _proxy(TeacherEntry(4), TeacherEntry(2), StudentEntry(4), StudentEntry(2), StudentEntry(1),
                    StudentEntry(4, sampler="consistency"), StudentEntry(2, sampler="consistency")),
    # Stage 1 at the teacher's step count (half the NFE), the few-step rows both samplers, and w as a control.
    "guided": _proxy(_guided(50), TeacherEntry(8), TeacherEntry(4),
                     *[_guided(n, sampler=s) for n in (8, 4, 2, 1) for s in ("ddim", "stochastic")],
                     *[e for w in (0.0, 1.0, 6.0) for e in (TeacherEntry(50, w + 1.0), _guided(50, w))]),
    # The adapter's own sampler (DPM-Solver++) and DDIM at 4 steps, then 8 and 2; plus the negative-prompt study.
    "sun": _proxy(TeacherEntry(8), TeacherEntry(4), _sun(4), _sun(4, "ddim"), _sun(8), _sun(2)),
    # One step: the teacher (the generator's starting point, with CFG), Flash, and each GDD variant given (the ablation),
    # trained on the real images or on the teacher's samples (`--data-free`, or `--data` a `fewstep synth` folder).
    "gdd": _proxy(TeacherEntry(1), StudentEntry(1),
                  *[StudentEntry(1, adapter=None, label=label + data) for data in ("", "_synth") for label in GDD_LABELS.values()]),
    # Eight steps: the teacher (50 and 8), the guided student, SnapFusion's students with CFG (the ablation, the slim UNet).
    "snapfusion": _proxy(TeacherEntry(8), _guided(8), *[_snap(label) for label in SNAP_LABELS]),
    # Flash on the real training images (the bundled LoRA) next to Flash on a set the teacher synthesized.
    "data_free": _proxy(TeacherEntry(4), *[StudentEntry(n, label=label, adapter=adapter) for n in (4, 2, 1)
                                           for label, adapter in (("flash", str(BUNDLED_FLASH)), ("flash_synth", None))]),
    # The teacher at 50, 8, 4 and 2 steps with and without CFG, and Flash and SUN students distilled from it (--adapter).
    "attributes": _attributes(*ATTRIBUTE_BASELINES, *[TeacherEntry(s, c) for s in (50, 8, 4, 2) for c in (DEFAULT_CFG_SCALE, 1.0)],
                              *[StudentEntry(n, adapter=None, label=label) for label in ("flash", "sun") for n in (4, 2)]),
    "attributes_cfg": _attributes(*[TeacherEntry(50, s) for s in CFG_SWEEP]),
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
    teacher: str | Path | None = None,    # the pipeline folder to sample (default: the set's, ``BenchSet.teacher``)
    per_class: int = 25,                  # samples per class (20 classes) in each seed set
    batch_size: int = 250,                # samples generated together
    out_dir: str | Path = "bench/results",  # JSON, markdown and grids go here
    progress: bool = True,                # progress bar over configurations
    adapter: str | Path | Sequence[str | Path] | None = None,  # student file(s): each student row takes the one made
                                                                # for its step count, else the first (flash: the bundled one)
    plan: str | Path | None = None,       # snapfusion: the `fewstep snap plan --out` file whose block table to include
    split: str = "test",                  # "test" (what tables report) or "validation" (what choices are made on)
    seed_sets: int = 2,                   # disjoint seed sets; 25 x 2 -> 1,000 images per configuration
    resamples: int = RESAMPLES,           # bootstrap draws per score
    samples: dict | None = None,          # generated images shared with other run_bench calls (the same pipe)
    pipe=None,                            # the loaded teacher (default: load ``teacher``)
    resume: bool = True,                  # reuse the rows a stopped run already scored with the same inputs
) -> dict:
    """Run a bench set and write its results; returns the JSON document. Each row is saved as it is scored
    (``<out_dir>/<set>-rows/``), so a stopped bench, rerun, scores only the rows it had not finished."""
    from tqdm.auto import tqdm

    from .proxy_classifier import proxy_classifier_metadata

    if set_name not in BENCH_SETS:
        raise ValueError(f"unknown bench set {set_name!r}; expected one of {sorted(BENCH_SETS)}")
    bench_set = BENCH_SETS[set_name]
    out_dir, suite = Path(out_dir), bench_set.suite
    teacher = teacher or bench_set.teacher
    pipe = pipe if pipe is not None else load_teacher(teacher, device="cuda" if torch.cuda.is_available() else "cpu")
    adapters = [str(a) for a in ([adapter] if isinstance(adapter, (str, Path)) else adapter or [])]
    entries = list(dict.fromkeys(resolved for e in bench_set.entries     # BEST_CFG_SCALE may be one of the set's
                                 for resolved in (_with_adapters(e, adapters) if isinstance(e, StudentEntry) else [e])))
    skipped = [e.name for e in entries if isinstance(e, StudentEntry) and e.adapter is None]
    if skipped:
        log.warning("no --adapter file for %s: left out", ", ".join(skipped))
    entries = [e for e in entries if e.name not in skipped]
    name = set_name if split == "test" else f"{set_name}_{split}"   # the files' names
    teacher_digest = files_digest(teacher)
    rows = [scored_row(pipe, entry, out_dir, name, teacher_digest, per_class, batch_size, split, seed_sets, resamples,
                       samples, suite, resume)
            for entry in tqdm(entries, desc=f"bench {set_name} ({split})", disable=not progress)]
    baselines = [r for r in rows if r["name"] in {b.name for b in bench_set.baselines}]
    if resamples:
        for row in rows:
            row["vs"] = {b["name"]: compare(row, b) for b in baselines if b is not row}
    document = {
        "set": set_name, "split": split, "teacher": str(teacher),
        "adapters": sorted({e.adapter for e in entries if isinstance(e, StudentEntry)}),
        "prompts": suite.name, "scores": list(suite.scores),
        "samples_per_configuration": per_class * seed_sets * len(PROXY_CLASSES), "per_class": per_class, "seed_sets": seed_sets,
        "resamples": resamples, "baselines": [b["name"] for b in baselines],
        "sanity": suite.sanity(per_class, seed_sets, resamples),
        "reference": suite.reference,
        "classifier_heldout_accuracy": proxy_classifier_metadata().get("heldout_accuracy"),
        "machine": machine_description(),
        "results": rows,
    }
    if set_name == "snapfusion":
        document.update(snapfusion_measurements(pipe, [e for e in entries if getattr(e, "label", None) in SNAP_LABELS], plan))
    if set_name == "data_free":
        document["synth"] = data_free_cost(entries)
    if set_name == "sun" and split == "test":   # a study to report, not a choice: not run on validation
        document["negative_prompt"] = negative_prompt_study(pipe, next(e.adapter for e in entries if isinstance(e, StudentEntry)),
                                                          per_class * 20, batch_size, split=split)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(markdown_table(document))
    return document


def scored_row(pipe, entry: TeacherEntry | StudentEntry, out_dir: Path, name: str, teacher_digest: str, per_class: int,
               batch_size: int, split: str, seed_sets: int, resamples: int, samples: dict | None, suite: PromptSuite,
               resume: bool = True) -> dict:
    """``evaluate_entry``'s row, saved as ``<out_dir>/<name>-rows/<entry>.json`` (grid: ``<name>-grids/``) and reused
    while the teacher's and the adapter's files (by digest), the entry and the layout are the same."""
    inputs = {"entry": dataclasses.asdict(entry), "teacher": teacher_digest, "prompts": suite.name, "split": split,
              "per_class": per_class, "seed_sets": seed_sets, "resamples": resamples, "batch_size": batch_size,
              "adapter": files_digest(entry.adapter) if isinstance(entry, StudentEntry) else None}
    saved_path = out_dir / f"{name}-rows" / f"{entry.name}.json"
    saved = json.loads(saved_path.read_text()) if resume and saved_path.exists() else {}
    if saved.get("inputs") == inputs:
        log.info("%s: reusing the row scored by an earlier run (%s)", entry.name, saved_path)
        return saved["row"]
    row = evaluate_entry(pipe, entry, per_class, batch_size, out_dir / f"{name}-grids" / f"{entry.name}.png",
                         split, seed_sets, resamples, samples, suite)
    if isinstance(entry, StudentEntry):
        row["training"] = training_data(entry.adapter)
    atomic_write(saved_path, lambda tmp: Path(tmp).write_text(json.dumps({"inputs": inputs, "row": row}) + "\n"))
    log.info("%s: %s", entry.name, ", ".join(f"{n} {row[n]}" for n in suite.scores))
    return row


def machine_description(device: str | torch.device | None = None) -> str:
    """What a result was measured on: architecture, torch threads, torch version, and the GPU's name or "cpu" (the
    ``device`` it ran on; default: CUDA where there is one)."""
    cuda = str(device).startswith("cuda") if device is not None else torch.cuda.is_available()
    return (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}")


def write_result(document: dict, out: str | Path, device: str | torch.device | None = None) -> Path:
    """A bench script's JSON, with what it was measured on (``machine_description(device)``), written to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**document, "machine": machine_description(device)}, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def files_digest(path: str | Path) -> str:
    """SHA-256 over a file, or over a folder's files with their relative paths: what a saved row was scored with."""
    path, digest = Path(path), hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


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


def negative_prompt_study(pipe, adapter: str, samples: int, batch_size: int, steps: int = 4,
                          strengths: Sequence[float] = NEGATIVE_STRENGTHS, teacher_steps: int = 50,
                          classes: Sequence[str] = NEGATIVE_CLASSES, split: str = "test") -> dict:
    """How often the neutral prompt gives a class, with an empty negative prompt and with that class as the negative:
    for the teacher with CFG (at ``teacher_steps``) and the SUN adapter at ``steps``, over negative strengths. Each
    rate has its 95 % interval (normal approximation of the binomial)."""
    from .evaluation import SPLITS
    from .proxy_classifier import classify_proxy_images
    from .students import load_student

    captions, seeds = [NEUTRAL_PROMPT] * samples, [SPLITS[split] + i for i in range(samples)]
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
                         "rate_class_negative": with_class, "ratio": with_class / with_empty if with_empty else None,
                         "intervals": {"rate_empty_negative": _rate_interval(with_empty, samples),
                                       "rate_class_negative": _rate_interval(with_class, samples)}})
    return {"prompt": NEUTRAL_PROMPT, "samples": samples, "split": split,
            "measure": "share of samples the proxy classifier assigns to the class named as negative prompt", "rows": rows}


def _rate_interval(rate: float, count: int) -> list[float]:
    half = Z_95 * math.sqrt(rate * (1 - rate) / count)
    return [rate - half, rate + half]


COLUMNS = {"fid": ("FID ↓", 2), "fid_classifier": ("FID, classifier features ↓", 2), "class_fid": ("class FID ↓", 2),
           "precision": ("precision ↑", 3), "recall": ("recall ↑", 3), "prompt_accuracy": ("prompt accuracy ↑", 3),
           "class_accuracy": ("class ↑", 3), "colour_accuracy": ("colour ↑", 3), "pair_accuracy": ("pair ↑", 3),
           "position_accuracy": ("position ↑", 3)}
SHORT_NAMES = {"fid": "FID", "fid_classifier": "FID-cls", "class_fid": "class FID", "precision": "precision",
               "recall": "recall", "prompt_accuracy": "accuracy", "class_accuracy": "class", "colour_accuracy": "colour",
               "pair_accuracy": "pair", "position_accuracy": "position"}


def _with_interval(row: dict, name: str) -> str:
    digits = COLUMNS[name][1]
    if row[name] is None:
        return "–"
    interval = row.get("intervals", {}).get(name)
    return f"{row[name]:.{digits}f}" + (f" ± {(interval[1] - interval[0]) / 2:.{digits}f}" if interval and None not in interval else "")


def _verdict(verdicts: dict[str, str]) -> str:
    """``compare``'s verdicts in a few words: what is better, what is worse, or "within noise"."""
    said = [f"{word}: {', '.join(SHORT_NAMES[n] for n, v in verdicts.items() if v == word)}"
            for word in ("better", "worse") if word in verdicts.values()]
    return "; ".join(said) or WITHIN_NOISE


def markdown_table(document: dict) -> str:
    rows, scores = document["results"], document.get("scores", PROXY.scores)
    trained = any("training" in r for r in rows)   # a column for what the students learnt from
    baselines = document.get("baselines", [])
    header = (["configuration", "NFE"] + [COLUMNS[n][0] for n in scores] + ["s / image"]
              + (["training images seen (dataset)"] if trained else []) + [f"vs {b}" for b in baselines])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = ([r["name"], str(r["nfe"])] + [_with_interval(r, n) for n in scores] + [f"{r['seconds_per_image']:.4f}"]
                 + ([_seen(r.get("training"))] if trained else [])
                 + ["–" if b == r["name"] else _verdict(r["vs"][b]) for b in baselines])
        lines.append("| " + " | ".join(cells) + " |")
    for sanity in document.get("sanity", {}).values():
        cells = [f"*{sanity['name']}*", "–"] + [_with_interval(sanity, n) for n in scores] + ["–"] * (1 + trained + len(baselines))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    split = document.get("split")
    layout = (f"{document['samples_per_configuration']} samples per configuration"
              + (f" ({document['seed_sets']} disjoint seed set{'s' if document['seed_sets'] > 1 else ''} of {document['per_class']} per class, {split} split)"
                 if split else ""))
    lines.append(f"{layout}; ± is the 95 % interval from {document.get('resamples', 0)} bootstrap draws over samples; "
                 f"reference: {document['reference']}; classifier accuracy on real held-out images "
                 f"{document['classifier_heldout_accuracy']}; {document['machine']}."
                 + (" A \"vs\" column names the scores that differ from that row beyond the noise (paired bootstrap, "
                    "the same sign on every seed set)." if baselines else ""))
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
        lines += ["", f"Prompt {study['prompt']!r}, {study['samples']} samples: {study['measure']} (± 95 % interval).", "",
                  "| configuration | negative strength | class | rate, empty negative | rate, the class as negative | ratio |",
                  "|---|---|---|---|---|---|"]
        for r in study["rows"]:
            strength = "–" if r["negative_strength"] is None else f"{r['negative_strength']:g}"
            ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
            rates = [f"{r[k]:.3f}" + (f" ± {(r['intervals'][k][1] - r['intervals'][k][0]) / 2:.3f}" if "intervals" in r else "")
                     for k in ("rate_empty_negative", "rate_class_negative")]
            lines.append(f"| {r['name']} | {strength} | {r['negative'].split()[-1]} | {rates[0]} | {rates[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


def _seen(training: dict | None) -> str:
    if not training:
        return "–"
    seen = "?" if training["images_seen"] is None else f"{training['images_seen']:,}"
    return seen + (f" ({training['dataset_images']:,})" if training["dataset_images"] else "")
