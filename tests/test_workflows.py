"""The shipped ComfyUI workflows without ComfyUI: every node they use exists, each converts to an API prompt, the files
are what tests/workflow_specs.py makes, and the UI-to-API converter maps widget values as the canvas stores them.
tests/test_comfyui_nodes.py runs every workflow in a real ComfyUI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .comfy_workflow import WorkflowBuilder, ui_to_api
from .workflow_specs import OFFLINE, REACTOR, WORKFLOWS

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = json.loads((Path(__file__).parent / "data" / "comfyui_object_info.json").read_text())
FILES = sorted((REPO / "workflows").glob("*.json"))


def fewstep_node_ids() -> set[str]:
    return set(re.findall(r'node_id="(\w+)"', "".join(p.read_text() for p in (REPO / "nodes").glob("*.py"))))


def third_party_nodes() -> set[str]:
    """Node types the workflows README lists as coming from other packs (its table rows: | `Type` | pack | ...)."""
    return set(re.findall(r"^\| `(\w+)` \|", (REPO / "workflows" / "README.md").read_text(), re.M))


def test_every_workflow_is_shipped_with_an_image_and_a_readme_section():
    from PIL import Image

    assert {p.stem for p in FILES} == set(WORKFLOWS)
    readme = (REPO / "workflows" / "README.md").read_text()
    for path in FILES:
        assert f"`{path.name}`" in readme, f"workflows/README.md does not describe {path.name}"
    for name in OFFLINE:   # the PNG carries its workflow, as ComfyUI writes it, and dropping it loads the graph
        png = Image.open(REPO / "workflows" / f"{name}.png")
        assert json.loads(png.info["workflow"]) == json.loads((REPO / "workflows" / f"{name}.json").read_text())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_node_is_core_fewstep_or_listed(path):
    known = set(SNAPSHOT["core_node_types"]) | fewstep_node_ids() | third_party_nodes()
    unknown = {n["type"] for n in json.loads(path.read_text())["nodes"]} - known
    assert not unknown, f"{path.name} uses nodes from nowhere: {sorted(unknown)}"
    assert fewstep_node_ids() >= {t for t in SNAPSHOT["object_info"] if t.startswith("FewStep")}


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_files_are_what_the_specs_make_and_convert(name):
    """A changed spec or node must be written out again (python -m tests.workflow_specs OBJECT_INFO workflows)."""
    object_info = {**SNAPSHOT["object_info"], **REACTOR}
    builder = WorkflowBuilder(object_info)
    WORKFLOWS[name](builder)
    shipped = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    assert builder.to_ui() == shipped
    prompt = ui_to_api(shipped, object_info)
    assert len(prompt) == len(shipped["nodes"]) and any(n["class_type"] == "SaveImage" for n in prompt.values())


# --- the converter, on node definitions written out here ---------------------------------------------------------

INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}}, "output": ["MODEL"]},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "cfg": ["FLOAT", {"default": 1.0}], "mode": ["COMBO", {"options": ["x", "y"]}]},
                          "optional": {"mask": ["MASK", {}], "steps": ["INT", {"forceInput": True}]}},
                "output": ["LATENT"]},
    "LoadImage": {"input": {"required": {"image": [["i.png"], {"image_upload": True}]}}, "output": ["IMAGE", "MASK"]},
}


def _ui(nodes, links=()):
    return {"nodes": nodes, "links": [list(link) for link in links]}


def test_widget_values_map_to_inputs_past_the_seed_control_and_upload_widgets():
    ui = _ui([{"id": 1, "type": "Loader", "widgets_values": ["b.safetensors"], "inputs": []},
              {"id": 2, "type": "LoadImage", "widgets_values": ["i.png", "image"], "inputs": []},
              {"id": 3, "type": "Sampler", "widgets_values": [7, "randomize", 2.5, "y"],
               "inputs": [{"name": "model", "link": 10}, {"name": "mask", "link": 11}, {"name": "steps", "link": None}]}],
             [(10, 1, 0, 3, 0, "MODEL"), (11, 2, 1, 3, 1, "MASK")])
    assert ui_to_api(ui, INFO) == {
        "1": {"class_type": "Loader", "inputs": {"name": "b.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "i.png"}},
        "3": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 7, "cfg": 2.5, "mode": "y", "mask": ["2", 1]}}}


def test_a_widget_turned_into_a_linked_input_takes_the_link():
    ui = _ui([{"id": 1, "type": "Loader", "widgets_values": ["a.safetensors"]},
              {"id": 4, "type": "Sampler", "widgets_values": [7, "fixed", 2.5, "x"],
               "inputs": [{"name": "model", "link": 1}, {"name": "cfg", "link": 2, "widget": {"name": "cfg"}}]},
              {"id": 5, "type": "Sampler", "widgets_values": [1, "fixed", 1.0, "x"], "inputs": [{"name": "model", "link": 3}]}],
             [(1, 1, 0, 4, 0, "MODEL"), (2, 5, 0, 4, 1, "FLOAT"), (3, 1, 0, 5, 0, "MODEL")])
    assert ui_to_api(ui, INFO)["4"]["inputs"]["cfg"] == ["5", 0]


def test_muted_nodes_are_left_out_and_bad_files_are_refused():
    loader = {"id": 1, "type": "Loader", "widgets_values": ["a.safetensors"]}
    assert ui_to_api(_ui([loader, {**loader, "id": 2, "mode": 2}]), INFO).keys() == {"1"}
    with pytest.raises(ValueError, match="bypassed"):
        ui_to_api(_ui([{**loader, "mode": 4}]), INFO)
    with pytest.raises(ValueError, match="no widget value for 'name'"):
        ui_to_api(_ui([{**loader, "widgets_values": []}]), INFO)
    with pytest.raises(ValueError, match="1 widget values more"):
        ui_to_api(_ui([{**loader, "widgets_values": ["a.safetensors", 3]}]), INFO)
    with pytest.raises(KeyError, match="missing custom node pack"):
        ui_to_api(_ui([{**loader, "type": "Unknown"}]), INFO)
    sampler = {"id": 3, "type": "Sampler", "widgets_values": [1, "fixed", 1.0, "x"], "inputs": [{"name": "model", "link": 9}]}
    with pytest.raises(ValueError, match="muted node 2"):
        ui_to_api(_ui([loader, {**loader, "id": 2, "mode": 2}, sampler], [(9, 2, 0, 3, 0, "MODEL")]), INFO)


def test_the_builder_writes_what_the_converter_reads_back():
    wf = WorkflowBuilder(INFO)
    loader = wf.add("Loader", name="b.safetensors")
    image = wf.add("LoadImage", image="i.png")
    wf.add("Sampler", model=(loader, 0), seed=3, mode="y", mask=(image, 1))
    ui = wf.to_ui()
    sampler = ui["nodes"][2]
    assert sampler["widgets_values"] == [3, "fixed", 1.0, "y"] and ui["nodes"][1]["widgets_values"] == ["i.png", "image"]
    assert [i["name"] for i in sampler["inputs"]] == ["model", "mask"]   # an unlinked optional socket is not listed
    assert ui_to_api(ui, INFO)["3"]["inputs"] == {"model": ["1", 0], "seed": 3, "cfg": 1.0, "mode": "y", "mask": ["2", 1]}
    assert ui["links"] == [[1, 1, 0, 3, 0, "MODEL"], [2, 2, 1, 3, 1, "MASK"]]
