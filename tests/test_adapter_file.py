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
