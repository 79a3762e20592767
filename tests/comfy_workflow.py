"""ComfyUI workflows in the UI format (the JSON the canvas saves and loads by drag-and-drop): a converter to the API
format that ``POST /prompt`` takes, and a builder that writes UI-format files from a compact description.

Both read a node's inputs from ``/object_info`` (``{type: {"input": {"required": {...}, "optional": {...}},
"output": [...], "output_name": [...]}}``): a UI node stores its widget values as one list, ``widgets_values``, in the
order of the node's widget inputs, and its linked inputs by name. Test and authoring tooling only: nothing here is on
the node pack's import path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def input_specs(object_info: dict, node_type: str) -> Iterator[tuple[str, Any, dict]]:
    """(name, type, options) of the node type's inputs, required first, in the order the UI creates them."""
    if node_type not in object_info:
        raise KeyError(f"node type {node_type!r} is not known to this ComfyUI (a missing custom node pack?)")
    info = object_info[node_type]
    order = info.get("input_order", {})   # newer ComfyUIs state the order; older ones rely on the JSON's key order
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        for name in order.get(group, list(specs)):
            spec = specs[name]
            yield name, spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})


def is_widget(input_type, options: dict) -> bool:
    """Combo lists and primitive types are widgets on the canvas, unless the node forces them to be sockets."""
    return (isinstance(input_type, list) or input_type in WIDGET_TYPES) and not options.get("forceInput")


def widget_slots(options: dict) -> int:
    """Values an input takes in ``widgets_values``: a seed's "control after generate" widget stores one more."""
    return 2 if options.get("control_after_generate") else 1


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow. Muted nodes (mode 2) are left out; bypassed ones (mode 4) are
    refused, since bypassing means rewiring."""
    links = {link[0]: link for link in workflow.get("links", [])}
    active = {node["id"] for node in workflow["nodes"] if node.get("mode", 0) != 2}
    prompt = {}
    for node in workflow["nodes"]:
        if node["id"] not in active:
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} ({node['type']}) is bypassed: unbypass or remove it")
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        position = 0
        upload = False
        for name, input_type, options in input_specs(object_info, node["type"]):
            upload |= bool(options.get("image_upload"))
            if is_widget(input_type, options):
                if position >= len(values):
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
                inputs[name] = values[position]
                position += widget_slots(options)
            if name in linked:
                _, source, slot, *_ = linked[name]
                if source not in active:
                    raise ValueError(f"node {node['id']} ({node['type']}): input {name!r} comes from muted node {source}")
                inputs[name] = [str(source), slot]
        extra = len(values) - position
        if extra and not (upload and extra == 1):   # an image upload button stores one value of its own, last
            raise ValueError(f"node {node['id']} ({node['type']}): {extra} widget values more than its inputs take")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@dataclass
class Node:
    id: int
    type: str
    column: int
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)   # input name -> (Node, output index)
    title: str | None = None


class WorkflowBuilder:
    """Nodes by type with widget values and links by input name; ``to_ui`` lays them out left to right by depth."""

    def __init__(self, object_info: dict):
        self.object_info, self.nodes = object_info, []

    def add(self, node_type: str, title: str | None = None, **values) -> Node:
        links = {k: v for k, v in values.items() if isinstance(v, tuple)}
        widgets = {k: v for k, v in values.items() if not isinstance(v, tuple)}
        column = 1 + max((source.column for source, _ in links.values()), default=-1)
        node = Node(len(self.nodes) + 1, node_type, column, widgets, links, title)
        self.nodes.append(node)
        return node

    def to_ui(self, groups: list[dict] | None = None) -> dict:
        ui_links, ui_nodes, rows = [], [], {}
        outputs: dict[tuple[int, int], list[int]] = {}
        for node in self.nodes:
            for name, (source, slot) in node.links.items():
                outputs.setdefault((source.id, slot), []).append(len(ui_links) + 1)
                ui_links.append([len(ui_links) + 1, source.id, slot, node.id, None, None, name])
        for order, node in enumerate(self.nodes):
            info = self.object_info[node.type]
            values, inputs, upload = [], [], False
            for name, input_type, options in input_specs(self.object_info, node.type):
                upload |= bool(options.get("image_upload"))
                if is_widget(input_type, options):
                    default = options.get("default", input_type[0] if isinstance(input_type, list) and input_type else None)
                    values.append(node.widgets.pop(name, default))
                    if options.get("control_after_generate"):
                        values.append("fixed")
                else:
                    link = next((link for link in ui_links if link[3] == node.id and link[6] == name), None)
                    if link is not None or name in info["input"].get("required", {}):
                        if link is not None:
                            link[4], link[5] = len(inputs), input_type
                        inputs.append({"name": name, "type": input_type, "link": None if link is None else link[0]})
            if upload:   # the upload button's own value, last, as the canvas stores it
                values.append("image")
            if node.widgets:
                raise ValueError(f"{node.type} has no widget inputs {sorted(node.widgets)}")
            row = rows.get(node.column, 0)
            height = 60 + 26 * (len(inputs) + len(values))
            rows[node.column] = row + height + 40
            names = info.get("output_name", info["output"])
            ui = {"id": node.id, "type": node.type, "pos": [40 + 360 * node.column, 40 + row], "size": [320, height],
                  "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                  "outputs": [{"name": n, "type": t, "links": outputs.get((node.id, i), []), "slot_index": i}
                              for i, (n, t) in enumerate(zip(names, info["output"]))],
                  "properties": {"Node name for S&R": node.type}, "widgets_values": values}
            if node.title:
                ui["title"] = node.title
            ui_nodes.append(ui)
        return {"last_node_id": len(self.nodes), "last_link_id": len(ui_links), "nodes": ui_nodes,
                "links": [link[:6] for link in ui_links], "groups": groups or [], "config": {},
                "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}
