"""Broken and hostile adapter files, made from the two bundled adapters, loaded through every public loading path.

``python -m tests.adapter_fuzz OUT.json [--limit N]`` writes the files into a temporary folder, loads each through
``inspect --check --model`` (in-process), ``read_adapter``, the ComfyUI and A1111 loaders, ``plan_run``, the LoRA merge,
the SUN build and ``load_student`` (sampling one step from every file all paths accept), and writes one record per file:
its class and, per path, "ok", "refused" (the project's own one-line error) or what else happened. Each file gets a
timeout; the peak memory is recorded. tests/test_adapter_fuzz.py runs it under a memory limit and checks the records.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ASSETS = Path(__file__).resolve().parents[1] / "training" / "assets"
FLASH, SUN = ASSETS / "proxy_flash_lora.safetensors", ASSETS / "proxy_sun_adapter.safetensors"
TEACHER = ASSETS / "proxy_teacher"
PER_FILE_SECONDS = 30
PROJECT_ERRORS = ("AdapterFileError", "LoraKeyError", "SunFileError")   # the reader's, the LoRA merge's, the SUN build's


# ------------------------------------------------------------------------------------------------ raw file parts

def split(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data: bytes, header_bytes: bytes | None = None) -> bytes:
    text = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def with_metadata(header: dict, key: str, value) -> dict:
    header = copy.deepcopy(header)
    meta = header.setdefault("__metadata__", {})
    if value is None:
        meta.pop(key, None)
    else:
        meta[key] = value
    return header


def tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, _ = split(path)
    return load_file(str(path)), dict(header.get("__metadata__", {}))


# ------------------------------------------------------------------------------------------------ the classes

BAD_JSON_VALUES = ["[]", "4", "NaN", "Infinity", "-Infinity", "true", "false", "null", "{}", '"x"', "-1", "0", "1e400",
                   "[" * 20000 + "]" * 20000, "{", "", "1.5", "[1, 2]", "[999, 1500, 3, 1]", '{"a": ' * 3000 + "1" + "}" * 3000,
                   "[" + ",".join(["999"] * 5000) + "]", '"' + "x" * 10000 + '"']
TEXT_FIELDS_BAD = ["", "flash", "FLASH_LORA", "sd21", "pixart ", "x" * 500, "\u0000", "[]", "eps"]
FIELDS = ["format_version", "kind", "base", "prediction", "sampler", "steps", "timesteps", "guidance", "provenance", "extra"]
SUBFIELDS = {"extra": ["cfg_scale", "alpha", "rank", "consistency_boundary", "format", "unet_config", "embedding_dim"],
             "guidance": ["default_w", "w_min", "w_max", "cfg_scale"]}
SUB_VALUES = [None, [], {}, "x", True, -1, 0, 1e30, 1e400, float("nan"), 3, 1e5, [1, 2]]
KINDS = ["flash_lora", "sun_adapter", "guided_student", "gdd_student", "snap_student"]


def metadata_files(name: str, path: Path):
    header, data = split(path)
    meta = header["__metadata__"]
    for field in FIELDS:
        key = "fewstep." + field
        yield "metadata field missing", join(with_metadata(header, key, None), data)
        values = TEXT_FIELDS_BAD if field in ("kind", "base", "prediction", "sampler") else BAD_JSON_VALUES
        for value in values:
            yield f"metadata {field} of wrong type/range", join(with_metadata(header, key, value), data)
    for field, subs in SUBFIELDS.items():
        base = json.loads(meta.get("fewstep." + field, "{}"))
        for sub in subs:
            for value in SUB_VALUES:
                changed = {**base, sub: value}
                if value is None:
                    changed.pop(sub, None)
                text = json.dumps(changed, allow_nan=True)
                yield f"metadata {field}.{sub} of wrong type/range", join(with_metadata(header, "fewstep." + field, text), data)
    yield from kind_files(name, path)
    for config in ({"a": 1}, {}, {"block_out_channels": [10 ** 6] * 4, "down_block_types": ["CrossAttnDownBlock2D"] * 4,
                                  "up_block_types": ["CrossAttnUpBlock2D"] * 4, "cross_attention_dim": 768},
                   {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "norm_num_groups": 8},
                   {"block_out_channels": [64] * 6, "down_block_types": ["CrossAttnDownBlock2D"] * 6, "layers_per_block": 10,
                    "up_block_types": ["CrossAttnUpBlock2D"] * 6, "cross_attention_dim": 4096, "transformer_layers_per_block": 20},
                   []):
        h = with_metadata(header, "fewstep.kind", "snap_student")
        h = with_metadata(h, "fewstep.extra", json.dumps({"unet_config": config}))
        yield "snap_student architecture", join(h, data)
        h = with_metadata(h, "fewstep.extra", json.dumps({"unet_config": config, "decoder_config": {"in_channels": 10 ** 6}}))
        yield "snap_student architecture", join(h, data)
    for base in ("sdxl", "pixart", "sd2", "unknown"):
        yield "base relabelled", join(with_metadata(header, "fewstep.base", base), data)
    yield "metadata not a string map", join({**header, "__metadata__": ["a", "b"]}, data)
    yield "metadata not a string map", join({**header, "__metadata__": {**meta, "fewstep.steps": 4}}, data)
    yield "metadata not a string map", join({**header, "__metadata__": 7}, data)
    stripped = {k: v for k, v in header.items() if k != "__metadata__"}
    yield "no metadata (inferred)", join(stripped, data)


def kind_files(name: str, path: Path):
    """The file's weights under every kind, with guidance ranges valid and not."""
    header, data = split(path)
    for kind in KINDS:
        yield f"kind relabelled: {kind}", join(with_metadata(header, "fewstep.kind", kind), data)
        for guidance in ({}, {"default_w": 3.0}, {"default_w": 3.0, "w_min": 5.0, "w_max": 1.0},
                         {"default_w": 3.0, "w_min": 0.0, "w_max": 8.0}):
            h = with_metadata(header, "fewstep.kind", kind)
            h = with_metadata(h, "fewstep.guidance", json.dumps(guidance))
            yield "kind relabelled with guidance", join(h, data)


def host_cases(sources: dict[str, Path], folder: Path, seed: int = 0) -> list[tuple[str, Path]]:
    """For a real host, from its own Flash LoRA and SUN adapter (``sources``: {"flash": path, "sun": path}): one file of
    every tensor mutation and every kind, and a few the reader refuses from the header alone. Most of these pass the
    reader and meet the host's own model: they must fail there with one line, or sample."""
    rng = random.Random(seed)
    cases: dict[str, bytes] = {}
    for name, path in sources.items():
        header, data = split(path)
        streams = [tensor_files(name, path, rng), kind_files(name, path),
                   [("truncated", path.read_bytes()[:-7]), ("metadata extra not an object", join(with_metadata(header, "fewstep.extra", "[]"), data)),
                    ("header: shape as string", join({k: ({**v, "shape": str(v["shape"])} if k != "__metadata__" else v)
                                                      for k, v in header.items()}, data))]]
        for stream in streams:
            for label, content in stream:
                cases.setdefault(f"{name} {label}", content)
    out = []
    for i, (label, content) in enumerate(sorted(cases.items())):
        path = folder / f"fuzz_{i:03d}.safetensors"
        path.write_bytes(content)
        out.append((label, path))
    return out


def header_files(name: str, path: Path, rng: random.Random):
    header, data = split(path)
    keys = [k for k in header if k != "__metadata__"]
    edits = {
        "shape as string": lambda e: {**e, "shape": str(e["shape"])},
        "data_offsets as string": lambda e: {**e, "data_offsets": str(e["data_offsets"])},
        "data_offsets reversed": lambda e: {**e, "data_offsets": e["data_offsets"][::-1]},
        "data_offsets shifted": lambda e: {**e, "data_offsets": [o + 2 for o in e["data_offsets"]]},
        "unknown dtype tag": lambda e: {**e, "dtype": "F33"},
        "dtype tag of other width": lambda e: {**e, "dtype": "F64" if e["dtype"] != "F64" else "F16"},
        "integer dtype tag": lambda e: {**e, "dtype": {"F16": "I16", "F32": "I32", "BF16": "I16", "F64": "I64"}[e["dtype"]]},
        "bool dtype tag": lambda e: {**e, "dtype": "BOOL", "shape": [e["data_offsets"][1] - e["data_offsets"][0]]},
        "negative shape": lambda e: {**e, "shape": [-d for d in e["shape"]]},
        "bool shape": lambda e: {**e, "shape": [True] * len(e["shape"])},
        "float shape": lambda e: {**e, "shape": [d + 0.5 for d in e["shape"]]},
        "entry missing a field": lambda e: {k: v for k, v in e.items() if k != "shape"},
        "entry not an object": lambda e: [e["dtype"], e["shape"]],
        "entry with an extra field": lambda e: {**e, "note": "x"},
        "shape scalar": lambda e: {**e, "shape": []},
    }
    for label, edit in edits.items():
        for _ in range(3):
            key = rng.choice(keys)
            changed = {**header, key: edit(header[key])}
            yield f"header: {label}", join(changed, data)
    yield "header: deeply nested", join(None, data, b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    yield "header: deeply nested", join(None, data, json.dumps({**header, "x": json.loads("[" * 500 + "]" * 500)}).encode())
    yield "header: not an object", join(None, data, b"[1, 2, 3]")
    yield "header: not UTF-8", join(None, data, b'{"\xff\xfe": 1}')
    yield "header: duplicate data", join(header, data + data)
    text = json.dumps(header).encode()
    for flip in range(40):
        raw = bytearray(text)
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        yield "header: random byte", join(None, data, bytes(raw))


def raw_files(name: str, path: Path, rng: random.Random):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    for cut in sorted({0, 1, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1} | {rng.randrange(len(raw)) for _ in range(24)}):
        yield "truncated", raw[:cut]
    for length in (0, 1, n - 1, n + 1, len(raw), 2 ** 32, 2 ** 63, 2 ** 64 - 1):
        yield "header length field wrong", struct.pack("<Q", length) + raw[8:]
    for flip in range(40):
        out = bytearray(raw)
        at = rng.randrange(8 + n, len(raw))
        out[at] = rng.choice([0xFF, 0x7F, 0x7C, rng.randrange(256)])
        yield "data: random byte", bytes(out)


def tensor_files(name: str, path: Path, rng: random.Random):
    tensors, meta = tensors_and_metadata(path)
    keys = sorted(tensors)

    def save(label, changed):
        buffer = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
        buffer.close()
        try:
            save_file({k: v.contiguous() for k, v in changed.items()}, buffer.name, metadata=meta)
            return label, Path(buffer.name).read_bytes()
        finally:
            os.remove(buffer.name)

    def pick(suffix):
        return rng.choice([k for k in keys if k.endswith(suffix)] or keys)

    mutations = {
        "value NaN": lambda t, k: {**t, k: t[k].clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view(t[k].shape)},
        "value Inf": lambda t, k: {**t, k: t[k].clone().view(-1).index_fill_(0, torch.tensor([0]), float("inf")).view(t[k].shape)},
        "value huge": lambda t, k: {**t, k: t[k].float().clone().view(-1).index_fill_(0, torch.tensor([0]), 1e30).view(t[k].shape)},
        "values scaled x1e3": lambda t, k: {**t, k: t[k].float() * 1e3},
        "values scaled x30": lambda t, k: {**t, k: t[k].float() * 30},
        "integer weights": lambda t, k: {**t, k: t[k].to(torch.int32)},
        "int64 weights": lambda t, k: {**t, k: t[k].to(torch.int64)},
        "bool weights": lambda t, k: {**t, k: t[k] != 0},
        "uint8 weights": lambda t, k: {**t, k: t[k].to(torch.uint8)},
        "float64 weights": lambda t, k: {**t, k: t[k].double()},
        "bfloat16 weights": lambda t, k: {**t, k: t[k].bfloat16()},
        "1-D weights": lambda t, k: {**t, k: t[k].flatten()},
        "3-D weights": lambda t, k: {**t, k: t[k].reshape(1, *t[k].shape) if t[k].ndim < 3 else t[k][0]},
        "empty tensor": lambda t, k: {**t, k: t[k].flatten()[:0]},
        "tensor removed": lambda t, k: {kk: v for kk, v in t.items() if kk != k},
        "unexpected tensor": lambda t, k: {**t, k.rsplit(".", 1)[0] + ".surprise": torch.zeros(2)},
        "renamed to no layer": lambda t, k: {("lora_unet_nowhere_" + kk[len("lora_unet_"):] if kk.startswith("lora_unet_")
                                              else "nowhere." + kk): v for kk, v in t.items()},
        "half the tensors removed": lambda t, k: dict(list(t.items())[::2]),
        "wider input (another model)": lambda t, k: {**t, k: torch.cat([t[k], t[k][:, :8]], 1) if t[k].ndim >= 2 else t[k]},
        "all zeros": lambda t, k: {kk: torch.zeros_like(v) for kk, v in t.items()},
    }
    if name == "flash":
        mutations.update({
            "rank mismatch": lambda t, k: {**t, pick_up(t): t[pick_up(t)][:, :-1]},
            "rank 0": lambda t, k: {**t, **rank_zero(t)},
            "alpha not scalar": lambda t, k: {**t, pick_alpha(t): torch.ones(2)},
            "alpha empty": lambda t, k: {**t, pick_alpha(t): torch.ones(0)},
            "alpha missing": lambda t, k: {kk: v for kk, v in t.items() if kk != pick_alpha(t)},
            "alpha 0": lambda t, k: {**t, pick_alpha(t): torch.tensor(0.0)},
            "alpha negative": lambda t, k: {**t, pick_alpha(t): torch.tensor(-32.0)},
            "alpha 1e30": lambda t, k: {**t, **{a: torch.tensor(1e30) for a in t if a.endswith(".alpha")}},
            "alpha 1e4": lambda t, k: {**t, **{a: torch.tensor(1e4) for a in t if a.endswith(".alpha")}},
            "alpha 1000": lambda t, k: {**t, **{a: torch.tensor(1000.0) for a in t if a.endswith(".alpha")}},
            "alpha NaN": lambda t, k: {**t, pick_alpha(t): torch.tensor(float("nan"))},
            "alpha integer": lambda t, k: {**t, pick_alpha(t): torch.tensor(32)},
            "up without down": lambda t, k: {kk: v for kk, v in t.items() if kk != pick_down(t)},
            "conv up with a kernel": lambda t, k: {**t, pick_up(t): t[pick_up(t)][..., None, None].repeat(1, 1, 3, 3)},
        })
    else:
        mutations.update({
            "alpha/beta wrong shape": lambda t, k: {**t, pick_in(t, "_alpha"): torch.ones(3)},
            "k/v shapes differ": lambda t, k: {**t, pick_in(t, "to_v_neg.weight"): t[pick_in(t, "to_v_neg.weight")][:-1]},
            "layers removed (half)": lambda t, k: {kk: v for kk, v in t.items() if hash_layer(kk) % 2 == 0},
            "one layer removed": lambda t, k: {kk: v for kk, v in t.items() if not kk.startswith(k.rsplit(".", 1)[0].rsplit(".", 1)[0] + ".")},
            "extra-positive branch partly removed": lambda t, k: {kk: v for kk, v in t.items() if "extra_pos" not in kk or "down_blocks" not in kk},
            "released layout index out of range": lambda t, k: {f"{i + 500}.{kk.rsplit('.attn2.', 1)[1]}": v for i, (kk, v) in enumerate(t.items())},
        })
    for label, mutate in mutations.items():
        for _ in range(4):
            key = rng.choice(keys)
            try:
                changed = mutate(tensors, key)
            except (RuntimeError, IndexError, ValueError):
                continue
            yield save(f"tensors: {label}", changed)


def pick_up(t):
    return sorted(k for k in t if k.endswith("lora_up.weight"))[3]


def pick_down(t):
    return sorted(k for k in t if k.endswith("lora_down.weight"))[5]


def pick_alpha(t):
    return sorted(k for k in t if k.endswith(".alpha"))[7]


def pick_in(t, suffix):
    return sorted(k for k in t if k.endswith(suffix))[1]


def hash_layer(key: str) -> int:
    return sum(map(ord, key.split(".attn2.")[0]))


def rank_zero(t):
    down = sorted(k for k in t if k.endswith("lora_down.weight"))[2]
    up = down.replace("lora_down", "lora_up")
    return {down: t[down][:0], up: t[up][:, :0]}


def special_files(folder: Path) -> list[tuple[str, Path]]:
    """Files too big to hold in memory: a sparse 4 GiB tensor, a header larger than safetensors allows."""
    out = []
    header = {"lora_unet_conv_in.lora_down.weight": {"dtype": "F32", "shape": [2 ** 30], "data_offsets": [0, 2 ** 32]}}
    text = json.dumps(header).encode()
    path = folder / "sparse_4gib.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.seek(8 + len(text) + 2 ** 32 - 1)
        fh.write(b"\0")
    out.append(("4 GiB tensor (sparse file)", path))
    flash_header, data = split(FLASH)
    text = json.dumps(flash_header).encode()
    path = folder / "huge_header.safetensors"
    pad = 100_000_001 - len(text)
    path.write_bytes(struct.pack("<Q", len(text) + pad) + text + b" " * pad + data)
    out.append(("header above safetensors' 100 MB limit", path))
    for label, content in (("empty file", b""), ("eight zero bytes", b"\0" * 8), ("pickle", b"\x80\x04K\x01."),
                           ("zip checkpoint", b"PK\x03\x04" + b"\0" * 64)):
        path = folder / f"{label.replace(' ', '_')}.safetensors"
        path.write_bytes(content)
        out.append((label, path))
    return out


def generate(folder: Path, seed: int = 0) -> list[tuple[str, Path]]:
    rng = random.Random(seed)
    files = special_files(folder)
    for name, path in (("flash", FLASH), ("sun", SUN)):
        for generator in (metadata_files(name, path), header_files(name, path, rng), raw_files(name, path, rng),
                          tensor_files(name, path, rng)):
            for label, content in generator:
                out = folder / f"{len(files):05d}_{name}.safetensors"
                out.write_bytes(content)
                files.append((f"{name} {label}", out))
    return files


# ------------------------------------------------------------------------------------------------ the loading paths

class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def loading_paths(pipe):
    """{path name: fn(file) -> None}; each raises the project's error for a file it refuses."""
    from fewstep.core import adapter_file
    from fewstep.core.adapter_file import read_adapter
    from fewstep.core.lora import merge_lora, read_lora
    from fewstep.core.run_plan import plan_run
    from fewstep.extension_a1111 import host as a1111
    from fewstep.nodes import adapters as comfy
    from fewstep.training.cli import main as cli
    from fewstep.training.students import load_student
    from fewstep.training.sun_attention import sun_adapter_from_tensors

    def inspect_check(path):
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            code = cli(["inspect", "--check", "--model", str(TEACHER), str(path)])
        if code != 0:
            lines = err.getvalue().strip().splitlines()
            raise Refused(lines[-1] if lines else f"exit {code}", len(lines))

    def lora_merge(path):
        adapter = read_adapter(path, expected_base="sd15")
        if adapter.metadata.lora_weights:
            merge_lora(copy.deepcopy(pipe.unet), read_lora({k: v for k, v in adapter.tensors.items()
                                                            if k != "time_embedding.cond_proj.weight"})[0])

    def sun_build(path):
        adapter = read_adapter(path, expected_base="sd15")
        if adapter.metadata.kind == "sun_adapter":
            sun_adapter_from_tensors(pipe.unet, adapter.tensors)

    def comfy_loader(path):
        adapter_file._last_read.clear()
        comfy.load_adapter(str(path), "sd15")

    def a1111_loader(path):
        adapter_file._last_read.clear()
        a1111.load_adapter(str(path), "sd15")

    def student(path):
        sampler = load_student(pipe, path)
        latents = sampler.latents(["a handwritten digit three"], [0], steps=1)
        if not torch.isfinite(latents).all():
            raise NaNSample()

    return {"inspect --check": inspect_check, "read_adapter": lambda p: read_adapter(p, expected_base="sd15"),
            "ComfyUI loader": comfy_loader, "A1111 loader": a1111_loader,
            "plan_run": lambda p: plan_run(read_adapter(p, expected_base="sd15").metadata), "LoRA merge": lora_merge,
            "SUN build": sun_build, "load_student + 1 step": student}


class Refused(Exception):
    def __init__(self, line: str, lines: int = 1):
        super().__init__(line)
        self.lines = lines


class NaNSample(Exception):
    pass


def outcome(fn, path) -> str:
    from fewstep.core.adapter_file import AdapterFileError
    from fewstep.core.lora import LoraKeyError
    from fewstep.core.sun import SunFileError

    signal.alarm(PER_FILE_SECONDS)
    try:
        fn(path)
        return "ok"
    except Refused as exc:
        return "refused" if exc.lines == 1 and "Traceback" not in str(exc) else f"multi-line error: {exc}"
    except (AdapterFileError, LoraKeyError, SunFileError) as exc:
        return "refused" if "\n" not in str(exc) else f"multi-line error: {exc}"
    except NaNSample:
        return "NaN sample"
    except Timeout:
        return "hang"
    except MemoryError:
        return "memory blow-up"
    except BaseException as exc:  # noqa: BLE001 - this is what the fuzz looks for
        return f"raw {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    finally:
        signal.alarm(0)


def run(out_json: Path, limit: int | None = None) -> None:
    from fewstep.training import pipelines
    from fewstep.training.pipelines import load_teacher

    torch.manual_seed(0)
    signal.signal(signal.SIGALRM, _alarm)
    pipe = load_teacher(TEACHER)
    pipelines.load_teacher = lambda *args, **kwargs: pipe   # inspect --model loads it once, not once per file
    paths = loading_paths(pipe)
    records = []
    with tempfile.TemporaryDirectory() as folder:
        files = generate(Path(folder))
        if limit:
            files = files[:: max(1, len(files) // limit)]
        for label, path in files:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            results = {}
            for name, fn in paths.items():
                results[name] = outcome(fn, path)
            records.append({"class": label, "outcomes": results, "seconds": round(time.perf_counter() - start, 3),
                            "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024})
            path.unlink()
    out_json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    limit = int(sys.argv[sys.argv.index("--limit") + 1]) if "--limit" in sys.argv else None
    run(Path(sys.argv[1]), limit)


def problems(records: list[dict]) -> list[str]:
    """Every way a file broke the contract: raw exceptions, multi-line errors, hangs, memory blow-ups, NaN samples, and
    "sound" verdicts from inspect --check for files another path refuses."""
    out = []
    for r in records:
        for name, result in r["outcomes"].items():
            if result not in ("ok", "refused"):
                out.append(f"{r['class']} / {name}: {result}")
        if r["outcomes"]["inspect --check"] == "ok" and any(v != "ok" for v in r["outcomes"].values()):
            out.append(f"{r['class']}: inspect --check calls it sound, but {r['outcomes']}")
        if r["peak_rss_growth_mib"] > 1024:
            out.append(f"{r['class']}: memory grew by {r['peak_rss_growth_mib']} MiB")
    return out


def table(records: list[dict]) -> str:
    """Markdown: input class, files, accepted by every path, refused with a one-line error by every path, other."""
    rows: dict[str, list[int]] = {}
    for r in records:
        group = r["class"].split(":")[0] if ":" in r["class"] else r["class"]
        counts = rows.setdefault(group, [0, 0, 0, 0])
        values = set(r["outcomes"].values())
        counts[0] += 1
        counts[1] += values == {"ok"}
        counts[2] += values == {"refused"}
        counts[3] += not values <= {"ok"} and not values <= {"refused"}
    lines = ["| input class | files | loads everywhere | refused everywhere (one line) | mixed or other |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {a} | {b} | {c} | {d} |" for k, (a, b, c, d) in sorted(rows.items())]
    return "\n".join(lines)
