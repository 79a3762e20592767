"""The offline test models: the real CLIP tokenizer, and tiny SD1.5/SDXL pipelines that run and reload offline."""
import pytest
import torch

from fewstep.training.clip_tokenizer import VOCAB_SIZE, load_clip_tokenizer
from fewstep.training.tiny_models import build_tiny_pipeline


def test_clip_tokenizer_has_the_real_vocabulary():
    tok = load_clip_tokenizer()
    assert len(tok) == VOCAB_SIZE and tok.model_max_length == 77
    # Ids of OpenAI's CLIP tokenizer, as SD1.5's text encoder was trained on them.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a handwritten digit seven", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tok.pad_token_id == 49407


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_tiny_pipeline_generates_and_reloads_offline(base, tmp_path):
    pipe = build_tiny_pipeline(base, seed=0)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a silhouette of a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)
    pipe.save_pretrained(tmp_path / base)
    reloaded = type(pipe).from_pretrained(tmp_path / base, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert abs(again - image).max() < 1e-5
