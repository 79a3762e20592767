"""fewstep's ComfyUI nodes without ComfyUI: the schemas build, and what the nodes compute is checked against
diffusers' schedulers. ComfyUI's modules are replaced by small recording stand-ins (as ComfyUI's own
tests-unit do); tests/test_comfyui_nodes.py is the proof inside a real ComfyUI."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler

from fewstep.core import samplers as K
from fewstep.core.adapter_file import AdapterFileError, AdapterMetadata, write_adapter
from fewstep.core.guidance import TimeEmbedWithW
from fewstep.core.lora import LoraModule, write_lora
from fewstep.core.schedule import DiscreteSchedule
from fewstep.training.tiny_models import sd_scheduler_config


class _Port:
    def __init__(self, id=None, **options):
        self.id, self.options = id, options


def _io_module() -> ModuleType:
    io = ModuleType("comfy_api.latest.io")
    for name in ("Model", "Clip", "Sampler", "Sigmas", "Conditioning", "Latent", "Int", "Float", "String", "Combo", "Guider"):
        setattr(io, name, type(name, (), {"Input": _Port, "Output": _Port}))
    io.Schema = lambda **fields: SimpleNamespace(**fields)
    io.ComfyNode = type("ComfyNode", (), {})
    io.NodeOutput = lambda *args, ui=None: SimpleNamespace(args=args, ui=ui)
    return io


@pytest.fixture
def host(monkeypatch, tmp_path):
    """Stand-ins for the ComfyUI modules the nodes import, with models/fewstep and models/loras under tmp_path."""
    folders = {"fewstep": tmp_path / "fewstep", "loras": tmp_path / "loras"}
    for folder in folders.values():
        folder.mkdir()
    latest = ModuleType("comfy_api.latest")
    latest.io, latest.ui = _io_module(), SimpleNamespace(PreviewText=lambda text: SimpleNamespace(text=text))
    latest.ComfyExtension = type("ComfyExtension", (), {})
    samplers = ModuleType("comfy.samplers")
    samplers.KSAMPLER = lambda fn, extra_options={}: SimpleNamespace(fn=fn, extra_options=extra_options)
    folder_paths = ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda name: sorted(p.name for p in folders[name].iterdir())
    folder_paths.get_full_path = lambda name, file: str(folders[name] / file) if (folders[name] / file).is_file() else None
    comfy_api, comfy = ModuleType("comfy_api"), ModuleType("comfy")
    comfy_api.latest, comfy.samplers = latest, samplers
    for name, module in {"comfy_api": comfy_api, "comfy_api.latest": latest, "comfy": comfy, "comfy.samplers": samplers,
                         "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [m for m in sys.modules if m.startswith("fewstep.nodes.")]:
        monkeypatch.delitem(sys.modules, name)
    nodes = importlib.import_module("fewstep.nodes.nodes_sampling")
    yield SimpleNamespace(nodes=nodes, adapters=nodes.adapters, folders=folders)
    for name in [m for m in sys.modules if m.startswith("fewstep.nodes.")]:
        del sys.modules[name]


def _model(schedule=None):
    """A MODEL whose model_sampling holds SD's sigma table in float32, as ComfyUI's ModelSamplingDiscrete does."""
    sigmas = (schedule or DiscreteSchedule.stable_diffusion()).sigmas.float()
    return SimpleNamespace(get_model_object=lambda name: SimpleNamespace(sigmas=sigmas) if name == "model_sampling" else None)


def _reference_sigmas(scheduler, steps: int, **kwargs) -> torch.Tensor:
    scheduler.set_timesteps(steps, **kwargs)
    return scheduler.sigmas.float()


def test_every_node_builds_its_schema_with_a_tooltip_on_every_input(host):
    schemas = [node.define_schema() for node in host.nodes.NODES]
    ids = [s.node_id for s in schemas]
    assert len(set(ids)) == len(ids) and all(i.startswith("FewStep") for i in ids)
    for schema in schemas:
        assert schema.category == "sampling/fewstep" and schema.display_name.startswith("FewStep ") and schema.description
        for port in schema.inputs:
            assert port.options.get("tooltip"), f"{schema.node_id}.{port.id} has no tooltip"
    load = next(s for s in schemas if s.node_id == "FewStepLoadAdapter")
    assert [type(o).__qualname__ for o in load.outputs] == ["_Port"] * 4


def test_sigmas_node_trailing_equals_diffusers_euler_trailing(host):
    out = host.nodes.FewStepSigmas.execute(_model(), steps=4, spacing="trailing", timesteps="", denoise=1.0).args[0]
    ref = _reference_sigmas(EulerDiscreteScheduler(**sd_scheduler_config(), timestep_spacing="trailing"), 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)


def test_sigmas_node_partial_denoise_is_comfyuis_tail_of_a_longer_schedule(host):
    out = host.nodes.FewStepSigmas.execute(_model(), steps=4, spacing="trailing", timesteps="", denoise=0.5).args[0]
    ref = _reference_sigmas(EulerDiscreteScheduler(**sd_scheduler_config(), timestep_spacing="trailing"), 8)[-5:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)


def test_sigmas_node_lcm_and_explicit_timesteps(host):
    lcm = LCMScheduler(**sd_scheduler_config())
    lcm.set_timesteps(4)
    expected = DiscreteSchedule.stable_diffusion().sigmas_for_timesteps(lcm.timesteps.tolist())
    got = host.nodes.FewStepSigmas.execute(_model(), steps=4, spacing="lcm", timesteps="", denoise=1.0).args[0]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    explicit = host.nodes.FewStepSigmas.execute(_model(), steps=1, spacing="explicit", timesteps="999; 759, 499,259",
                                                denoise=1.0).args[0]
    torch.testing.assert_close(explicit, expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="whole numbers separated by commas"):
        host.nodes.FewStepSigmas.execute(_model(), steps=4, spacing="explicit", timesteps="999, high", denoise=1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        host.nodes.FewStepSigmas.execute(_model(), steps=4, spacing="explicit", timesteps="249, 999", denoise=1.0)


@pytest.mark.parametrize("name,expected", [("consistency", {"gamma": 0.3}), ("ddim", {"eta": 0.5}), ("dpmpp_2m", {}),
                                           ("stochastic", {}), ("onestep", {})])
def test_sampler_node_wraps_core_sampler_with_only_its_own_options(host, name, expected):
    sampler = host.nodes.FewStepSampler.execute(name, gamma=0.3, eta=0.5).args[0]
    assert sampler.fn is K.SAMPLERS[name] and sampler.extra_options == expected


class _Executor:
    """ComfyUI's WrapperExecutor as a wrapper sees it: calling it runs the model, class_obj is the BaseModel."""

    def __init__(self, output, model_sampling):
        self.output, self.class_obj = output, SimpleNamespace(model_sampling=model_sampling)

    def __call__(self, x, sigma, *args, **kwargs):
        return self.output


def test_consistency_boundary_wrapper_matches_lcm_scheduler(host):
    schedule = DiscreteSchedule.stable_diffusion()
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    timesteps = torch.tensor([999, 259, 1])
    sigma = schedule.sigmas[timesteps]
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
    out = host.adapters.consistency_boundary_wrapper(_Executor(x0, schedule), x, sigma, None, None)
    lcm = LCMScheduler(**sd_scheduler_config())
    for i, t in enumerate(timesteps.tolist()):
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        expected = c_out * x0[i] + c_skip * x[i] / (1 + sigma[i] ** 2).sqrt()   # x_t: the DDPM-scaled input
        torch.testing.assert_close(out[i], expected, rtol=1e-9, atol=1e-12)


def test_model_base_from_comfyuis_model_config_class(host):
    def model(*names):
        cls = None
        for name in names:  # each class derives from the one before, as ComfyUI's supported_models do
            cls = type(name, (cls,) if cls else (), {})
        return SimpleNamespace(model=SimpleNamespace(model_config=cls()))

    assert host.adapters.model_base(model("SD15", "SD15_instructpix2pix")) == "sd15"
    assert host.adapters.model_base(model("SDXL", "SSD1B")) == "sdxl"
    assert host.adapters.model_base(model("PixArtAlpha", "PixArtSigma")) == "pixart"
    with pytest.raises(AdapterFileError, match="this MODEL is Flux"):
        host.adapters.model_base(model("Flux"))


def _lora(rank=4, alpha=8.0):
    return {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(torch.randn(rank, 320), torch.randn(320, rank), alpha)}


def test_diffusers_layout_becomes_kohya_with_the_files_alpha(host, tmp_path):
    from fewstep.core.adapter_file import read_adapter

    path = host.folders["loras"] / "peft.safetensors"
    write_adapter(path, write_lora(_lora(), "diffusers"), AdapterMetadata(kind="flash_lora", base="sd15", extra={"alpha": 8.0}))
    kohya = host.adapters.kohya_state_dict(read_adapter(path))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert set(kohya) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert float(kohya[f"{name}.alpha"]) == 8.0
    already = read_adapter(_write_flash(host.folders["fewstep"] / "kohya.safetensors"))
    same = host.adapters.kohya_state_dict(already)
    assert same.keys() == already.tensors.keys() and all(same[k] is already.tensors[k] for k in same)   # not converted
    assert host.adapters.unmatched_unet_modules(kohya, {name: "diffusion_model.x"}) == []
    assert host.adapters.unmatched_unet_modules(kohya, {}) == [name]


def _write_flash(path, kind="flash_lora"):
    write_adapter(path, write_lora(_lora()), AdapterMetadata(kind=kind, base="sd15"))
    return path


def test_adapter_menus_list_safetensors_from_both_folders(host):
    _write_flash(host.folders["fewstep"] / "mine.safetensors")
    _write_flash(host.folders["loras"] / "lcm.safetensors")
    (host.folders["loras"] / "old.ckpt").write_bytes(b"pickle")   # never offered: loading never unpickles
    assert host.adapters.list_adapters() == ["mine.safetensors", "lcm.safetensors"]
    assert host.adapters.adapter_path("lcm.safetensors") == str(host.folders["loras"] / "lcm.safetensors")
    with pytest.raises(AdapterFileError, match="not found in models/fewstep or models/loras"):
        host.adapters.adapter_path("gone.safetensors")


def test_load_adapter_checks_base_and_kind(host, monkeypatch):
    path = str(_write_flash(host.folders["fewstep"] / "flash.safetensors"))
    assert host.adapters.load_adapter(path, "sd15") is host.adapters.load_adapter(path, "sd15")   # read once
    with pytest.raises(AdapterFileError, match="adapter is for sd15 .*but the model is sdxl"):
        host.adapters.load_adapter(path, "sdxl")
    snap = host.folders["fewstep"] / "snap.safetensors"
    with pytest.raises(AdapterFileError, match="a snap_student file .*its UNet's architecture"):
        write_adapter(snap, {"conv_in.weight": torch.zeros(320, 4, 3, 3)}, AdapterMetadata(kind="snap_student", base="sd15"))
    from fewstep.training.tiny_models import build_tiny_unet

    unet = build_tiny_unet("sd15")
    write_adapter(snap, unet.state_dict(), AdapterMetadata(kind="snap_student", base="sd15",
                                                           extra={"unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")}}))
    assert host.adapters.load_adapter(str(snap), "sd15").metadata.kind == "snap_student"
    monkeypatch.setattr(host.adapters, "SUPPORTED_KINDS", ("flash_lora", "sun_adapter"))   # as for a kind added later
    with pytest.raises(AdapterFileError, match="is a snap_student; these nodes load flash_lora and sun_adapter files so far"):
        host.adapters.load_adapter(str(snap.rename(snap.with_name("later.safetensors"))), "sd15")


SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, transformer_layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, mid_block_type="UNetMidBlock2DCrossAttn")
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))


def test_a_diffusers_config_becomes_the_unet_config_comfyui_gives_the_same_model(host):
    """ComfyUI's own SD1.5 and SDXL configs (comfy/supported_models.py after model_detection.convert_config), and a
    slim SD1.5 with a layer, an up level's cross-attention and the mid block removed."""
    from fewstep.core.unet_names import comfy_unet_config as convert
    assert convert({"context_dim": 768}, SD15_UNET) == {
        "context_dim": 768, "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
    sdxl = convert({}, SDXL_UNET)
    assert (sdxl["transformer_depth"], sdxl["transformer_depth_output"], sdxl["transformer_depth_middle"]) == \
        ([0, 0, 2, 2, 10, 10], [0, 0, 0, 2, 2, 2, 10, 10, 10], 10)
    slim = convert({}, {**SD15_UNET, "layers_per_block": [2, 1, 2, 2], "mid_block_type": None,
                        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]})
    assert slim == {"num_res_blocks": [2, 1, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 0, 0],
                    "transformer_depth_output": [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": -2}


def test_time_embed_offset_reproduces_diffusers_cond_proj(host):
    """ComfyUI's LDM UNet has no timestep_cond input: the node adds the w projection to the time MLP's input instead."""
    from fewstep.core.guidance import w_conditioning_offset
    from fewstep.training.diffusers_sampling import w_condition
    from fewstep.training.methods.guided import add_w_embedding
    from fewstep.training.tiny_models import build_tiny_unet

    unet = add_w_embedding(build_tiny_unet("sd15"), 256)
    embedding = unet.time_embedding
    torch.nn.init.normal_(embedding.cond_proj.weight, std=0.05)
    t_emb = unet.time_proj(torch.tensor([999, 500, 3])).float()
    ldm_style = torch.nn.Sequential(embedding.linear_1, torch.nn.SiLU(), embedding.linear_2)
    for w in (0.0, 2.5, 9.0):
        with torch.no_grad():
            expected = embedding(t_emb, w_condition(w, 256, t_emb, 3)["timestep_cond"])
            patched = TimeEmbedWithW(ldm_style, w_conditioning_offset(embedding.cond_proj.weight, w))(t_emb)
        torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-6)
    assert list(dict(TimeEmbedWithW(ldm_style, torch.zeros(1)).named_children())) == ["0", "1", "2"]


def test_sun_patch_keys_follow_comfyui_block_addresses(host):
    from fewstep.model_patcher.sun import patch_key

    assert patch_key("input_blocks.1.1.transformer_blocks.0.attn2") == ("input", 1, 0)
    assert patch_key("middle_block.1.transformer_blocks.3.attn2") == ("middle", 0, 3)   # never ("middle", 1)
    assert patch_key("output_blocks.11.1.transformer_blocks.0.attn2") == ("output", 11, 0)
    with pytest.raises(ValueError, match="not a UNet cross-attention layer"):
        patch_key("input_blocks.1.1.transformer_blocks.0.attn1")


def test_no_adapter_selected_says_where_to_put_one(host, monkeypatch):
    """A fresh install has no adapter files: the menu is empty and ComfyUI (it checks no combo values) hands the node
    None, on which folder_paths raised a bare TypeError."""
    for name in ("comfy.model_management", "comfy.sample", "comfy.utils", "latent_preview"):
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    model = SimpleNamespace(model=SimpleNamespace(model_config=type("SD15", (), {})()))
    for missing in (None, ""):
        with pytest.raises(AdapterFileError, match="^no adapter selected: put a .safetensors in models/fewstep or models/loras"):
            host.nodes.FewStepKSampler.execute(model, missing, 1.0, 0, 0, -1.0, 1.0, [], [], 1.0, {"samples": None}, 1.0)
        with pytest.raises(AdapterFileError, match="^no adapter selected"):
            host.nodes.FewStepLoadAdapter.execute(model, missing, 1.0, 0, -1.0)
    with pytest.raises(AdapterFileError, match="made-up.safetensors: not found in models/fewstep or models/loras"):
        host.nodes.FewStepLoadAdapter.execute(model, "made-up.safetensors", 1.0, 0, -1.0)


class _LcmModelSampling:
    """ComfyUI's ModelSamplingDiscreteDistilled (the ModelSamplingDiscrete node's lcm mode): LCM's 50 original
    timesteps 19, 39, ..., 999 and their sigmas, with its own timestep <-> sigma maps (comfy_extras/nodes_model_advanced.py)."""

    original_timesteps = 50

    def __init__(self):
        full = DiscreteSchedule.stable_diffusion().sigmas.float()
        self.skip_steps = len(full) // self.original_timesteps
        self.sigmas = torch.stack([full[len(full) - 1 - x * self.skip_steps] for x in range(self.original_timesteps)]).flip(0)
        self.log_sigmas = self.sigmas.log()

    def sigma(self, timestep):
        t = ((timestep.float() - (self.skip_steps - 1)) / self.skip_steps).clamp(0, len(self.sigmas) - 1)
        w = t.frac()
        return ((1 - w) * self.log_sigmas[t.floor().long()] + w * self.log_sigmas[t.ceil().long()]).exp()


def test_sigmas_after_an_lcm_model_sampling_come_from_its_own_timestep_map(host):
    """The stock LCM-LoRA chain puts ModelSamplingDiscrete (lcm) before the fewstep nodes: its table has 50 sigmas, and
    timestep 999 is its last entry, not index 999 (which raised IndexError)."""
    sampling = _LcmModelSampling()
    model = SimpleNamespace(get_model_object=lambda name: sampling if name == "model_sampling" else None)
    sd = DiscreteSchedule.stable_diffusion()
    lcm = host.nodes.FewStepSigmas.execute(model, steps=4, spacing="lcm", timesteps="", denoise=1.0).args[0]
    # LCM's grid (999, 759, 499, 259) lies on the 50 original timesteps: SD's own sigmas there.
    torch.testing.assert_close(lcm, sd.sigmas_for_timesteps([999, 759, 499, 259]), rtol=1e-5, atol=0)
    trailing = host.nodes.FewStepSigmas.execute(model, steps=4, spacing="trailing", timesteps="", denoise=0.5).args[0]
    chosen = torch.tensor([499, 374, 249, 124])   # trailing over 8 steps, the lower half: off the grid, as its sigma() says
    torch.testing.assert_close(trailing, torch.cat([sampling.sigma(chosen), torch.zeros(1)]), rtol=1e-6, atol=0)
    assert host.adapters.model_schedule(model).timestep(sampling.sigmas[-1]) == 999


def test_the_host_tests_skip_reason_names_what_to_set(monkeypatch, tmp_path):
    """From a checkout not beside shared/, the stubs' default path is absent: the reason must say which variable to set."""
    from .comfyui_host import comfyui

    for name in ("COMFYUI_PATH", "COMFYUI_STUBS", "COMFYUI_PYTHON"):
        monkeypatch.delenv(name, raising=False)
    assert all(v in comfyui() for v in ("COMFYUI_PATH", "COMFYUI_STUBS", "COMFYUI_PYTHON"))
    (tmp_path / "main.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    monkeypatch.setenv("COMFYUI_STUBS", str(tmp_path / "nowhere"))
    assert comfyui().startswith(f"COMFYUI_STUBS={tmp_path / 'nowhere'} is no folder") and "set COMFYUI_PATH" in comfyui()
