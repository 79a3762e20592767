"""The V3 extension that registers fewstep's nodes (the root ``comfy_entrypoint`` returns it)."""

from comfy_api.latest import ComfyExtension, io

from .adapters import register_model_folder
from .nodes_sampling import NODES


class FewStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


def extension() -> FewStepExtension:
    register_model_folder()
    return FewStepExtension()
