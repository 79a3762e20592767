"""Host-free diffusion math: schedules, samplers, guidance, LoRA keys and the adapter file.

Imports torch, safetensors and the standard library only, so ComfyUI, A1111 and training
all call the same code.
"""
