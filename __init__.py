"""fewstep: few-step diffusion for ComfyUI, A1111/Forge and a training CLI.

This file is ComfyUI's entry point for the custom-node folder and the root of the `fewstep`
package. It imports nothing heavy: the CLI, ComfyUI and A1111 each load only what they use.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point; the nodes (and ComfyUI's own modules) are imported only when ComfyUI asks."""
    from .nodes.extension import extension

    return extension()
