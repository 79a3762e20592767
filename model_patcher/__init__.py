"""Code for hosts built on ComfyUI's ModelPatcher (ComfyUI, and Forge, whose patcher is a port of it): what both
put on a patcher the same way. It imports core only, never a host; the host modules (``nodes/``,
``extension_a1111/forge.py``) bring their own attention function and name mapping."""
