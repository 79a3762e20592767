"""core.adapter_file and base-model inference: round trips, inference for foreign files, one-line errors for bad ones."""
import os
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from fewstep.core import adapter_file as A
from fewstep.core.base_models import infer_base
from fewstep.core.lora import convert_lora, module_to_kohya_name
from fewstep.training.cli import main as cli
from fewstep.training.tiny_models import build_tiny_unet

from .test_lora import REAL_CONFIGS, real_unet


def _kohya_lora(base, rank=4, alpha=8):
    unet = build_tiny_unet(base, seed=0)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    return convert_lora(get_peft_model_state_dict(unet), "kohya", alpha=alpha)


@pytest.fixture(scope="module")
def sd15_lora():
    return _kohya_lora("sd15")


@pytest.fixture(scope="module")
def sdxl_lora():
    return _kohya_lora("sdxl")


def _meta(**kw):
    base = dict(kind="flash_lora", base="sd15", sampler="consistency", steps=4, timesteps=[999, 749, 499, 249],
                provenance={"method": "flash", "teacher": "tiny", "train_steps": 2}, extra={"rank": 4, "alpha": 8})
    return A.AdapterMetadata(**{**base, **kw})


def _one_line_error(fn, *patterns):
    with pytest.raises(A.AdapterFileError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for p in patterns:
        assert re.search(p, msg), msg
    return msg


# --- round trip -------------------------------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path, sd15_lora):
    path = tmp_path / "flash.safetensors"
    meta = _meta(guidance={"convention": "imagen", "w_min": 2.0, "w_max": 12.0, "default_w": 6.0})
    A.write_adapter(path, sd15_lora, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["flash.safetensors"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask   # readable as a plain open() would make it, not owner-only
    adapter = A.read_adapter(path, expected_base="sd15")
    assert adapter.metadata == meta and not adapter.inferred and adapter.notes == []
    assert set(adapter.tensors) == set(sd15_lora)
    assert all(torch.equal(adapter.tensors[k], v) for k, v in sd15_lora.items())
    raw = A.read_header(path).metadata
    assert raw["fewstep.kind"] == "flash_lora" and raw["fewstep.steps"] == "4" and raw["fewstep.timesteps"] == "[999, 749, 499, 249]"


def test_writer_refuses_invalid_metadata_and_keeps_old_file(tmp_path, sd15_lora):
    path = tmp_path / "a.safetensors"
    A.write_adapter(path, sd15_lora, _meta())
    before = path.read_bytes()
    _one_line_error(lambda: A.write_adapter(path, sd15_lora, _meta(timesteps=[999, 499])), "4 decreasing integers", r"\[999, 499\]")
    assert path.read_bytes() == before


# --- foreign files ----------------------------------------------------------------------------------------------

def test_lora_without_metadata_is_inferred_with_notes(tmp_path, sd15_lora, sdxl_lora):
    for base, sd in [("sd15", sd15_lora), ("sdxl", sdxl_lora)]:
        path = tmp_path / f"{base}.safetensors"
        save_file(sd, str(path))
        adapter = A.read_adapter(path)
        assert adapter.inferred and adapter.metadata.kind == "flash_lora" and adapter.metadata.base == base
        assert adapter.metadata.sampler == "consistency" and adapter.metadata.timesteps == [999, 759, 499, 259]
        assert any("no fewstep metadata" in n for n in adapter.notes)


def test_released_sun_layout_is_recognised(tmp_path):
    # The released SUN file's layout: attention-processor index keys, 768-wide negative K/V for SD1.5.
    sd = {f"{i}.{p}": torch.zeros(320, 768) for i in (1, 3) for p in ("to_k_neg.weight", "to_v_neg.weight")}
    sd |= {f"{i}.{p}": torch.zeros(320) for i in (1, 3) for p in ("to_k_neg_alpha", "to_k_neg_beta")}
    save_file(sd, str(tmp_path / "sun.safetensors"))
    adapter = A.read_adapter(tmp_path / "sun.safetensors")
    assert (adapter.metadata.kind, adapter.metadata.base) == ("sun_adapter", "sd15")


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_base_from_real_size_shapes(base):
    unet = real_unet(base)
    shapes = {n: tuple(p.shape) for n, p in unet.named_parameters()}
    assert infer_base(list(shapes), shapes)[0] == base
    # A kohya LoRA on the cross-attention keys only: the text width (768 / 2048) decides.
    lora = {module_to_kohya_name(n[: -len(".weight")]) + ".lora_down.weight": (4, s[1])
            for n, s in shapes.items() if n.endswith("attn2.to_k.weight")}
    found, why = infer_base(list(lora), lora)
    assert found == base and REAL_CONFIGS[base]["cross_attention_dim"] == int(re.search(r"takes (\d+)-dim", why).group(1))


def test_base_from_ldm_named_kohya_keys_and_sd2_refused():
    assert infer_base(["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"])[0] == "sd15"
    assert infer_base(["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight"])[0] == "sdxl"
    assert infer_base(["transformer_blocks.3.attn1.to_q.lora_A.weight"])[0] == "pixart"
    with pytest.raises(ValueError, match="SD2"):
        infer_base(["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"],
                   {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 1024)})


# --- bad files: one line each, naming what was expected and what was found -----------------------------------

def test_truncated_file(tmp_path, sd15_lora):
    path = tmp_path / "cut.safetensors"
    A.write_adapter(path, sd15_lora, _meta())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    _one_line_error(lambda: A.read_adapter(path), "cut.safetensors", "truncated", r"need \d+ bytes", r"has \d+")


@pytest.mark.parametrize("content,why", [
    (b"hello, not a tensor file at all" * 4, "not a safetensors file"),
    (b"\x80\x04\x95" + b"\x00" * 40, "pickle"),
    (b"abc", "not a safetensors file: 3 bytes"),
])
def test_not_safetensors(tmp_path, content, why):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    _one_line_error(lambda: A.read_adapter(path), why, "expected")


def test_torch_checkpoint_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "lora.ckpt"
    torch.save({"w": torch.zeros(2)}, path)
    _one_line_error(lambda: A.read_adapter(path), "zip checkpoint", "never unpickles", "expected a .safetensors")


def test_sdxl_weights_for_sd15_base(tmp_path, sdxl_lora):
    path = tmp_path / "xl.safetensors"
    save_file(sdxl_lora, str(path))
    _one_line_error(lambda: A.read_adapter(path, expected_base="sd15"), "adapter is for sdxl", "model is sd15")
    A.write_adapter(tmp_path / "lie.safetensors", sdxl_lora, _meta(base="sdxl"))
    _one_line_error(lambda: A.read_adapter(tmp_path / "lie.safetensors", expected_base="sd15"), "for sdxl", "model is sd15")


def test_mislabelled_base_in_metadata(tmp_path, sdxl_lora):
    from safetensors.torch import save_file as raw_save

    raw_save(sdxl_lora, str(tmp_path / "m.safetensors"), metadata=_meta(base="sd15").to_strings())
    _one_line_error(lambda: A.read_adapter(tmp_path / "m.safetensors"), "metadata says base sd15", "weights are sdxl")


def test_unknown_kind(tmp_path, sd15_lora):
    meta = _meta().to_strings() | {"fewstep.kind": "turbo_lora"}
    save_file(sd15_lora, str(tmp_path / "k.safetensors"), metadata=meta)
    _one_line_error(lambda: A.read_adapter(tmp_path / "k.safetensors"), "unknown fewstep.kind 'turbo_lora'", "expected one of flash_lora")


def test_newer_format_version(tmp_path, sd15_lora):
    meta = _meta().to_strings() | {"fewstep.format_version": "9"}
    save_file(sd15_lora, str(tmp_path / "v.safetensors"), metadata=meta)
    _one_line_error(lambda: A.read_adapter(tmp_path / "v.safetensors"), "format_version 9 is newer", "update fewstep")


def test_nan_weights(tmp_path, sd15_lora):
    bad = dict(sd15_lora)
    key = sorted(k for k in bad if k.endswith("lora_up.weight"))[0]
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata=_meta().to_strings())
    _one_line_error(lambda: A.read_adapter(tmp_path / "nan.safetensors"), re.escape(key), "NaN/Inf")


def test_half_lora_module(tmp_path, sd15_lora):
    broken = {k: v for k, v in sd15_lora.items() if not k.startswith(sorted(sd15_lora)[0].split(".")[0]) or "lora_up" not in k}
    save_file(broken, str(tmp_path / "half.safetensors"))
    _one_line_error(lambda: A.read_adapter(tmp_path / "half.safetensors"), "needs both down and up")


def test_unrecognisable_file(tmp_path):
    save_file({"foo.bar": torch.zeros(3)}, str(tmp_path / "what.safetensors"))
    _one_line_error(lambda: A.read_adapter(tmp_path / "what.safetensors"), "cannot tell what this file holds", "expected LoRA keys")


def _module(lora, index=0):
    """(down key, up key, alpha key) of one module of a kohya LoRA."""
    down = sorted(k for k in lora if k.endswith("lora_down.weight"))[index]
    return down, down.replace("lora_down", "lora_up"), down.replace("lora_down.weight", "alpha")


def _lora_changes(lora):
    down, up, alpha = _module(lora)
    return {
        "ranks differ": ({up: lora[up][:, :-1]}, "ranks must match"),
        "rank 0": ({down: lora[down][:0], up: lora[up][:, :0]}, "is empty"),
        "1-D weights": ({down: lora[down].flatten(), up: lora[up].flatten()}, "expected 2-D"),
        "alpha not scalar": ({alpha: torch.ones(2)}, "an alpha is one number"),
        "alpha empty": ({alpha: torch.ones(0)}, "is empty"),
        "alpha 1e30": ({alpha: torch.tensor(1e30)}, "alpha 1e\\+30 at rank 4"),
        "alpha NaN": ({alpha: torch.tensor(float("nan"))}, "NaN/Inf|alpha nan"),
        "integer weights": ({down: lora[down].to(torch.int32)}, "torch.int32; adapter weights are F16, BF16, F32, F64"),
        "bool weights": ({up: lora[up] != 0}, "torch.bool"),
        "value beyond any weight": ({up: lora[up] + 1e5}, "beyond any trained weight"),
    }


@pytest.mark.parametrize("case", list(_lora_changes(_kohya_lora("sd15"))))
def test_malformed_lora_modules_are_refused_before_any_arithmetic(tmp_path, sd15_lora, case):
    change, message = _lora_changes(sd15_lora)[case]
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in {**sd15_lora, **change}.items()}, str(path), metadata=_meta().to_strings())
    _one_line_error(lambda: A.read_adapter(path), "bad.safetensors", message)
    # The header alone tells the structural ones: inspect without --check already refuses them.
    if case in ("ranks differ", "rank 0", "1-D weights", "alpha not scalar", "integer weights", "bool weights"):
        _one_line_error(lambda: A.describe(A.read_header(path), "bad.safetensors"), message)


def test_a_missing_kohya_alpha_is_not_taken_as_the_rank(tmp_path, sd15_lora):
    _, _, alpha = _module(sd15_lora)
    save_file({k: v for k, v in sd15_lora.items() if k != alpha}, str(tmp_path / "a.safetensors"), metadata=_meta().to_strings())
    _one_line_error(lambda: A.read_adapter(tmp_path / "a.safetensors"), "has no .alpha")


@pytest.mark.parametrize("field, value, message", [
    ("extra", "[]", "fewstep.extra must be a JSON object; found \\[\\]"),
    ("extra", "4", "fewstep.extra must be a JSON object"),
    ("extra", "NaN", "metadata fewstep.extra should be JSON"),
    ("timesteps", "7", "fewstep.timesteps must list 4 decreasing integers"),
    ("timesteps", "true", "fewstep.timesteps must list"),
    ("timesteps", "[1999, 749, 499, 249]", "from 999 to 0"),
    ("steps", "true", "fewstep.steps must be an integer from 1 to 1000; found True"),
    ("format_version", "true", "fewstep.format_version must be a positive integer"),
    ("guidance", '{"w_min": 2, "w_max": 1e400}', "should be JSON|w_max must be a finite number"),
    ("extra", '{"cfg_scale": -1}', "cfg_scale must be a finite number from 0"),
    ("extra", '{"consistency_boundary": "yes"}', "consistency_boundary must be true or false"),
    ("extra", "[" * 50000 + "]" * 50000, "nested too deeply"),
])
def test_metadata_of_the_wrong_type_or_range_is_refused(tmp_path, sd15_lora, field, value, message):
    save_file(sd15_lora, str(tmp_path / "m.safetensors"), metadata=_meta().to_strings() | {f"fewstep.{field}": value})
    _one_line_error(lambda: A.read_adapter(tmp_path / "m.safetensors"), "m.safetensors", message)


def test_a_guided_student_without_its_guidance_range_is_refused(tmp_path, sd15_lora):
    meta = _meta(kind="guided_student", extra={"format": "lora", "embedding_dim": 8, "alpha": 8}).to_strings()
    save_file(sd15_lora, str(tmp_path / "g.safetensors"), metadata=meta | {"fewstep.guidance": '{"default_w": 3}'})
    _one_line_error(lambda: A.read_adapter(tmp_path / "g.safetensors"), "needs w_min, w_max")


def _with_header(path, edit):
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: {**h, "__metadata__": ["a"]}, "__metadata__ must map strings to strings"),
    (lambda h: {k: ({**v, "shape": str(v["shape"])} if k != "__metadata__" else v) for k, v in h.items()}, "malformed entry"),
    (lambda h: {k: ({**v, "data_offsets": "0,8"} if k != "__metadata__" else v) for k, v in h.items()}, "malformed entry"),
    (lambda h: {k: ({**v, "dtype": "F33"} if k != "__metadata__" else v) for k, v in h.items()}, "malformed entry"),
    (lambda h: b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
])
def test_header_entries_of_the_wrong_type_are_refused(tmp_path, sd15_lora, edit, message):
    path = tmp_path / "h.safetensors"
    A.write_adapter(path, sd15_lora, _meta())
    _with_header(path, edit)
    _one_line_error(lambda: A.read_adapter(path), "h.safetensors", message)


def test_the_header_size_limit_is_safetensors_own(tmp_path, sd15_lora):
    assert A._MAX_HEADER_BYTES == 100_000_000   # MAX_HEADER_SIZE in safetensors' Rust reader
    path = tmp_path / "big.safetensors"
    A.write_adapter(path, sd15_lora, _meta())
    _with_header(path, lambda h: json_padded(h, 100_000_001))
    _one_line_error(lambda: A.read_header(path), "big.safetensors", "not a safetensors file")


def json_padded(header, size) -> bytes:
    import json

    text = json.dumps(header).encode()
    return text + b" " * (size - len(text))


def test_a_tensor_larger_than_any_layer_of_the_base_is_refused_before_loading(tmp_path):
    import json
    import struct

    header = json.dumps({"lora_unet_conv_in.lora_down.weight": {"dtype": "F32", "shape": [2 ** 30], "data_offsets": [0, 2 ** 32]}})
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:   # a sparse file: 4 GiB long, nothing on disk
        fh.write(struct.pack("<Q", len(header)) + header.encode())
        fh.truncate(8 + len(header) + 2 ** 32)
    _one_line_error(lambda: A.read_adapter(path), "holds 1,073,741,824 numbers, more than any layer")
    assert cli(["inspect", "--check", str(path)]) == 1


@pytest.mark.parametrize("config, message", [
    ({"a": 1}, "unknown UNet config field 'a'"),
    ({"block_out_channels": [10 ** 6] * 2, "down_block_types": ["CrossAttnDownBlock2D"] * 2,
      "up_block_types": ["CrossAttnUpBlock2D"] * 2, "cross_attention_dim": 768}, "'block_out_channels'"),
    ({"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "norm_num_groups": 8,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32}, r"describes [\d,]+ parameters but the file holds 10,016"),
])
def test_a_snap_students_architecture_is_checked_and_sized_before_anything_is_built(tmp_path, sd15_lora, config, message):
    meta = _meta(kind="snap_student", extra={"unet_config": config}).to_strings()
    save_file(sd15_lora, str(tmp_path / "s.safetensors"), metadata=meta)
    _one_line_error(lambda: A.read_adapter(tmp_path / "s.safetensors"), "s.safetensors", message)


def test_a_lora_that_overflows_half_precision_is_refused_and_the_model_is_unchanged(sd15_lora):
    from fewstep.core.lora import LoraKeyError, merge_lora, read_lora

    unet = build_tiny_unet("sd15", seed=0).half()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    down, up, alpha = _module(sd15_lora)
    modules, _ = read_lora({**sd15_lora, up: torch.full_like(sd15_lora[up], 9000.0), down: torch.full_like(sd15_lora[down], 9000.0)})
    with pytest.raises(LoraKeyError, match="overflow torch.float16"):
        merge_lora(unet, modules)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_a_sun_adapter_missing_half_its_layers_is_refused():
    from fewstep.core.sun import SunFileError
    from fewstep.training.sun_attention import new_sun_adapter, sun_adapter_from_tensors

    unet = build_tiny_unet("sd15", seed=0)
    tensors = new_sun_adapter(unet, add_pos=False).to_tensors()
    layers = sorted({k.split(".attn2.")[0] for k in tensors})
    half = {k: v for k, v in tensors.items() if k.split(".attn2.")[0] in layers[: len(layers) // 2]}
    with pytest.raises(SunFileError, match=f"covers {len(layers) // 2} of this model's {len(layers)} cross-attention layers"):
        sun_adapter_from_tensors(unet, half)


# --- fewstep inspect ------------------------------------------------------------------------------------------

def test_inspect_prints_settings(tmp_path, sd15_lora, capsys):
    path = tmp_path / "flash.safetensors"
    A.write_adapter(path, sd15_lora, _meta())
    assert cli(["inspect", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    for expected in ["flash_lora", "sd15", "consistency", "999, 749, 499, 249", "provenance.method", "finite"]:
        assert expected in out


def test_inspect_explains_inferred_files_and_errors(tmp_path, sdxl_lora, capsys):
    path = tmp_path / "xl.safetensors"
    save_file(sdxl_lora, str(path))
    assert cli(["inspect", str(path)]) == 0
    assert "(inferred)" in capsys.readouterr().out
    assert cli(["inspect", str(path), "--base", "sd15"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "adapter is for sdxl" in err and err.count("\n") == 1


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli(["inspect", "--help"])
    out = capsys.readouterr().out
    for option in ["--base", "--check", "--json"]:
        assert option in out
