"""core/ must stay host-free, and `import fewstep` (ComfyUI's entry) must stay light."""
import ast
import subprocess
import sys
from pathlib import Path

# torch itself loads numpy and tqdm, so only host and training libraries are checked.
HOST_OR_HEAVY = ["comfy", "modules", "gradio", "diffusers", "peft", "accelerate", "transformers", ]


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(__import__("json").loads(out.strip().splitlines()[-1]))


CORE = Path(__file__).resolve().parents[1] / "core"


def _core_modules() -> list[str]:
    return sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")


def test_core_imports_no_host_or_training_library():
    modules = _core_modules()
    assert {"adapter_file", "lora", "samplers", "schedule", "unet_config"} <= set(modules)
    loaded = _loaded_after("import " + ", ".join(f"fewstep.core.{m}" for m in modules))
    assert loaded.isdisjoint(HOST_OR_HEAVY), sorted(loaded & set(HOST_OR_HEAVY))


def test_core_source_imports_only_torch_safetensors_and_the_standard_library():
    """Every import statement of every core module, those inside functions too, and no relative import out of core."""
    allowed = {"torch", "safetensors", "__future__"} | set(sys.stdlib_module_names)
    found = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names if a.name.split(".")[0] not in allowed]
            elif isinstance(node, ast.ImportFrom) and (node.level > 1 or node.level == 0 and node.module.split(".")[0] not in allowed):
                found.append((path.name, "." * node.level + (node.module or "")))
    assert found == []


def test_package_root_imports_nothing_heavy():
    loaded = _loaded_after("import fewstep")
    assert "torch" not in loaded and loaded.isdisjoint(HOST_OR_HEAVY)


def test_a1111_extension_imports_no_host_at_import_time():
    """The extension's modules import the WebUI inside functions, so their logic is tested without it."""
    loaded = _loaded_after("import fewstep.extension_a1111.host, fewstep.extension_a1111.run_config")
    assert loaded.isdisjoint(HOST_OR_HEAVY), sorted(loaded & set(HOST_OR_HEAVY))

