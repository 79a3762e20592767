"""The A1111 extension without a WebUI: settings and adapter metadata -> run settings, infotext round trip, the LDM
names the SUN patches address, the attention they stand in for, and undoing every change. The WebUI's ``modules``
are small recording stand-ins here; tests/test_a1111_host.py is the proof inside a real A1111."""

from __future__ import annotations

import math
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import nn

from fewstep.core.adapter_file import W_EMBEDDING_KEY, Adapter, AdapterFileError, AdapterMetadata, read_adapter, write_adapter
from fewstep.core.schedule import DiscreteSchedule
from fewstep.core.sun import SunAdapter, SunLayer, multi_head_attention
from fewstep.core.unet_names import diffusers_attention_name, ldm_attention_name
from fewstep.extension_a1111 import a1111_patches, host, ldm_unet, lora_networks, run_state, sampling
from fewstep.extension_a1111.run_config import (FROM_FILE, INFOTEXT_ADAPTER, Settings, configure, lora_alias, model_base,
                                                settings_from_infotext)

from .test_adapter_file import _kohya_lora


def _adapter(kind="flash_lora", **meta) -> Adapter:
    base = dict(kind=kind, base="sd15", sampler="consistency", steps=4, timesteps=[999, 759, 499, 259])
    if kind == "sun_adapter":
        base.update(sampler="dpmpp_2m", timesteps=[999, 749, 499, 249])
    if kind == "guided_student":
        base.update(sampler="ddim", guidance={"convention": "imagen", "w_min": 2.0, "w_max": 12.0, "default_w": 6.0})
    return Adapter("x.safetensors", {}, AdapterMetadata(**{**base, **meta}), inferred=False, notes=[])


# --- settings -> run ------------------------------------------------------------------------------------------------

def test_a_flash_lora_runs_as_its_file_says():
    run = configure(Settings(enabled=True, adapter="sub/flash_sd15.safetensors"), _adapter())
    assert run.sampler_name == "FewStep consistency"
    assert run.plan.timesteps == (999, 759, 499, 259) and run.plan.cfg_scale == 1.0 and run.plan.consistency_boundary
    assert run.skip_negative_pass and run.lora_tag == "<lora:flash_sd15:1>"
    assert run.infotext == {INFOTEXT_ADAPTER: "sub/flash_sd15.safetensors", "fewstep strength": 1.0}


def test_user_settings_win_over_the_file():
    run = configure(Settings(enabled=True, adapter="flash.safetensors", strength=0.8, steps=2, sampler="ddim"), _adapter())
    assert run.sampler_name == "FewStep ddim" and run.plan.sampler == "ddim"
    assert run.plan.timesteps == tuple(_adapter().metadata.timesteps_for(2)) and len(run.plan.timesteps) == 2
    assert run.lora_tag == "<lora:flash:0.8>"
    assert run.infotext["fewstep steps"] == 2 and run.infotext["fewstep sampler"] == "ddim"


def test_a_file_trained_for_cfg_keeps_the_negative_pass():
    run = configure(Settings(enabled=True, adapter="lcm.safetensors"), _adapter(extra={"cfg_scale": 1.5}))
    assert run.plan.cfg_scale == 1.5 and not run.skip_negative_pass and run.plan.model_passes_per_step == 2


def test_a_sun_adapter_reads_the_negative_in_one_pass():
    run = configure(Settings(enabled=True, adapter="sun.safetensors", negative_strength=1.5), _adapter("sun_adapter"))
    assert run.lora_tag is None and run.skip_negative_pass and run.plan.negative_in_adapter
    assert run.plan.negative_strength == 1.5 and run.infotext["fewstep negative strength"] == 1.5
    assert run.sampler_name == "FewStep dpmpp_2m" and run.plan.timesteps == (999, 749, 499, 249)


def test_a_guided_student_takes_w_as_input_at_one_pass_per_step():
    run = configure(Settings(enabled=True, adapter="g.safetensors"), _adapter("guided_student"))
    assert run.plan.w == 6.0 and run.skip_negative_pass and run.lora_tag is None and run.sampler_name == "FewStep ddim"
    assert run.infotext["fewstep w"] == 6.0
    run = configure(Settings(enabled=True, adapter="g.safetensors", w=20.0), _adapter("guided_student"))
    assert run.plan.w == 20.0 and "outside the trained range" in run.summary
    with pytest.raises(AdapterFileError, match="is a snap_student; the A1111 extension runs flash_lora, sun_adapter"):
        configure(Settings(enabled=True, adapter="g.safetensors"), _adapter("snap_student"))
    assert run.unet_weights
    lora = configure(Settings(enabled=True, adapter="sub/g_lora.safetensors"), _adapter("guided_student", extra={"format": "lora"}))
    assert lora.lora_tag == "<lora:g_lora:1>" and not lora.unet_weights and lora.plan.w == 6.0   # the host's LoRA loader + w


@pytest.mark.parametrize("file_format", ["unet", "lora"])
def test_a_gdd_generator_runs_one_pass_from_its_weights_or_as_a_lora(file_format):
    adapter = _adapter("gdd_student", sampler="onestep", steps=1, timesteps=[999], extra={"format": file_format})
    run = configure(Settings(enabled=True, adapter="one/gdd.safetensors"), adapter)
    assert run.sampler_name == "FewStep onestep" and run.plan.timesteps == (999,) and run.skip_negative_pass
    assert run.plan.w is None and not run.plan.consistency_boundary
    assert run.unet_weights == (file_format == "unet")
    assert run.lora_tag == (None if file_format == "unet" else "<lora:gdd:1>")


def test_bad_settings_and_models_give_one_line_errors():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        configure(Settings(enabled=True, adapter="a.safetensors", sampler="euler"), _adapter())
    with pytest.raises(AdapterFileError, match="SD1.5 and SDXL checkpoints"):
        model_base(is_sdxl=False, is_sd1=False)
    assert model_base(True, False) == "sdxl" and model_base(False, True) == "sd15"
    with pytest.raises(ValueError, match="at most 7 script args"):
        Settings.from_args([True, "a", 1.0, 4, 1.0, -1.0, FROM_FILE, "extra"])
    assert Settings.from_args([True, "a.safetensors"]) == Settings(enabled=True, adapter="a.safetensors")


def test_wrong_base_model_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "flash_sdxl.safetensors"
    write_adapter(path, _kohya_lora("sdxl"), _adapter(base="sdxl").metadata)
    with pytest.raises(AdapterFileError, match="sdxl.*sd15|sd15.*sdxl"):
        host.load_adapter(str(path), "sd15")
    assert host.load_adapter(str(path), "sdxl").metadata.base == "sdxl"


def test_infotext_round_trip_restores_the_settings():
    """What the PNG records, as A1111 parses it back (all values strings), gives the same settings."""
    for settings, adapter in [(Settings(True, "f.safetensors", 0.7, 2, 1.0, -1.0, "ddim"), _adapter()),
                              (Settings(True, "s.safetensors", 1.0, 0, 1.6, -1.0, FROM_FILE), _adapter("sun_adapter"))]:
        parsed = {k: str(v) for k, v in configure(settings, adapter).infotext.items()}
        assert settings_from_infotext(parsed) == settings
    assert settings_from_infotext({"Steps": "20"}) is None


def test_lora_alias_is_the_file_name_the_lora_extension_lists():
    assert lora_alias("sub/dir\\flash.v2.safetensors") == "flash.v2" and lora_alias("plain") == "plain"


# --- LDM names --------------------------------------------------------------------------------------------------

# SD1.5's (2 layers per block) and SDXL's attention blocks, as the LDM checkpoints name them (a transformer is
# module 1 of its block; the middle block's too).
SD15_PAIRS = [("down_blocks.0.attentions.0", "input_blocks.1.1"), ("down_blocks.0.attentions.1", "input_blocks.2.1"),
              ("down_blocks.1.attentions.0", "input_blocks.4.1"), ("down_blocks.2.attentions.1", "input_blocks.8.1"),
              ("mid_block.attentions.0", "middle_block.1"), ("up_blocks.1.attentions.0", "output_blocks.3.1"),
              ("up_blocks.2.attentions.2", "output_blocks.8.1"), ("up_blocks.3.attentions.2", "output_blocks.11.1")]
SDXL_PAIRS = [("down_blocks.1.attentions.0", "input_blocks.4.1"), ("down_blocks.2.attentions.1", "input_blocks.8.1"),
              ("up_blocks.0.attentions.2", "output_blocks.2.1"), ("up_blocks.1.attentions.0", "output_blocks.3.1")]


@pytest.mark.parametrize("diffusers, ldm", SD15_PAIRS + SDXL_PAIRS)
def test_attention_names_match_the_ldm_layout(diffusers, ldm):
    rest = ".transformer_blocks.0.attn2"
    ldm_name = ldm + rest
    assert ldm_attention_name(diffusers + rest, 2) == ldm_name
    assert diffusers_attention_name(ldm_name, 2) == diffusers + rest


def test_attention_names_refuse_what_holds_no_attention():
    with pytest.raises(ValueError, match="downsampler"):
        diffusers_attention_name("input_blocks.3.1.transformer_blocks.0.attn2", 2)
    with pytest.raises(ValueError, match="not a module inside"):
        ldm_attention_name("conv_in", 2)


# --- SUN on an LDM UNet ---------------------------------------------------------------------------------------------

def _reference_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V written out per head."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, inner)


class LdmCrossAttention(nn.Module):
    """LDM's CrossAttention: what A1111 calls as attn1/attn2(x, context=...)."""

    def __init__(self, dim, context_dim, heads=4):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k = nn.Linear(dim, dim, bias=False), nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        return self.to_out(_reference_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


def _ldm_unet(dim=32, context_dim=16):
    """The transformers of a one-level LDM UNet with one res block (the tiny A1111 checkpoint's layout)."""
    unet = nn.Module()
    unet.num_res_blocks = [1]
    for section, indices in (("input_blocks", [1]), ("middle_block", [None]), ("output_blocks", [0, 1])):
        container = nn.ModuleDict()
        for index in indices:
            block = nn.ModuleDict({"1": nn.ModuleDict({"transformer_blocks": nn.ModuleDict({"0": nn.ModuleDict({
                "attn1": LdmCrossAttention(dim, dim), "attn2": LdmCrossAttention(dim, context_dim)})})})})
            if index is None:
                container = block
            else:
                container[str(index)] = block
        setattr(unet, section, container)
    return unet


LDM_ATTN2 = ["input_blocks.1.1.transformer_blocks.0.attn2", "middle_block.1.transformer_blocks.0.attn2",
             "output_blocks.0.1.transformer_blocks.0.attn2", "output_blocks.1.1.transformer_blocks.0.attn2"]


def _sun_file(context_dim=16, dim=32, add_pos=True, seed=0) -> Adapter:
    torch.manual_seed(seed)
    names = [diffusers_attention_name(n, 1) for n in LDM_ATTN2]
    layers = {n: SunLayer(context_dim, dim, add_pos=add_pos) for n in names}
    for layer in layers.values():
        for p in layer.parameters():
            nn.init.normal_(p, std=0.3)
    return Adapter("sun.safetensors", SunAdapter(layers).to_tensors(), _adapter("sun_adapter").metadata, inferred=False, notes=[])


@pytest.fixture
def undo_is_clean():
    yield
    host.undo_leftovers()


def _run(adapter: Adapter, negative_strength=1.0) -> run_state.ActiveRun:
    return run_state.ActiveRun(configure(Settings(True, "sun.safetensors", negative_strength=negative_strength), adapter), adapter)


def test_sun_patches_compute_the_adapter_and_are_undone(undo_is_clean):
    unet, adapter = _ldm_unet(), _sun_file()
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    x, context, negative = torch.randn(2, 6, 32), torch.randn(2, 5, 16), torch.randn(1, 5, 16)
    modules = [unet.get_submodule(n) for n in LDM_ATTN2]
    with torch.no_grad():
        stock = [m(x, context=context) for m in modules]
        active = _run(adapter, negative_strength=1.5)
        assert a1111_patches.install_sun(model, active) == 4
        # Without a negative yet: the plain attention.
        for m, expected in zip(modules, stock):
            torch.testing.assert_close(m(x, context=context), expected)
        assert active.sun_layers_fired == set()
        active.negative = negative
        sun = SunAdapter.from_tensors(adapter.tensors)
        for name, m in zip(LDM_ATTN2, modules):
            layer = sun.layer(diffusers_attention_name(name, 1))
            q = m.to_q(x)

            def attend(q_, k_, v_):
                return _reference_attention(q_, k_, v_, m.heads)

            h = attend(q, m.to_k(context), m.to_v(context))
            expected = m.to_out(layer(attend, q, h, negative, context, negative_strength=1.5))
            torch.testing.assert_close(m(x, context=context), expected)
        assert active.sun_layers_fired == set(LDM_ATTN2)
        host.end(SimpleNamespace(fewstep_run=active))
        assert all("forward" not in m.__dict__ for m in modules)
        for m, expected in zip(modules, stock):
            torch.testing.assert_close(m(x, context=context), expected)


def test_sun_adapter_for_another_model_is_refused(undo_is_clean):
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=_ldm_unet(dim=64)))
    with pytest.raises(AdapterFileError, match="does not fit this model"):
        a1111_patches.install_sun(model, _run(_sun_file()))
    assert all("forward" not in m.__dict__ for m in model.model.diffusion_model.modules())


def test_multi_head_attention_is_the_written_out_formula():
    q, k, v = torch.randn(2, 6, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    torch.testing.assert_close(multi_head_attention(q, k, v, 4), _reference_attention(q, k, v, 4))


def test_negative_features_come_from_the_cfg_denoiser_callback():
    active = _run(_sun_file())
    negative = torch.randn(1, 5, 16)
    params = SimpleNamespace(denoiser=SimpleNamespace(p=SimpleNamespace(fewstep_run=active)), text_uncond=negative)
    a1111_patches.on_cfg_denoiser(params)
    assert active.negative is negative
    params.text_uncond = {"crossattn": negative * 2, "vector": torch.zeros(1, 4)}    # SDXL's conditioning dict
    a1111_patches.on_cfg_denoiser(params)
    torch.testing.assert_close(active.negative, negative * 2)


# --- options and the undo list --------------------------------------------------------------------------------

@pytest.fixture
def webui_options(monkeypatch):
    modules = ModuleType("modules")
    modules.shared = SimpleNamespace(opts=SimpleNamespace(data={"sd_model_checkpoint": "tiny"}))
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", modules.shared)
    return modules.shared.opts.data


def test_an_option_the_user_never_saved_is_removed_again(webui_options):
    with sampling.options_overridden({"skip_early_cond": 1.0}):
        assert webui_options["skip_early_cond"] == 1.0
    assert webui_options == {"sd_model_checkpoint": "tiny"}
    webui_options["skip_early_cond"] = 0.2
    with pytest.raises(MemoryError), sampling.options_overridden({"skip_early_cond": 1.0}):
        raise MemoryError("out of memory")   # sampling failed: the option is back all the same
    assert webui_options == {"sd_model_checkpoint": "tiny", "skip_early_cond": 0.2}


def test_a_failed_undo_does_not_stop_the_others(undo_is_clean, caplog):
    done = []
    run_state.pending_undo.push("first", lambda: done.append("first"))
    run_state.pending_undo.push("broken", lambda: 1 / 0)
    host.undo_leftovers()
    assert done == ["first"] and "could not undo broken" in caplog.text


def test_a_configuration_error_stops_the_run_when_sampling_starts(monkeypatch, undo_is_clean):
    def missing(name):
        raise AdapterFileError(f"{name}: not found in models/fewstep or models/Lora; press the refresh button")

    monkeypatch.setattr(host, "adapter_path", missing)
    p = SimpleNamespace(sd_model=SimpleNamespace(is_sdxl=False, is_sd1=True), sampler_name="Euler")
    host.begin(p, [True, "gone.safetensors"])
    assert isinstance(p.fewstep_run, run_state.RunError) and p.sampler_name.startswith("FewStep ")
    with pytest.raises(run_state.RunError, match="gone.safetensors: not found"):
        sampling.a1111_sampler("consistency")(SimpleNamespace(p=p), torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.0]))
    untouched = SimpleNamespace(sampler_name="Euler")
    host.begin(untouched, [False, "gone.safetensors"])
    assert untouched.sampler_name == "Euler" and not hasattr(untouched, "fewstep_run")


def test_a_lora_whose_modules_match_no_layer_stops_the_run(monkeypatch, undo_is_clean):
    """A1111's Lora extension only logs modules that match no layer and samples without them; fewstep stops the run
    (as ComfyUI's loader does), with the count, when sampling starts."""
    lora = _kohya_lora("sd15")
    adapter = Adapter("/models/Lora/moved.safetensors", lora, AdapterMetadata(kind="flash_lora", base="sd15"), False, [])
    run = configure(Settings(enabled=True, adapter="moved.safetensors"), adapter)
    networks = ModuleType("networks")
    networks.available_network_aliases = {}
    networks.loaded_networks = [SimpleNamespace(name=run.lora_alias, modules={"one": None})]
    modules = ModuleType("modules")
    modules.extra_networks = ModuleType("modules.extra_networks")
    for name, module in {"networks": networks, "modules": modules, "modules.extra_networks": modules.extra_networks}.items():
        monkeypatch.setitem(sys.modules, name, module)
    p = SimpleNamespace(sd_model=SimpleNamespace(), fewstep_run=run_state.ActiveRun(run, adapter))
    host.after_networks(p)
    expected = lora_networks.lora_module_count(adapter)
    with pytest.raises(run_state.RunError, match=f"moved.safetensors: {expected - 1} of {expected} LoRA modules match no layer"):
        sampling.a1111_sampler("consistency")(SimpleNamespace(p=p), torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.0]))


def test_lora_module_count_reads_kohya_names(tmp_path):
    path = tmp_path / "flash.safetensors"
    tensors = _kohya_lora("sd15")
    write_adapter(path, tensors, _adapter().metadata)
    modules = {k.split(".", 1)[0] for k in tensors}
    assert lora_networks.lora_module_count(read_adapter(path)) == len(modules) > 0


def test_the_released_layout_finds_the_same_ldm_modules():
    """Released files key a layer by its index among diffusers' attention processors (attn1 included)."""
    from fewstep.core.sun import attention_processor_order

    unet, ours = _ldm_unet(), _sun_file()
    names = [diffusers_attention_name(n, 1) for n, _ in unet.named_modules() if n.endswith((".attn1", ".attn2"))]
    index = {name: i for i, name in enumerate(attention_processor_order(names))}
    released = {f"{index[k.split('.to_')[0]]}.to_{k.split('.to_', 1)[1]}": v for k, v in ours.tensors.items()}
    loaded, ldm = ldm_unet.sun_layers(unet, Adapter("released.safetensors", released, ours.metadata, inferred=True, notes=[]))
    assert sorted(ldm[n] for n in loaded.names) == sorted(LDM_ATTN2)
    assert loaded.to_tensors().keys() == ours.tensors.keys()
    assert all(torch.equal(loaded.to_tensors()[k], v) for k, v in ours.tensors.items())


# --- guided students ------------------------------------------------------------------------------------------------

def _module_with(parameters: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree whose parameters have exactly these dotted names."""
    root = nn.Module()
    for name, value in parameters.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.clone()))
    return root


def _guided_model():
    """An LDM-named tiny UNet (its time MLP as LDM's Sequential), its diffusers-named weights, and a guided student
    file for it whose weights are the UNet's + 1."""
    from fewstep.core.unet_names import ldm_unet_keys
    from fewstep.training.tiny_models import build_tiny_unet

    base = build_tiny_unet("sd15").state_dict()
    names = ldm_unet_keys(base, 1)
    unet = _module_with({names[k]: v for k, v in base.items() if not names[k].startswith("time_embed.")})
    unet.num_res_blocks = [1]
    unet.time_embed = nn.Sequential(nn.Linear(*base["time_embedding.linear_1.weight"].shape[::-1]), nn.SiLU(),
                                    nn.Linear(*base["time_embedding.linear_2.weight"].shape[::-1]))
    unet.time_embed.load_state_dict({"0.weight": base["time_embedding.linear_1.weight"], "0.bias": base["time_embedding.linear_1.bias"],
                                     "2.weight": base["time_embedding.linear_2.weight"], "2.bias": base["time_embedding.linear_2.bias"]})
    student = {k: v + 1.0 for k, v in base.items()}
    student[W_EMBEDDING_KEY] = torch.randn(base["time_embedding.linear_1.weight"].shape[1], 256)
    adapter = Adapter("g.safetensors", student, _adapter("guided_student").metadata, inferred=False, notes=[])
    return unet, base, student, adapter


def test_a_guided_student_goes_onto_the_ldm_weights_and_comes_off_again(undo_is_clean):
    from fewstep.core.guidance import TimeEmbedWithW

    unet, base, student, adapter = _guided_model()
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    active = run_state.ActiveRun(configure(Settings(True, "g.safetensors", strength=0.5, w=3.0), adapter), adapter)
    active.student_keys = ldm_unet.student_keys(unet, adapter)
    time_embed = unet.time_embed
    a1111_patches.apply_student(model, active)
    a1111_patches.apply_student(model, active)   # once per run, whatever the number of batches
    params = dict(unet.named_parameters())
    for key, ldm in active.student_keys.items():
        torch.testing.assert_close(params[ldm].data, base[key] + 0.5)
    assert isinstance(unet.time_embed, TimeEmbedWithW)
    t_emb = torch.randn(2, base["time_embedding.linear_1.weight"].shape[1])
    from fewstep.core.guidance import w_conditioning_offset

    torch.testing.assert_close(unet.time_embed(t_emb), time_embed(t_emb + w_conditioning_offset(student[W_EMBEDDING_KEY], 3.0)))
    host.undo_leftovers()
    assert unet.time_embed is time_embed
    for key, ldm in active.student_keys.items():
        torch.testing.assert_close(dict(unet.named_parameters())[ldm].data, base[key])
    # A student of another UNet is refused before anything changes.
    other = {**student, "conv_in.weight": torch.zeros(8, 4, 3, 3)}
    with pytest.raises(AdapterFileError, match="do not fit this model .e.g. conv_in.weight."):
        ldm_unet.student_keys(unet, Adapter("g.safetensors", other, adapter.metadata, inferred=False, notes=[]))


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_unet_keys_go_through_diffusers_own_ldm_converter_and_back(base, layers_per_block):
    """diffusers' single-file converter (LDM -> diffusers) is the reference for every key of the mapping."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from fewstep.core.unet_names import ldm_unet_keys
    from fewstep.training.tiny_models import build_tiny_unet

    unet = build_tiny_unet(base, layers_per_block=layers_per_block)
    state = unet.state_dict()
    names = ldm_unet_keys(state, layers_per_block)
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + names[k]: v for k, v in state.items()}, dict(unet.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())



# --- a failed run, API args, adapter names ----------------------------------------------------------------------------

@pytest.fixture
def webui(monkeypatch, tmp_path):
    """The WebUI modules a run touches: options (the user saved skip_early_cond = 0.2), models/fewstep and
    models/Lora under tmp_path, and the per-request RNG the samplers draw from."""
    models = tmp_path / "models"
    (models / "fewstep").mkdir(parents=True)
    (models / "Lora").mkdir()
    modules = ModuleType("modules")
    modules.shared = SimpleNamespace(opts=SimpleNamespace(data={"skip_early_cond": 0.2}),
                                     cmd_opts=SimpleNamespace(lora_dir=str(models / "Lora")))
    modules.paths_internal = SimpleNamespace(models_path=str(models))
    modules.sd_samplers_common = SimpleNamespace(TorchHijack=lambda p: SimpleNamespace(randn_like=torch.randn_like))
    monkeypatch.setitem(sys.modules, "modules", modules)
    for name in ("shared", "paths_internal", "sd_samplers_common"):
        monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(modules, name))
    write_adapter(models / "Lora" / "flash.safetensors", _kohya_lora("sd15"), _adapter().metadata)
    yield SimpleNamespace(options=modules.shared.opts.data, models=models)
    host.undo_leftovers()


class _Processing:
    """A1111's StableDiffusionProcessingTxt2Img as the run sees it; ``close`` is what ``with closing(p)`` calls."""

    def __init__(self):
        sd = DiscreteSchedule.stable_diffusion()
        self.sd_model = SimpleNamespace(is_sdxl=False, is_sd1=True, alphas_cumprod=sd.alphas_cumprod.float())
        self.sampler_name, self.scheduler, self.steps, self.cfg_scale = "Euler", "Automatic", 20, 7.0
        self.extra_generation_params, self.closed = {}, False

    def close(self):
        self.closed = True


def _request(p, args, fail=None, seen=None):
    """One txt2img request the way A1111 1.10.1 runs it (modules/api/api.py, processing.process_images): before_process,
    process, p.init (where a bad hires upscaler raises), sampling through the run's sampler (where an out-of-memory
    raises), all inside ``with closing(p)``. ``seen`` gets skip_early_cond as the CFG denoiser reads it, each pass."""
    from contextlib import closing

    from modules import shared

    class Denoiser:   # A1111's CFG denoiser as our sampler gets it: the request, the model's sigma table
        def __init__(self):
            self.p, self.inner_model = p, SimpleNamespace(sigmas=DiscreteSchedule.stable_diffusion().sigmas.float())

        def __call__(self, x, sigma, **kwargs):
            seen.append(shared.opts.data.get("skip_early_cond"))
            if fail == "sampling":
                raise MemoryError("CUDA out of memory")
            return torch.zeros_like(x)

    with closing(p):
        host.undo_leftovers()          # the script's before_process
        host.begin(p, args)            # its process
        if fail == "init":
            raise RuntimeError("could not find upscaler named nope")
        sampler = sampling.a1111_sampler(p.sampler_name.removeprefix("FewStep ")) if p.sampler_name.startswith("FewStep ") else None
        if sampler is not None:
            sampler(Denoiser(), torch.randn(1, 4, 8, 8), torch.tensor([14.6, 1.0, 0.0]))


@pytest.mark.parametrize("fail", ["init", "sampling"])
def test_a_failed_run_leaves_the_webuis_settings_as_they_were(webui, fail):
    """A run that fails after set-up (a bad hires upscaler fails in p.init, an out-of-memory in sampling) must not
    leave skip_early_cond = 1 behind: saving the settings would write it to config.json, and every plain run after a
    restart would ignore the negative prompt."""
    p, seen = _Processing(), []
    with pytest.raises((RuntimeError, MemoryError)):
        _request(p, [True, "flash.safetensors"], fail=fail, seen=seen)
    assert p.closed and webui.options == {"skip_early_cond": 0.2}
    assert run_state.pending_undo._steps == []   # everything else the run changed is undone too, not at the next request
    assert seen == ([] if fail == "init" else [1.0])   # the negative pass was skipped while our sampler ran
    plain, seen = _Processing(), []
    _request(plain, [False, "flash.safetensors"], seen=seen)
    assert webui.options == {"skip_early_cond": 0.2} and plain.sampler_name == "Euler"
    fewstep, seen = _Processing(), []
    _request(fewstep, [True, "flash.safetensors"], seen=seen)
    assert seen == [1.0, 1.0] and webui.options == {"skip_early_cond": 0.2}
    del webui.options["skip_early_cond"]   # a user who never saved the option: no entry afterwards either
    with pytest.raises(MemoryError):
        _request(_Processing(), [True, "flash.safetensors"], fail="sampling", seen=seen)
    assert webui.options == {}


@pytest.mark.parametrize("value, enabled", [(True, True), (False, False), ("true", True), ("True", True), ("1", True),
                                            ("on", True), (1, True), ("false", False), ("False", False), ("0", False),
                                            ("off", False), ("", False), (0, False), (None, False)])
def test_the_enabled_flag_from_the_api_is_parsed_not_truth_tested(value, enabled):
    assert Settings.from_args([value, "a.safetensors"]).enabled is enabled


def test_bad_api_args_are_one_line_errors_and_false_leaves_the_run_alone(webui):
    for value in ("maybe", "yes please", 2, [True]):
        with pytest.raises(ValueError, match=r"^script arg enabled must be true or false .*; got"):
            Settings.from_args([value, "a.safetensors"])
    with pytest.raises(ValueError, match=r"^script arg strength must be a number; got 'strong'"):
        Settings.from_args([True, "a.safetensors", "strong"])
    with pytest.raises(ValueError, match=r"^script arg steps must be a whole number; got 2.5"):
        Settings.from_args([True, "a.safetensors", 1.0, 2.5])
    assert Settings.from_args([True, "a.safetensors", "0.5", 4.0]) == Settings(True, "a.safetensors", 0.5, 4)
    p = _Processing()
    host.begin(p, ["false", "flash.safetensors"])
    assert p.sampler_name == "Euler" and not hasattr(p, "fewstep_run") and webui.options == {"skip_early_cond": 0.2}
    host.begin(p, ["maybe", "flash.safetensors"])
    assert isinstance(p.fewstep_run, run_state.RunError) and "script arg enabled must be true or false" in str(p.fewstep_run)


def test_adapter_names_stay_inside_the_adapter_folders(webui, tmp_path):
    """The API sends any string: ``../`` and absolute paths must not open files outside models/fewstep and models/Lora."""
    outside = tmp_path / "outside.safetensors"
    write_adapter(outside, _kohya_lora("sd15"), _adapter().metadata)
    (webui.models / "fewstep" / "sub").mkdir()
    inside = webui.models / "fewstep" / "sub" / "mine.safetensors"
    write_adapter(inside, _kohya_lora("sd15"), _adapter().metadata)
    assert host.adapter_path("sub/mine.safetensors") == str(inside)
    assert host.adapter_path("flash.safetensors") == str(webui.models / "Lora" / "flash.safetensors")
    for name in ("../../outside.safetensors", "sub/../../../outside.safetensors", str(outside), "..\\..\\outside.safetensors",
                 "/" + str(outside).lstrip("/")):
        with pytest.raises(AdapterFileError, match="not an adapter name; expected a file name relative to models/fewstep"):
            host.adapter_path(name)
    with pytest.raises(AdapterFileError, match="not a .safetensors file"):
        host.adapter_path("sub/mine.ckpt")
    for empty in ("", None):
        with pytest.raises(AdapterFileError, match="^no adapter selected: put a .safetensors in models/fewstep or models/Lora"):
            host.adapter_path(empty)
    p = _Processing()
    host.begin(p, [True, "../../outside.safetensors"])
    assert isinstance(p.fewstep_run, run_state.RunError) and str(p.fewstep_run).startswith("fewstep: '../../outside.safetensors'")
    assert "\n" not in str(p.fewstep_run)


def test_the_host_tests_skip_reason_names_what_to_set(monkeypatch, tmp_path):
    from .a1111_host import a1111

    for name in ("PATH", "PYTHON", "STUBS", "HF_HOME", "TOOLS"):
        monkeypatch.delenv(f"A1111_{name}", raising=False)
    assert all(f"A1111_{v}" in a1111() for v in ("PATH", "PYTHON", "STUBS", "HF_HOME", "TOOLS"))
    (tmp_path / "launch.py").write_text("")
    for name, value in (("PATH", tmp_path), ("PYTHON", sys.executable), ("STUBS", tmp_path), ("HF_HOME", tmp_path),
                        ("TOOLS", tmp_path / "tools")):
        monkeypatch.setenv(f"A1111_{name}", str(value))
    assert a1111().startswith(f"A1111_TOOLS={tmp_path / 'tools'} holds no make_tiny_sd15.py")
