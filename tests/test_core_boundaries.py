"""core/ must stay host-free, and `import fewstep` (ComfyUI's entry) must stay light."""
import subprocess
import sys

# torch itself loads numpy and tqdm, so only host and training libraries are checked.
HOST_OR_HEAVY = ["comfy", "modules", "gradio", "diffusers", "peft", "accelerate", "transformers", ]


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(__import__("json").loads(out.strip().splitlines()[-1]))


def test_core_imports_no_host_or_training_library():
    loaded = _loaded_after(
        "import fewstep.core.schedule, fewstep.core.samplers, fewstep.core.guidance, fewstep.core.lora, "
        "fewstep.core.adapter_file, fewstep.core.parameterization, fewstep.core.base_models, fewstep.core.sun, "
        "fewstep.core.run_plan, fewstep.core.unet_names"
    )
    assert loaded.isdisjoint(HOST_OR_HEAVY), sorted(loaded & set(HOST_OR_HEAVY))


def test_package_root_imports_nothing_heavy():
    loaded = _loaded_after("import fewstep")
    assert "torch" not in loaded and loaded.isdisjoint(HOST_OR_HEAVY)


def test_a1111_extension_imports_no_host_at_import_time():
    """The extension's modules import the WebUI inside functions, so their logic is tested without it."""
    loaded = _loaded_after("import fewstep.extension_a1111.host, fewstep.extension_a1111.run_config")
    assert loaded.isdisjoint(HOST_OR_HEAVY), sorted(loaded & set(HOST_OR_HEAVY))

