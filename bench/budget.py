"""Quality per unit of training compute: every method trained for the same time budgets and scored on the test split.

    python bench/step_cost.py --out bench/results/budget_step_cost.json   # first: every method's step priced in one run
    python bench/budget.py                                      # every stage, resumable: rerun to continue
    OMP_NUM_THREADS=1 python bench/budget.py --methods lcm,sun & OMP_NUM_THREADS=1 python bench/budget.py --methods flash,gdd
    python bench/budget.py --report                             # gather the scored rows: budget.json, budget.md, budget.png

A budget is minutes of training on the machine `bench/step_cost.py` measured (one run, every method in it, at equal
batch): a method gets budget / (its seconds per step) optimiser steps, so workers may share the CPU without changing
anyone's budget. A variant measured in a later run (``--step-cost`` again) is priced by its ratio to that run's LCM step,
times the first run's LCM step (or, with ``--priced-against SPEC``, by its ratio to SPEC timed in the same run). A method is ``lcm``, ``flash``, ``sun``, ``gdd``, or a variant ``NAME=METHOD[option=value,...]`` whose
step cost `step_cost.py` measured under the same ``METHOD[...]`` spelling. For each method:

1. its learning rate (and its discriminator's, in proportion) is chosen on the validation split: the preset's rate times
   each ``--lr-factors`` entry, trained for the smallest budget, scored on ``--validation-per-class`` x 20 samples at
   the method's first step count; the lowest FID wins;
2. the chosen rate is trained for every budget. Methods with a constant schedule continue one run (the smaller budgets'
   students are its earlier checkpoints); Flash's phases scale with its budget, so it trains once per budget;
3. each student is scored on the test split (1,000 samples, 95 % intervals) at its step counts, and every row is compared
   with LCM's at the same budget and step count (paired bootstrap: better / worse beyond the noise, or within it).

Runs go to runs/budget/, scored rows to bench/results/budget*-rows/ (committed: reused while the files are unchanged).
The report keeps the rows of the earlier budget.json that no row file here replaces, marked as carried over.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from step_cost import METHODS, parse_method, split_top_level
from fewstep.core.samplers import get_sampler
from fewstep.training.bench import files_digest, machine_description, scored_row
from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.evaluation import PROXY, StudentEntry
from fewstep.training.pipelines import load_teacher
from fewstep.training.scores import compare

log = logging.getLogger("fewstep")

TRAIN = {"lcm": "train_lcm", "flash": "train_flash", "sun": "train_sun", "gdd": "train_gdd"}
# Sampling steps scored; the first picks the rate. LCM and Flash at 1 step too: the row GDD's is compared with.
STEP_COUNTS = {"lcm": (4, 2, 1), "flash": (4, 2, 1), "sun": (4,), "gdd": (1,)}
SCORES = ("fid", "fid_classifier", "prompt_accuracy")                        # plotted and summarised


@dataclass(frozen=True)
class Method:
    name: str        # how rows and runs are named: lcm, flash, flash-shared
    spec: str        # step_cost's spelling: flash[pairs_per_rollout=4]
    method: str      # lcm | flash | sun | gdd
    options: dict

    @classmethod
    def parse(cls, text: str) -> "Method":
        name, _, spec = text.partition("=") if "=" in text.split("[")[0] else ("", "", text)
        method, options = parse_method(spec)
        return cls(name or method, spec, method, options)

    def config(self, lr_factor: float, steps: int):
        """The proxy preset with the variant's options, ``lr_factor`` times its rates, trained for ``steps``."""
        module = METHODS[self.method]
        base = module.load_config("proxy", **{k: tuple(v) if isinstance(v, list) else v for k, v in self.options.items()})
        changes = {"lr": base.lr * lr_factor}
        if hasattr(base, "disc_lr"):
            changes["disc_lr"] = base.disc_lr * lr_factor
        if self.method == "flash":   # the phases keep their proportions
            total = base.total_steps
            ends = [round(steps * sum(base.phase_steps[:i + 1]) / total) for i in range(len(base.phase_steps))]
            changes["phase_steps"] = tuple(max(1, b - a) for a, b in zip([0, *ends], ends))
        else:
            changes["steps"] = steps
        return base.replace(**changes)

    @property
    def nested(self) -> bool:
        """Whether a longer budget continues the shorter one's run (a schedule that does not depend on the length)."""
        return self.method != "flash"


def step_costs(files: list[str]) -> dict[str, float]:
    """Seconds per step by method spec: the first file's, then later files' methods at their ratio to their own LCM step
    times the first file's LCM step (a file without an LCM row can only be the first)."""
    costs: dict[str, float] = {}
    for index, file in enumerate(files):
        results = json.loads(Path(file).read_text())["results"]
        if index and "lcm" not in results:
            raise SystemExit(f"{file} has no lcm row: a later --step-cost file is priced against its own LCM step")
        scale = costs["lcm"] / results["lcm"]["seconds_per_step"] if index else 1.0
        for spec, result in results.items():
            costs.setdefault(spec, result["seconds_per_step"] * scale)
    return costs


def priced_against(costs: dict[str, float], files: list[str], spec: str, reference: str) -> float:
    """``spec``'s seconds per step as ``reference``'s price times their ratio in the last run that measured both (a ratio
    between neighbouring variants timed side by side is steadier than either's ratio to LCM under a busy CPU)."""
    for file in reversed(files):
        results = json.loads(Path(file).read_text())["results"]
        if spec in results and reference in results:
            return costs[reference] * results[spec]["seconds_per_step"] / results[reference]["seconds_per_step"]
    raise SystemExit(f"--priced-against {reference!r}: no --step-cost file measured it beside {spec!r}")


def budget_steps(method: Method, minutes: float, costs: dict[str, float]) -> int:
    if method.spec not in costs:
        raise SystemExit(f"no step cost for {method.spec!r}: run python bench/step_cost.py --methods \"lcm {method.spec}\" "
                         f"--out FILE and add --step-cost FILE")
    return max(1, round(minutes * 60 / costs[method.spec]))


def student(method: Method, lr_factor: float, minutes: float, costs: dict, runs: Path) -> Path:
    """The student file for a budget, trained (or continued) if it is not there yet."""
    steps = budget_steps(method, minutes, costs)
    run = runs / method.name / f"lr{lr_factor:g}"
    out = run / f"{minutes:g}min.safetensors"
    if out.exists():
        return out
    run_dir = run if method.nested else run / f"{minutes:g}min-run"
    log.info("%s, lr x%g, %g min: %d steps in %s", method.name, lr_factor, minutes, steps, run_dir)
    train = getattr(METHODS[method.method], TRAIN[method.method])
    train(BUNDLED_TEACHER, "proxy", run_dir, out, method.config(lr_factor, steps), checkpoint_every=50, sample_every=0)
    return out


def entries(method: Method, adapter: Path, tag: str, step_counts=None, sampler=None) -> list[StudentEntry]:
    """Rows for a student file: the method's step counts (or ``step_counts``), its file's sampler (or ``sampler``)."""
    return [StudentEntry(n, adapter=str(adapter), label=f"{method.name}@{tag}", sampler=sampler)
            for n in step_counts or STEP_COUNTS[method.method]]


def score(pipe, entry: StudentEntry, split: str, per_class: int, seed_sets: int, results: Path) -> dict:
    name = "budget" if split == "test" else f"budget_{split}"
    return scored_row(pipe, entry, results, name, files_digest(BUNDLED_TEACHER), per_class, 250, split, seed_sets,
                      100, None, PROXY)


def validation_rows(method: Method, factor: float, args, costs: dict, runs: Path, pipe, step_counts=None,
                    sampler=None) -> list[dict]:
    """The student of the smallest budget at ``factor`` times the preset's rate, scored on validation at
    ``step_counts`` (default: the method's), with ``sampler`` (default: its file's)."""
    smallest = min(args.budgets)
    adapter = student(method, factor, smallest, costs, runs)
    return [score(pipe, entry, "validation", args.validation_per_class, 1, args.results)
            for entry in entries(method, adapter, f"{smallest:g}min-lr{factor:g}", step_counts, sampler)]


def chosen_rate(method: Method, args, costs: dict, runs: Path, pipe) -> float:
    """The learning-rate factor with the lowest validation FID at the smallest budget and the method's first step count."""
    fids = {}
    for factor in args.lr_factors:
        fids[factor] = validation_rows(method, factor, args, costs, runs, pipe, STEP_COUNTS[method.method][:1])[0]["fid"]
        log.info("%s, lr x%g: validation FID %.2f", method.name, factor, fids[factor])
    return min(fids, key=fids.get)


def register(methods: list[Method], results: Path) -> None:
    """Record what each name means (budget-methods.json): a name reused for other options would mix two runs."""
    path = results / "budget-methods.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    for method in methods:
        if known.setdefault(method.name, method.spec) != method.spec:
            raise SystemExit(f"{method.name!r} already names {known[method.name]!r} in {path}: give {method.spec!r} "
                             f"another name (NAME={method.spec})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")


def run(args) -> None:
    costs = step_costs(args.step_cost)
    methods = [Method.parse(text) for text in args.methods]
    if args.priced_as:   # ablations whose extra work is below the timing noise: the same steps as the variant they change
        if args.priced_as not in costs:
            raise SystemExit(f"--priced-as {args.priced_as!r}: no step cost for it in {', '.join(args.step_cost)}")
        costs.update({method.spec: costs[args.priced_as] for method in methods})
    if args.priced_against:
        if args.priced_against not in costs:
            raise SystemExit(f"--priced-against {args.priced_against!r}: no step cost for it in {', '.join(args.step_cost)}")
        costs.update({m.spec: priced_against(costs, args.step_cost, m.spec, args.priced_against) for m in methods})
    register(methods, args.results)
    pipe = load_teacher(BUNDLED_TEACHER)
    runs = Path(args.runs)
    for method in methods:
        if args.validation_only:   # an ablation: every step count on validation, nothing on test
            for factor in args.lr_factors:
                validation_rows(method, factor, args, costs, runs, pipe, args.step_counts, args.sampler)
            continue
        factor = chosen_rate(method, args, costs, runs, pipe)
        for minutes in sorted(args.budgets):
            adapter = student(method, factor, minutes, costs, runs)
            for entry in entries(method, adapter, f"{minutes:g}min"):
                score(pipe, entry, "test", args.test_per_class, 2, args.results)


def report(args) -> dict:
    """budget.json / budget.md / budget.png from the saved test rows (and the validation rows behind each choice)."""
    costs, results = step_costs(args.step_cost), args.results
    methods_file = results / "budget-methods.json"
    methods = json.loads(methods_file.read_text()) if methods_file.exists() else {}
    first = json.loads(Path(args.step_cost[0]).read_text())
    rows, validation = {}, []
    for path in sorted((results / "budget-rows").glob("*.json")):
        row = json.loads(path.read_text())["row"]
        rows[row["name"]] = row
    for path in sorted((results / "budget_validation-rows").glob("*.json")):
        row = json.loads(path.read_text())["row"]
        label, _, rest = row["label"].partition("@")
        minutes, _, factor = rest.partition("min-lr")
        validation.append({"method": label + (f" ({row['sampler']} sampler)" if row["sampler"] else ""),
                           "budget_minutes": float(minutes), "lr_factor": float(factor), **summary(row)})
    table = []
    for row in rows.values():
        label, _, minutes = row["label"].partition("@")
        reference = rows.get(f"lcm@{minutes}-{row['steps']}steps")
        table.append({"method": label, "budget_minutes": float(minutes.removesuffix("min")), **summary(row),
                      "vs_lcm": compare(row, reference) if reference is not None and reference is not row else None,
                      "adapter": row["adapter"]})
    earlier = results / "budget.json"
    if earlier.exists():   # rows scored where their row files are not (another session's machine): kept as they were
        before = json.loads(earlier.read_text())
        table += carried(before["results"], table, ("method", "budget_minutes", "sampling_steps"))
        validation += carried(before["validation"]["rows"], validation,
                              ("method", "budget_minutes", "lr_factor", "sampling_steps"))
    validation.sort(key=lambda r: (r["method"], r["lr_factor"], -r["sampling_steps"]))
    table.sort(key=lambda r: (r["method"], r["sampling_steps"], r["budget_minutes"]))
    document = {
        "what": "each method trained for the same budgets of training time (minutes of the step-cost machine, turned into "
                "optimiser steps by its measured seconds per step), scored on the test split; vs_lcm: the paired "
                "comparison with LCM's student of the same budget and step count",
        "seconds_per_step": costs, "step_cost_files": args.step_cost, "step_cost_machine": first.get("machine"),
        "batch_size": first.get("batch_size"),
        "validation": {"what": "each method's learning-rate choice (the lowest FID at its first step count, smallest "
                                 "budget) and the ablations, on the validation split", "samples": args.validation_per_class * 20,
                       "rows": validation},
        "methods": methods,
        "samples_per_row": args.test_per_class * 40, "machine": machine_description(),
        "results": table,
    }
    (results / "budget.json").write_text(json.dumps(document, indent=1) + "\n")
    (results / "budget.md").write_text(markdown(table, "vs LCM") + "\nValidation: learning rates and ablations\n\n"
                                        + markdown(validation, "lr factor") + "\nMethods\n\n"
                                        + "".join(f"- {name}: `{spec}`\n" for name, spec in sorted(methods.items())))
    plot(table, results / "budget.png")
    print((results / "budget.md").read_text())
    return document


def carried(earlier: list[dict], current: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The rows of an earlier report that no scored row file here replaces, marked ``carried``: the report of a machine
    that lacks some row files keeps what another one measured."""
    present = {tuple(r[k] for k in key) for r in current}
    return [{**r, "carried": True} for r in earlier if tuple(r[k] for k in key) not in present]


def summary(row: dict) -> dict:
    """A scored row as the report gives it: scores, intervals and how much training stood behind it."""
    return {"sampling_steps": row["steps"], "train_steps": row["training"]["train_steps"],
            "images_seen": row["training"]["images_seen"], **{s: row[s] for s in SCORES},
            "intervals": {s: row["intervals"][s] for s in SCORES}}


def markdown(table: list[dict], last: str) -> str:
    """One line per row; the last column is the comparison with LCM (test rows) or the learning-rate factor."""
    lines = [f"| method | steps | budget (min) | train steps | FID ↓ | FID, classifier features ↓ | prompt accuracy ↑ | {last} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        cells = [f"{r[s]:.3f} ± {(r['intervals'][s][1] - r['intervals'][s][0]) / 2:.3f}" if s == "prompt_accuracy"
                 else f"{r[s]:.2f} ± {(r['intervals'][s][1] - r['intervals'][s][0]) / 2:.2f}" for s in SCORES]
        vs = r.get("vs_lcm")
        verdict = f"×{r['lr_factor']:g}" if "lr_factor" in r else "–" if vs is None else "; ".join(f"{k}: " + ", ".join(n for n in SCORES if vs.get(n) == k)
                                                  for k in ("better", "worse") if any(vs.get(n) == k for n in SCORES)) or "within noise"
        lines.append(f"| {r['method']}{' *' if r.get('carried') else ''} | {r['sampling_steps']} | {r['budget_minutes']:g} | {r['train_steps']} | " + " | ".join(cells)
                     + f" | {verdict} |")
    if any(r.get("carried") for r in table):
        lines.append("\n\\* from the earlier budget.json: its row file is not on this machine")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    """Score against budget (log scale): one row of panels per sampling step count (one per score), one line per method
    in the same colour in every row, 95 % intervals as bars."""
    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
               "#bcbd22", "#000000", "#aec7e8"]
    methods = sorted({r["method"] for r in table})
    colour = {m: colours[i % len(colours)] for i, m in enumerate(methods)}
    step_counts = sorted({r["sampling_steps"] for r in table}, reverse=True) or [1]
    width, height, margin, legend = 420, 300, 50, 20 * (len(methods) // 4 + 1)
    image = Image.new("RGB", (width * len(SCORES), height * len(step_counts) + legend), "white")
    draw = ImageDraw.Draw(image)
    budgets = sorted({r["budget_minutes"] for r in table}) or [1.0]
    lx = [math.log(b) for b in budgets]
    for row, steps in enumerate(step_counts):
        rows = [r for r in table if r["sampling_steps"] == steps]
        for panel, score_name in enumerate(SCORES):
            ox, oy = panel * width, row * height
            values = [v for r in rows for v in r["intervals"][score_name]]
            low, high = (min(values), max(values)) if values else (0.0, 1.0)
            low, high = low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9)

            def at(b, v):
                span = (lx[-1] - lx[0]) or 1.0
                return (ox + margin + (math.log(b) - lx[0]) / span * (width - 2 * margin) if len(lx) > 1 else ox + width / 2,
                        oy + height - margin - (v - low) / (high - low) * (height - 2 * margin))
            draw.rectangle([ox + margin, oy + margin, ox + width - margin, oy + height - margin], outline="black")
            better = "higher" if score_name == "prompt_accuracy" else "lower"
            draw.text((ox + margin, oy + 15), f"{steps} steps: {score_name.replace('_', ' ')} ({better} is better)", fill="black")
            for b in budgets:
                x, _ = at(b, low)
                draw.text((x - 8, oy + height - margin + 5), f"{b:g}", fill="black")
            draw.text((ox + width / 2 - 40, oy + height - margin + 20), "budget (minutes)", fill="black")
            for frac in (0.0, 0.5, 1.0):
                v = low + frac * (high - low)
                draw.text((ox + 5, at(budgets[0], v)[1] - 6), f"{v:.3g}", fill="black")
            for method in methods:
                rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget_minutes"])
                points = [at(r["budget_minutes"], r[score_name]) for r in rs]
                if len(points) > 1:
                    draw.line(points, fill=colour[method], width=2)
                for r, (x, y) in zip(rs, points):
                    top, bottom = (at(r["budget_minutes"], v)[1] for v in r["intervals"][score_name])
                    draw.line([(x, top), (x, bottom)], fill=colour[method])
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour[method])
    for i, method in enumerate(methods):
        x, y = 10 + (i % 4) * 300, height * len(step_counts) + 20 * (i // 4)
        draw.rectangle([x, y + 4, x + 12, y + 12], fill=colour[method])
        draw.text((x + 18, y + 2), method, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", default="lcm,flash,sun,gdd",
                        help="comma-separated; a variant as NAME=METHOD[option=value,...] (step_cost.py's spelling)")
    parser.add_argument("--budgets", default="5,15,45", help="comma-separated minutes of training on the step-cost machine")
    parser.add_argument("--lr-factors", default="0.5,1,2", help="learning rates tried on validation, times the preset's")
    parser.add_argument("--validation-per-class", type=int, default=15, help="validation samples per class for the choice")
    parser.add_argument("--step-cost", action="append", help="bench/step_cost.py's output (default "
                        "bench/results/budget_step_cost.json); again for variants measured later, priced against their run's LCM")
    parser.add_argument("--test-per-class", type=int, default=25, help="test samples per class and seed set (2 seed sets)")
    parser.add_argument("--runs", default="runs/budget", help="where the training runs go (resumable)")
    parser.add_argument("--results", type=Path, default=Path("bench/results"), help="where budget.json, .md, .png and the rows go")
    parser.add_argument("--validation-only", action="store_true", help="ablations: train the smallest budget at each "
                        "--lr-factors entry and score it on validation at every step count; no test rows")
    parser.add_argument("--step-counts", help="with --validation-only: the sampling step counts scored, comma-separated "
                        "(default: the method's: 4,2,1 for LCM and Flash, 4 for SUN, 1 for GDD)")
    parser.add_argument("--sampler", help="with --validation-only: score with this sampler instead of the file's "
                        "(consistency, ddim, ...)")
    pricing = parser.add_mutually_exclusive_group()
    pricing.add_argument("--priced-as", help="price every --methods entry as this measured spec (ablations that add "
                        "less work than the timing noise get the same optimiser steps as the variant they change)")
    pricing.add_argument("--priced-against", help="price every --methods entry by its ratio to this spec in the "
                        "--step-cost run that timed both, times this spec's price (variants whose extra work is real "
                        "but whose ratio to LCM is noisy)")
    parser.add_argument("--report", action="store_true", help="only gather the scored rows into budget.json, .md and .png")
    args = parser.parse_args()
    args.methods = [m for m in split_top_level(args.methods) if m]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.lr_factors = [float(f) for f in args.lr_factors.split(",")]
    args.step_counts = [int(n) for n in args.step_counts.split(",")] if args.step_counts else None
    if (args.step_counts or args.sampler) and not args.validation_only:
        parser.error("--step-counts and --sampler score ablation rows: they need --validation-only")
    if args.sampler:
        try:
            get_sampler(args.sampler)
        except ValueError as exc:
            parser.error(f"--sampler: {exc}")
    args.step_cost = args.step_cost or ["bench/results/budget_step_cost.json"]
    for file in args.step_cost:
        if not Path(file).is_file():
            parser.error(f"{file} is missing: run python bench/step_cost.py first (every method in one run)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.report:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
