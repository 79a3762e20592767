"""fewstep's ComfyUI nodes. Importing this package imports nothing from ComfyUI: ``extension.py`` does, when ComfyUI
calls the root ``comfy_entrypoint``; ``adapters.py`` imports ComfyUI's modules inside the functions that use them."""
