"""`fewstep train teacher` end to end on the tiny preset: a diffusers pipeline folder that loads like SD1.5."""
import json

import numpy as np
import torch

from fewstep.training.cli import main as cli
from fewstep.training.data import CaptionedImages, load_proxy_dataset
from fewstep.training.pipelines import load_teacher
from fewstep.training.teacher import sample_images, train_teacher


def _small_proxy(n=64):
    data = load_proxy_dataset("heldout")
    idx = np.linspace(0, len(data) - 1, n).astype(int)
    return CaptionedImages(data.images[idx], [data.captions[i] for i in idx], data.labels[idx], data.classes)


def test_tiny_teacher_trains_exports_and_samples(tmp_path):
    out = train_teacher(_small_proxy(), tmp_path / "run", tmp_path / "teacher", preset="tiny", vae_steps=3, unet_steps=3,
                        batch_size=8, checkpoint_every=2, sample_every=0, progress=False)
    assert (out / "model_index.json").is_file() and (out / "fewstep_teacher.json").is_file()
    assert (tmp_path / "run" / "samples" / "step-00000003.png").is_file()
    pipe = load_teacher(out)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.scaling_factor != 0.18215
    assert json.loads((out / "fewstep_teacher.json").read_text())["unet_steps"] == 3
    images = sample_images(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, ["a handwritten digit seven"], [0], steps=2)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    # The stock diffusers pipeline runs it too, as it would SD1.5.
    image = pipe("a silhouette of a cat", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_cli_dry_run_writes_the_configuration(tmp_path, capsys):
    assert cli(["train", "teacher", "--run-dir", str(tmp_path), "--unet-steps", "7", "--dry-run"]) == 0
    options = json.loads((tmp_path / "training_options.json").read_text())
    assert options["unet_steps"] == 7 and options["out"].endswith("pipeline") and options["mixed_precision"] == "no"
    assert not (tmp_path / "unet").exists()
