"""Run by the WebUI at start-up. fewstep needs nothing the WebUI lacks (torch, safetensors, numpy): it installs
nothing, and never touches torch, whose CUDA build the WebUI chose."""
