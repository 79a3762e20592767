"""Headless training and tooling: the `fewstep` CLI and the bindings to diffusers/peft/accelerate."""
