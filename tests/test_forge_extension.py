"""The extension's Forge path without Forge: what it puts on Forge's model patcher, checked against what the A1111
path computes on the same model. ``ForgePatcher`` below records calls the way Forge's ``UnetPatcher`` stores them;
tests/test_forge_host.py is the proof inside a real Forge."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from fewstep.core.adapter_file import W_EMBEDDING_KEY
from fewstep.core.guidance import TimeEmbedWithW, w_conditioning_offset
from fewstep.core.sun import SunAdapter
from fewstep.core.unet_names import diffusers_attention_name
from fewstep.extension_a1111 import a1111_patches, forge, host, run_state
from fewstep.extension_a1111.run_config import Settings, configure
from fewstep.model_patcher.sun import patch_key

from .test_a1111_extension import LDM_ATTN2, _adapter, _guided_model, _ldm_unet, _reference_attention, _run, _sun_file


class ForgePatcher:
    """Forge's UnetPatcher as far as fewstep uses it: clones share the model, patches live in the clone."""

    def __init__(self, diffusion_model):
        self.model = SimpleNamespace(diffusion_model=diffusion_model)
        self.model_options = {"transformer_options": {}}
        self.lora_patches, self.object_patches = {}, {}

    def clone(self):
        n = ForgePatcher(self.model.diffusion_model)
        n.model = self.model
        n.model_options = {**self.model_options, "transformer_options": {**self.model_options["transformer_options"]}}
        n.lora_patches, n.object_patches = dict(self.lora_patches), dict(self.object_patches)
        return n

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        replace = self.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault("attn2", {})
        replace[(block_name, number, transformer_index)] = patch

    def set_model_attn2_patch(self, patch):
        self.model_options["transformer_options"].setdefault("patches", {}).setdefault("attn2_patch", []).append(patch)

    def add_conditioning_modifier(self, modifier):
        self.model_options.setdefault("conditioning_modifiers", []).append(modifier)

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = {
            k: [[strength_patch, v, strength_model, None, None]] for k, v in patches.items()}

    def get_model_object(self, name):
        return self.object_patches.get(name) or getattr(self.model.diffusion_model, name.split(".", 1)[1])

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj


def merged_weight(weight: torch.Tensor, patches) -> torch.Tensor:
    """Forge's merge of "diff" weight patches (backend/patcher/lora.py, merge_lora_to_weight): for each patch in
    order, weight · strength_model, then + strength · diff."""
    weight = weight.clone()
    for strength, (kind, (diff,)), strength_model, _, _ in patches:
        assert kind == "diff"
        weight *= strength_model
        weight += strength * diff
    return weight


@pytest.fixture
def undo_is_clean():
    yield
    host.undo_leftovers()


def _forge_p(unet, cfg_scale=7.0):
    sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=ForgePatcher(unet)))
    return SimpleNamespace(sd_model=sd_model, cfg_scale=cfg_scale, hr_cfg=1.0)


@pytest.mark.parametrize("cfg_scale", [1.0, 7.0])
def test_forge_sun_runs_the_adapter_with_the_negative_in_one_pass(monkeypatch, cfg_scale):
    monkeypatch.setattr(forge, "forge_attention", lambda q, k, v, options: _reference_attention(q, k, v, options["n_heads"]))
    unet, adapter = _ldm_unet(), _sun_file()
    p, active = _forge_p(unet, cfg_scale), _run(adapter, negative_strength=1.5)
    original = p.sd_model.forge_objects.unet
    forge.configure(p, active)
    # Forge encodes the negative prompt only at a CFG scale other than 1; the hires pass too.
    assert p.cfg_scale != 1 and p.hr_cfg == p.cfg_scale
    forge.patch_unet(p, active)
    patched = p.sd_model.forge_objects.unet
    assert patched is not original and original.model_options == {"transformer_options": {}}
    replace = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(replace) == {patch_key(n) for n in LDM_ATTN2}

    x, context, negative = torch.randn(2, 6, 32), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    uncond = [{"model_conds": {"c_crossattn": SimpleNamespace(cond=negative)}}]
    (modifier,) = patched.model_options["conditioning_modifiers"]
    *_, returned_uncond, cond, scale, options, seed = modifier("model", x, 0.5, uncond, ["cond"], p.cfg_scale,
                                                                patched.model_options, 0)
    assert scale == 1.0 and returned_uncond is uncond   # Forge's CFG = 1 shortcut then leaves the negative pass out
    sun = SunAdapter.from_tensors(adapter.tensors)
    with torch.no_grad():
        for name in LDM_ATTN2:
            m = unet.get_submodule(name)
            extra = {**options["transformer_options"], "n_heads": m.heads}
            for tap in extra["patches"]["attn2_patch"]:   # as Forge's transformer block calls them
                tap(x, context, context, extra)
            q = m.to_q(x)
            got = replace[patch_key(name)](q, m.to_k(context), m.to_v(context), extra)

            def attend(q_, k_, v_):
                return _reference_attention(q_, k_, v_, m.heads)

            h = attend(q, m.to_k(context), m.to_v(context))
            layer = sun.layer(diffusers_attention_name(name, 1))
            torch.testing.assert_close(got, layer(attend, q, h, negative, context, negative_strength=1.5))
    host.end(SimpleNamespace(fewstep_run=active))
    assert all(patch.fired for patch in active.sun_patches)


def test_forge_flash_and_guided_runs_turn_cfg_off_in_both_passes():
    p = _forge_p(_ldm_unet())
    forge.configure(p, run_state.ActiveRun(configure(Settings(True, "x.safetensors"), _adapter()), _adapter()))
    assert p.cfg_scale == 1 and p.hr_cfg == 1


def test_forge_guided_student_weights_match_the_a1111_path(tmp_path, undo_is_clean):
    unet, base, student, adapter = _guided_model()
    adapter = dataclasses.replace(adapter, path=str(tmp_path / "g.safetensors"))
    (tmp_path / "g.safetensors").write_bytes(b"")   # Forge's patch set is named after the file and its version
    p = _forge_p(unet)
    active = run_state.ActiveRun(configure(Settings(True, "g.safetensors", strength=0.3, w=3.0), adapter), adapter)
    forge.configure(p, active)
    forge.patch_unet(p, active)
    patched = p.sd_model.forge_objects.unet
    (patch_set,) = patched.lora_patches.values()
    params = dict(unet.named_parameters())
    forge_weights = {ldm: merged_weight(params[ldm].data, patch_set[f"diffusion_model.{ldm}"])
                     for ldm in active.student_keys.values()}
    time_embed = patched.object_patches["diffusion_model.time_embed"]
    assert isinstance(time_embed, TimeEmbedWithW)
    t_emb = torch.randn(2, student[W_EMBEDDING_KEY].shape[0])
    torch.testing.assert_close(time_embed(t_emb), unet.time_embed(t_emb + w_conditioning_offset(student[W_EMBEDDING_KEY], 3.0)))
    # The A1111 path on the same model: the weights it leaves during the run.
    a1111 = run_state.ActiveRun(configure(Settings(True, "g.safetensors", strength=0.3, w=3.0), adapter), adapter)
    a1111.student_keys = active.student_keys
    a1111_patches.apply_student(SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)), a1111)
    for ldm, weight in forge_weights.items():
        torch.testing.assert_close(weight, dict(unet.named_parameters())[ldm].data)


def test_lora_modules_applied_counts_the_files_patches(tmp_path):
    path = tmp_path / "flash.safetensors"
    path.write_bytes(b"")
    unet, clip = ForgePatcher(None), SimpleNamespace(patcher=ForgePatcher(None))
    unet.add_patches(filename=str(path), patches={"a": 1, "b": 2})
    unet.add_patches(filename="other.safetensors", patches={"c": 3})
    clip.patcher.add_patches(filename=str(tmp_path / "." / "flash.safetensors"), patches={"d": 4})
    sd_model = SimpleNamespace(forge_objects_after_applying_lora=SimpleNamespace(unet=unet, clip=clip))
    assert forge.lora_modules_applied(sd_model, str(path)) == 3
