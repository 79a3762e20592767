"""`fewstep bench --reproduce NAME`: retrain a bench set's students from a fresh clone with the options they were
trained with, then bench them. Only the bundled teachers, classifier and data are needed; the bundled Flash LoRA and SUN
adapter have recipes too, so that every number a table reports can be regenerated, not only re-scored.

Light to import (the CLI's --help lists the recipes). A recipe is a list of ordinary ``fewstep`` commands, each resumable: rerunning ``--reproduce`` after a stop continues
where it stopped (a finished training run only re-exports its file). ``{runs}`` is the folder the runs go to.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bundled import BUNDLED_ATTRIBUTES_TEACHER

FLASH_PHASES = ("--phase-steps", "300,300,300,300")   # the bundled LoRA's length: 1,200 steps in the paper's 4 phases
GUIDED_ROUNDS = (8, 4, 2, 1)


@dataclass(frozen=True)
class Recipe:
    """What the recipe makes, the commands that train it (in order) and the bench command that measures it."""

    what: str
    steps: tuple[tuple[str, ...], ...]
    bench: tuple[str, ...]

    def commands(self, runs: str) -> list[list[str]]:
        """Every command, training then bench, with ``{runs}`` (and the bundled ``{attributes_teacher}``) filled in."""
        return [[arg.format(runs=runs, attributes_teacher=BUNDLED_ATTRIBUTES_TEACHER) for arg in command]
                for command in (*self.steps, self.bench)]


def _adapters(*paths: str) -> tuple[str, ...]:
    return tuple(arg for path in paths for arg in ("--adapter", path))


SYNTH = ("synth", "--prompts", "proxy", "--count", "13423", "--steps", "25", "--latents", "--out", "{runs}/synth")
GUIDED = (("train", "guided", "--stage", "1", "--run-dir", "{runs}/guided"),
          ("train", "guided", "--stage", "2", "--student", "{runs}/guided/guided_student.safetensors",
           "--run-dir", "{runs}/guided-rounds"))
GUIDED_FILES = ("{runs}/guided/guided_student.safetensors",
                *[f"{{runs}}/guided-rounds/round-{n:02d}steps/guided_student.safetensors" for n in GUIDED_ROUNDS])
GDD_RUNS = tuple(f"gdd-{variant}{data}" for data in ("", "-synth") for variant in ("full", "gdd_i"))

RECIPES = {
    "flash": Recipe(
        "the bundled Flash LoRA (training/assets/proxy_flash_lora.safetensors)",
        (("train", "flash", "--run-dir", "{runs}/flash", *FLASH_PHASES),),
        ("bench", "--set", "flash", *_adapters("{runs}/flash/flash_lora.safetensors"))),
    "sun": Recipe(
        "the bundled SUN adapter (training/assets/proxy_sun_adapter.safetensors): 1,500 steps, then 750 more with prompts "
        "truncated 30 % of the time",
        (("train", "sun", "--run-dir", "{runs}/sun", "--steps", "1500"),
         ("train", "sun", "--run-dir", "{runs}/sun", "--steps", "2250", "--truncate-prompt-prob", "0.3")),
        ("bench", "--set", "sun", *_adapters("{runs}/sun/sun_adapter.safetensors"))),
    "attributes": Recipe(
        "Flash and SUN students of the bundled attributes teacher (training/assets/proxy_attributes_teacher), each on "
        "that teacher's own data with the proxy preset: Flash 600 steps, SUN 1,500",
        (("train", "flash", "--teacher", "{attributes_teacher}", "--run-dir", "{runs}/attributes-flash"),
         ("train", "sun", "--teacher", "{attributes_teacher}", "--run-dir", "{runs}/attributes-sun")),
        ("bench", "--set", "attributes", *_adapters("{runs}/attributes-flash/flash_lora.safetensors",
                                                     "{runs}/attributes-sun/sun_adapter.safetensors"))),
    "guided": Recipe(
        "guided distillation: the stage-1 w-conditioned student (2,000 steps), then stage 2's rounds 16 -> 8 -> 4 -> 2 -> 1",
        GUIDED, ("bench", "--set", "guided", *_adapters(*GUIDED_FILES))),
    "gdd": Recipe(
        "GDD one-step generators, the whole UNet and GDD-I (convolutions frozen), each on the training images and on a "
        "set the teacher synthesized, 4,000 steps",
        (SYNTH, *[("train", "gdd", "--variant", run.split("-")[1], "--steps", "4000", "--run-dir", f"{{runs}}/{run}",
                   *(("--data", "{runs}/synth") if run.endswith("synth") else ())) for run in GDD_RUNS]),
        ("bench", "--set", "gdd", *_adapters(*[f"{{runs}}/{run}/gdd_student.safetensors" for run in GDD_RUNS]))),
    "data_free": Recipe(
        "data-free Flash: the teacher writes a 13,423-sample set from the caption list, Flash is distilled on it",
        (SYNTH, ("train", "flash", "--data", "{runs}/synth", "--run-dir", "{runs}/flash-synth", *FLASH_PHASES)),
        ("bench", "--set", "data_free", *_adapters("{runs}/flash-synth/flash_lora.safetensors"))),
    "snapfusion": Recipe(
        "SnapFusion: the robust teacher, the block plan, the full-size v-prediction student distilled 32 -> 16 -> 8 with "
        "and without CFG-aware distillation, the planned slim UNet with the pruned decoder; and the guided 8-step student",
        (*GUIDED,
         ("snap", "robust", "--run-dir", "{runs}/snap-robust"),
         ("snap", "plan", "--teacher", "{runs}/snap-robust/pipeline", "--budget", "0.67", "--out", "{runs}/snap-plan.json"),
         # A plan at budget 1 removes nothing: the teacher's own architecture, for the full-size student.
         ("snap", "plan", "--teacher", "{runs}/snap-robust/pipeline", "--budget", "1", "--out", "{runs}/snap-plan-full.json"),
         # --preset proxy: these teachers are not the bundled one, whose CPU-sized defaults they keep
         ("snap", "slim", "--plan", "{runs}/snap-plan-full.json", "--preset", "proxy", "--steps", "600",
          "--run-dir", "{runs}/snap-full"),
         ("snap", "distill", "--teacher", "{runs}/snap-full/pipeline", "--preset", "proxy", "--round-steps", "400",
          "--batch-size", "8", "--run-dir", "{runs}/snap-distill-full"),
         ("snap", "distill", "--teacher", "{runs}/snap-full/pipeline", "--preset", "proxy", "--round-steps", "400",
          "--batch-size", "8", "--cfg-probability", "0", "--run-dir", "{runs}/snap-distill-nocfg"),
         ("snap", "slim", "--plan", "{runs}/snap-plan.json", "--preset", "proxy", "--steps", "1000", "--run-dir", "{runs}/snap-slim"),
         ("snap", "decoder", "--steps", "800", "--run-dir", "{runs}/snap-decoder"),
         ("snap", "distill", "--teacher", "{runs}/snap-slim/pipeline", "--preset", "proxy",
          "--decoder", "{runs}/snap-decoder/decoder.safetensors", "--round-steps", "200", "--batch-size", "32",
          "--run-dir", "{runs}/snap-distill-slim")),
        ("bench", "--set", "snapfusion", "--plan", "{runs}/snap-plan.json",
         *_adapters(GUIDED_FILES[1], *[f"{{runs}}/snap-distill-{run}/snap_student.safetensors" for run in ("full", "nocfg", "slim")]))),
}
