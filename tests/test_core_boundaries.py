"""The layers (docs/architecture.md), checked on every module's imports, those inside functions too: core imports
only torch, safetensors and the standard library; the hosts never import each other nor the training code; the shared
training layer never imports a method, nor a method the commands above it; no import cycle anywhere. Modules are
found, not listed, so a new one is covered without editing this file. ``import fewstep`` (ComfyUI's entry) and the
hosts' modules stay light at import time."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "model_patcher", "nodes", "extension_a1111", "training")
# torch itself loads numpy and tqdm, so only host and training libraries are checked.
HOST_OR_HEAVY = ["comfy", "modules", "gradio", "diffusers", "peft", "accelerate", "transformers"]
# Who may import whom, by layer ("" is the package root, ComfyUI's entry point).
MAY_IMPORT = {
    "": {"nodes"},
    "core": set(),
    "model_patcher": {"core"},
    "nodes": {"core", "model_patcher"},
    "extension_a1111": {"core", "model_patcher"},
    "training": {"", "core"},
}
COMMANDS = ("fewstep.training.cli", "fewstep.training.quickstart", "fewstep.training.bench")   # above the methods


def is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def project_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package."""
    modules = {"fewstep": ROOT / "__init__.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = ("fewstep",) + path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules, outside top-level packages) that the module's import statements name, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    project, outside = set(), set()

    def add(target: str) -> None:
        if target.split(".")[0] != "fewstep":
            outside.add(target.split(".")[0])
            return
        while target not in modules:   # a name inside a module: the module
            target = target.rsplit(".", 1)[0]
        if target != name:
            project.add(target)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
            else:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
    return project, outside - {"__future__"}


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = project_modules()
    graph, outside = {}, {}
    for name, path in modules.items():
        graph[name], outside[name] = imports_of(name, path, modules)
    return graph, outside


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer(target) != layer(name) and layer(target) not in MAY_IMPORT[layer(name)]:
                found.append(f"{name} imports {target}")
            in_methods = name.startswith("fewstep.training.methods")
            if target.startswith("fewstep.training.methods") and not in_methods and not is_command(name):
                found.append(f"{name} (the shared training layer) imports the method {target}")
            if in_methods and is_command(target):
                found.append(f"the method {name} imports the command module {target}")
    return found


def test_every_module_is_found():
    modules = project_modules()
    assert {"fewstep.core.adapter_file", "fewstep.model_patcher.sun", "fewstep.nodes.adapters",
            "fewstep.extension_a1111.host", "fewstep.extension_a1111.scripts.fewstep_a1111",
            "fewstep.training.cli", "fewstep.training.cli.train", "fewstep.training.methods.flash"} <= set(modules)


def test_no_import_cycle():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_every_layer_imports_only_the_layers_below_it():
    graph, _ = import_graph()
    assert layer_violations(graph) == []


def test_the_checks_fail_on_a_cycle_and_on_each_kind_of_layer_violation():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    violations = layer_violations({
        "fewstep.nodes.adapters": {"fewstep.extension_a1111.host", "fewstep.training.students", "fewstep.core.lora"},
        "fewstep.extension_a1111.forge": {"fewstep.nodes.sun", "fewstep.model_patcher.sun"},
        "fewstep.core.lora": {"fewstep.training.export"},
        "fewstep.training.students": {"fewstep.training.methods.snap_decoder", "fewstep.nodes.adapters"},
        "fewstep.training.methods.snapfusion": {"fewstep.training.bench", "fewstep.training.evaluation"},
        "fewstep.training.cli.train": {"fewstep.training.methods.flash"},
        "fewstep.training.methods.flash": {"fewstep.training.cli.arguments"},
    })
    assert violations == [
        "fewstep.core.lora imports fewstep.training.export",
        "fewstep.extension_a1111.forge imports fewstep.nodes.sun",
        "fewstep.nodes.adapters imports fewstep.extension_a1111.host",
        "fewstep.nodes.adapters imports fewstep.training.students",
        "the method fewstep.training.methods.flash imports the command module fewstep.training.cli.arguments",
        "the method fewstep.training.methods.snapfusion imports the command module fewstep.training.bench",
        "fewstep.training.students imports fewstep.nodes.adapters",
        "fewstep.training.students (the shared training layer) imports the method fewstep.training.methods.snap_decoder",
    ]


def test_core_source_imports_only_torch_safetensors_and_the_standard_library():
    allowed = {"torch", "safetensors"} | set(sys.stdlib_module_names)
    _, outside = import_graph()
    found = {name: sorted(libraries - allowed) for name, libraries in outside.items()
             if layer(name) == "core" and libraries - allowed}
    assert found == {}


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(__import__("json").loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", ["core", "model_patcher"])
def test_core_and_the_patcher_layer_import_no_host_or_training_library(package):
    modules = [m for m in project_modules() if layer(m) == package]
    loaded = _loaded_after("import " + ", ".join(modules))
    assert loaded.isdisjoint(HOST_OR_HEAVY), sorted(loaded & set(HOST_OR_HEAVY))


def test_package_root_imports_nothing_heavy():
    loaded = _loaded_after("import fewstep")
    assert "torch" not in loaded and loaded.isdisjoint(HOST_OR_HEAVY)


def test_the_hosts_modules_import_no_host_at_import_time():
    """The extension's and the nodes' logic modules import their host inside functions, so they are tested without it
    (only the host-facing entry files, the A1111 script and ComfyUI's extension and node classes, import it at the top)."""
    entries = {"fewstep.extension_a1111.scripts.fewstep_a1111", "fewstep.nodes.extension", "fewstep.nodes.nodes_sampling"}
    modules = [m for m in project_modules() if layer(m) in ("nodes", "extension_a1111") and m not in entries
               and not m.endswith("install")]
    loaded = _loaded_after("import " + ", ".join(modules))
    assert loaded.isdisjoint(HOST_OR_HEAVY), sorted(loaded & set(HOST_OR_HEAVY))
