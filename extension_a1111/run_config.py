"""The accordion's settings and an adapter file turned into what an A1111/Forge run must change: no host imports,
so every decision here is tested without a WebUI.

The sampling plan itself (timesteps, sampler, CFG, w) is ``core.run_plan``'s, shared with the ComfyUI nodes; this
module adds what is A1111's: sampler labels, the LoRA prompt tag, whether the negative pass is skipped, and the
infotext fields that pasting a PNG's parameters back reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..core.adapter_file import Adapter, AdapterFileError
from ..core.run_plan import LORA, SUN_LAYERS, UNET_BLEND, RunPlan, check_kind, kinds_applied, plan_run
from ..core.samplers import SAMPLERS

SUPPORTED_KINDS = kinds_applied((LORA, UNET_BLEND, SUN_LAYERS))   # no own-UNet students (SnapFusion) yet
SAMPLER_PREFIX = "FewStep "
FROM_FILE = "From the file"
# Infotext keys ("fewstep: name.safetensors, fewstep strength: 1, ..." in a PNG's parameters).
INFOTEXT_ADAPTER = "fewstep"
INFOTEXT_STRENGTH = "fewstep strength"
INFOTEXT_STEPS = "fewstep steps"
INFOTEXT_NEGATIVE_STRENGTH = "fewstep negative strength"
INFOTEXT_W = "fewstep w"
INFOTEXT_SAMPLER = "fewstep sampler"


def sampler_label(name: str) -> str:
    """The A1111 sampler name of core sampler ``name`` ("FewStep consistency")."""
    return SAMPLER_PREFIX + name


SAMPLER_CHOICES = [FROM_FILE] + list(SAMPLERS)


@dataclass(frozen=True)
class Settings:
    """The accordion's values, in the order ``ui()`` returns its components (and the API's ``args`` list)."""

    enabled: bool = False
    adapter: str = ""               # a file name as the dropdown lists it (relative to its models folder)
    strength: float = 1.0
    steps: int = 0                  # 0: the file's
    negative_strength: float = 1.0  # SUN adapters
    w: float = -1.0                 # guided students; below 0: the file's default
    sampler: str = FROM_FILE        # a core sampler name, or FROM_FILE

    @classmethod
    def from_args(cls, args) -> "Settings":
        """From the script's positional args; an API caller may send only the first few, as JSON of any type."""
        names = [f for f in cls.__dataclass_fields__]
        if len(args) > len(names):
            raise ValueError(f"fewstep takes at most {len(names)} script args ({', '.join(names)}); got {len(args)}")
        defaults = cls()   # each value converted to its default's type (the API sends JSON numbers, Gradio floats)
        return cls(**{name: _convert(name, value, type(getattr(defaults, name))) for name, value in zip(names, args)})


# What the API's "enabled" arg may say, besides JSON true/false (bool("false") is True, so strings are read here).
_TRUE_WORDS = ("true", "1", "on", "yes")
_FALSE_WORDS = ("false", "0", "off", "no", "")


def parse_flag(name: str, value) -> bool:
    """An on/off arg: a bool, 0/1, or one of the words above (any case); anything else is an error, not "on"."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError(f"script arg {name} must be true or false (or 1/0, on/off); got {value!r}")


def _convert(name: str, value, kind: type):
    """One script arg as its field's type, with a one-line error naming the arg."""
    if kind is bool:
        return parse_flag(name, value)
    if kind is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"script arg {name} must be a string; got {value!r}")
        return value
    if isinstance(value, bool):   # int(True) is 1: a flag sent in a number's place is a caller's slip
        raise ValueError(f"script arg {name} must be a number; got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"script arg {name} must be a number; got {value!r}") from None
    if kind is int:
        if not number.is_integer():
            raise ValueError(f"script arg {name} must be a whole number; got {value!r}")
        return int(number)
    if kind is float:
        return number
    raise TypeError(f"no conversion for script arg {name} of type {kind.__name__}")


@dataclass(frozen=True)
class A1111Run:
    """What the extension changes for one run."""

    adapter_name: str
    plan: RunPlan
    sampler_name: str                 # the A1111 sampler to run
    lora_alias: Optional[str]         # the name the host's own LoRA loader finds the file under (LoRA kinds)
    skip_negative_pass: bool          # one model pass per step: the negative pass is skipped (SUN reads it in the pass)
    infotext: dict[str, Any]

    @property
    def unet_weights(self) -> bool:
        """Whether the file holds a whole UNet (guided students, GDD generators), not a LoRA."""
        return self.plan.weights == UNET_BLEND

    @property
    def lora_tag(self) -> Optional[str]:
        """Appended to every prompt: the host's LoRA loader applies the file at the adapter's strength."""
        return None if self.lora_alias is None else f"<lora:{self.lora_alias}:{self.plan.strength:g}>"

    @property
    def summary(self) -> str:
        plan = self.plan
        passes = "one model pass per step" if self.skip_negative_pass else "two model passes per step (CFG)"
        text = (f"fewstep: {self.adapter_name} ({plan.kind}), sampler {plan.sampler}, {plan.steps} steps at timesteps "
                f"{', '.join(map(str, plan.timesteps))}, {passes}")
        return "; ".join([text, *plan.notes])


def model_base(is_sdxl: bool, is_sd1: bool) -> str:
    """fewstep's base name of the loaded checkpoint (A1111's ``sd_model.is_sdxl`` / ``is_sd1`` flags)."""
    if is_sdxl:
        return "sdxl"
    if is_sd1:
        return "sd15"
    raise AdapterFileError("fewstep adapters are made for SD1.5 and SDXL checkpoints; the loaded checkpoint is neither")


def lora_alias(adapter_name: str) -> str:
    """The name under which the host's LoRA loader finds the file: its file name without folder and extension."""
    stem = adapter_name.replace("\\", "/").rsplit("/", 1)[-1]
    return stem.rsplit(".", 1)[0] if "." in stem else stem


def configure(settings: Settings, adapter: Adapter) -> A1111Run:
    """The run for ``settings`` with ``adapter`` (already read and checked against the model's base)."""
    meta = adapter.metadata
    check_kind(settings.adapter, meta.kind, SUPPORTED_KINDS, "the A1111 extension runs")
    plan = plan_run(meta, strength=settings.strength, steps=settings.steps,
                    sampler=None if settings.sampler == FROM_FILE else settings.sampler,
                    w=None if settings.w < 0 else settings.w, negative_strength=settings.negative_strength)
    infotext: dict[str, Any] = {INFOTEXT_ADAPTER: settings.adapter, INFOTEXT_STRENGTH: settings.strength}
    if settings.steps:
        infotext[INFOTEXT_STEPS] = settings.steps
    if settings.sampler != FROM_FILE:
        infotext[INFOTEXT_SAMPLER] = settings.sampler
    if plan.negative_in_adapter:
        infotext[INFOTEXT_NEGATIVE_STRENGTH] = settings.negative_strength
    if plan.w is not None:
        infotext[INFOTEXT_W] = plan.w
    return A1111Run(settings.adapter, plan, sampler_label(plan.sampler),
                    lora_alias(settings.adapter) if plan.weights == LORA else None,
                    skip_negative_pass=plan.model_passes_per_step == 1, infotext=infotext)


def settings_from_infotext(params: Mapping[str, str]) -> Optional[Settings]:
    """The settings a PNG's parameters record (None when fewstep was off for it)."""
    if INFOTEXT_ADAPTER not in params:
        return None
    return Settings(enabled=True, adapter=params[INFOTEXT_ADAPTER], strength=float(params.get(INFOTEXT_STRENGTH, 1.0)),
                    steps=int(params.get(INFOTEXT_STEPS, 0)),
                    negative_strength=float(params.get(INFOTEXT_NEGATIVE_STRENGTH, 1.0)),
                    w=float(params.get(INFOTEXT_W, -1.0)), sampler=params.get(INFOTEXT_SAMPLER, FROM_FILE))
