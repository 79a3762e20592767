"""Students on a fine-tuned teacher: do they keep the fine-tune's style?

Two questions, one measurement. A plug-in adapter (SUN, or the Flash LoRA) trained on the base teacher and attached
without training to a fine-tune of it; and a student distilled from the fine-tune itself with no dataset (`fewstep
synth` from the caption list, then `fewstep train flash --teacher FINETUNE --data SET`). The fine-tune is a style:
the proxy teacher fine-tuned on the proxy images mirrored or in inverted colours, made by ``fewstep train finetune``
unless --finetuned names one. Every configuration samples the bench's prompt set; the style is measured as the share
of samples in it (mirrored: digits the classifier reads only once flipped back; inverted: a light background), next to
the share the held-out images score once put in the style (roughly what a model fully in the style scores),
quality as FID against the held-out images in each style, content as the prompt accuracy of the classifier on samples
brought back to the normal style. Each adapter is sampled on the fine-tune at its own step count, and on the base
teacher too unless it was distilled from the fine-tune.
Usage: python bench/finetuned_style.py --adapter FILE [--adapter FILE ...] [--style mirrored|inverted]
       [--finetuned runs/finetune/pipeline] [--finetune-steps 1000] [--per-class 50] [--out bench/results/STYLE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from fewstep.core.adapter_file import describe, read_header
from fewstep.training.bench import bench_label, machine_description, training_data
from fewstep.training.bundled import BUNDLED_TEACHER
from fewstep.training.evaluation import SPLITS, StudentEntry, TeacherEntry, prompt_set, save_class_grid
from fewstep.training.data import PROXY_STYLES, balanced_indices, load_proxy_dataset
from fewstep.training.metrics import FeatureStatistics, get_feature_extractor
from fewstep.training.scores import REFERENCE_PER_CLASS, RESAMPLES, FrechetTo, with_noise
from fewstep.training.proxy_classifier import classify_proxy_images
from fewstep.training.pipelines import load_teacher

def in_style(style: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image: is it in the fine-tune's style?"""
    if style == "inverted":   # the background covers most of the image; its edge alone would not do (the proxy VAE
        return np.median(images.reshape(len(images), -1), axis=1) > 127   # draws a dark frame on light images)
    # Mirrored: a digit the classifier reads only once flipped back (0, 1, 8 read either way and never count;
    # silhouettes are mirror images of real animals anyway).
    labels = torch.as_tensor(labels)
    as_is = classify_proxy_images(images) == labels
    flipped = classify_proxy_images(PROXY_STYLES["mirrored"](images)) == labels
    return ((flipped & ~as_is) & (labels < 10)).numpy()


def evaluate(style: str, images: np.ndarray, prompts, references: dict[str, FeatureStatistics], extractor) -> dict:
    """The style share, FID against each reference and prompt accuracy, each with its 95 % interval and per seed set
    (``scores.with_noise``: the bootstrap stratified by class, as the bench's)."""
    labels = prompts.labels
    styled = torch.as_tensor(in_style(style, images, labels), dtype=torch.float64)
    normalised = np.where(styled.numpy()[:, None, None, None] > 0, PROXY_STYLES[style](images), images)   # involutions
    correct = (classify_proxy_images(normalised) == torch.as_tensor(labels)).double()
    features = extractor(images).double()
    frechet = {f"fid_vs_{name}": FrechetTo(features, ref) for name, ref in references.items()}

    def measures(counts: torch.Tensor) -> dict[str, float]:
        return {f"{style}_fraction": float(counts @ styled / counts.sum()), "prompt_accuracy": float(counts @ correct / counts.sum()),
                **{name: distance(counts) for name, distance in frechet.items()}}

    names = [f"{style}_fraction", *frechet, "prompt_accuracy"]
    return with_noise(measures, names, labels, prompts.seed_sets, RESAMPLES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, action="append",
                        help="a student file (SUN, Flash, ...) trained on the bundled teacher or on the fine-tune; repeat it for several")
    parser.add_argument("--style", choices=sorted(PROXY_STYLES), default="mirrored", help="the fine-tune's style")
    parser.add_argument("--finetuned", type=Path, default=None, help="the fine-tuned pipeline (default: make one in --run-dir)")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the fine-tune is made (default: runs/finetune-STYLE)")
    parser.add_argument("--finetune-steps", type=int, default=1000, help="fine-tuning steps when it is made here")
    parser.add_argument("--per-class", type=int, default=25, help="samples per class (20 classes) in each seed set")
    parser.add_argument("--seed-sets", type=int, default=2, help="disjoint seed sets, each scored on its own too")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--split", choices=sorted(SPLITS), default="test", help="prompts x seeds (choices are made on validation)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write (grids go beside it)")
    args = parser.parse_args()

    finetuned, run_dir = args.finetuned, args.run_dir or Path(f"runs/finetune-{args.style}")
    if finetuned is None:
        from fewstep.training.teacher import finetune_teacher

        finetuned = finetune_teacher(BUNDLED_TEACHER, f"proxy-{args.style}", run_dir, run_dir / "pipeline",
                                     steps=args.finetune_steps)
    heldout = load_proxy_dataset("heldout")
    picks = balanced_indices(heldout.labels, REFERENCE_PER_CLASS)   # class-balanced, like the prompts: the bench's reference
    heldout = dataclasses.replace(heldout, images=heldout.images[picks], labels=heldout.labels[picks])
    extractor = get_feature_extractor()
    references = {"heldout": FeatureStatistics.from_features(extractor(heldout.images)),
                  f"heldout_{args.style}": FeatureStatistics.from_features(extractor(PROXY_STYLES[args.style](heldout.images)))}
    # Roughly what a model fully in the style scores: the (class-balanced) held-out images in the style.
    ceiling = float(in_style(args.style, PROXY_STYLES[args.style](heldout.images), heldout.labels).mean())
    prompts = prompt_set(args.per_class, args.split, args.seed_sets)
    captions, labels, seeds = prompts.captions, prompts.labels, prompts.seeds
    pipes = {"base": load_teacher(BUNDLED_TEACHER), "finetuned": load_teacher(finetuned)}
    configurations = [("base", TeacherEntry(50)), ("finetuned", TeacherEntry(50)), ("finetuned", TeacherEntry(4))]
    adapters = {}
    for adapter in args.adapter:
        metadata = describe(read_header(adapter), Path(adapter).name)[0]
        entry = StudentEntry(metadata.steps, adapter=str(adapter), label=bench_label(metadata))
        distilled_from = Path((metadata.provenance or {}).get("teacher", BUNDLED_TEACHER))
        mine = distilled_from.resolve() == Path(finetuned).resolve()
        configurations += [("finetuned", entry)] if mine else [("base", entry), ("finetuned", entry)]
        adapters[str(adapter)] = {"label": entry.label, "distilled_from": "finetuned" if mine else "base",
                                  "training": training_data(adapter)}
    rows = []
    for model, entry in configurations:
        start = time.perf_counter()
        with torch.no_grad():
            images = entry.generate(pipes[model], captions, seeds, args.batch_size)
        seconds = time.perf_counter() - start
        name = f"{model}/{entry.name}"
        rows.append({"name": name, "model": model, "nfe": entry.nfe, "seconds_per_image": seconds / len(images),
                     **evaluate(args.style, images, prompts, references, extractor)})
        save_class_grid(images, labels, args.out.parent / f"{args.out.stem}-grids" / f"{name.replace('/', '_')}.png", seeds=2)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "replicates"}), flush=True)
    document = {"adapters": adapters, "finetuned": str(finetuned), "fine-tune": f"proxy teacher on proxy-{args.style}",
                f"{args.style}_fraction_of_heldout_in_style": ceiling,
                "samples_per_configuration": len(captions), "split": args.split, "seed_sets": args.seed_sets,
                "resamples": RESAMPLES, "reference": f"the held-out split, {REFERENCE_PER_CLASS} images per class",
                "machine": machine_description(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
