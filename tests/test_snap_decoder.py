"""SnapFusion's pruned decoder: at full width it is the VAE's own decoder (diffusers' decode is the reference), pruned it
keeps shapes and learns the original's output on teacher latents; the file round-trips."""

from __future__ import annotations

import pytest
import torch

from fewstep.training.methods import snap_decoder as D
from fewstep.training.tiny_models import build_tiny_pipeline


@pytest.fixture(scope="module")
def vae():
    return build_tiny_pipeline("sd15", seed=0).vae.eval()


def _latents(vae, n=4):
    return torch.randn(n, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))


def test_unpruned_it_is_the_vaes_decoder_and_pruned_it_keeps_the_image_shape(vae):
    z = _latents(vae)
    with torch.no_grad():
        reference = vae.decode(z).sample
        torch.testing.assert_close(D.prune_decoder(vae, 1.0)(z), reference)
        half = D.prune_decoder(vae, 0.5)
        assert half(z).shape == reference.shape
    groups = vae.config.norm_num_groups
    assert half.config["block_out_channels"] == [max(groups, groups * round(w * 0.5 / groups)) for w in vae.config.block_out_channels]
    assert sum(p.numel() for p in half.decoder.parameters()) < sum(p.numel() for p in vae.decoder.parameters())
    assert set(half.state_dict()) <= set(vae.state_dict())   # AutoencoderKL's own key names
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        D.prune_decoder(vae, 0.0)


def test_the_decoder_distillation_loss_falls_and_the_file_round_trips(tmp_path):
    from fewstep.training.loop import training_loop

    vae = build_tiny_pipeline("sd15", seed=0).vae.eval()
    model = D.DecoderDistillation(vae, D.DecoderConfig(keep=0.5))
    batch = {"latents": _latents(vae, 8)}
    before = model(batch, torch.Generator())["loss"].mean()
    trained = training_loop(tmp_path / "run", model, lambda m, b, g: m(b, g), lambda g: batch, 40, lr=3e-3, ema_decay=None,
                            progress=False, checkpoint_every=100)
    after = model(batch, torch.Generator())["loss"].mean()
    assert after < 0.5 * before
    assert all(not p.requires_grad for p in trained.vae.parameters())
    D.write_decoder(trained.student, tmp_path / "decoder.safetensors", {"method": "test"})
    loaded = D.read_decoder(tmp_path / "decoder.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["latents"]), trained.student(batch["latents"]).float(), rtol=1e-2, atol=1e-2)


def test_snap_decoder_writes_a_file_that_snap_distill_ships_and_the_student_decodes_with(tmp_path, capsys):
    from fewstep.core.adapter_file import read_adapter
    from fewstep.training.cli import main
    from fewstep.training.pipelines import load_teacher
    from fewstep.core.adapter_file import SNAP_DECODER_PREFIX as DECODER_PREFIX
    from fewstep.training.students import SnapStudent

    teacher = tmp_path / "teacher"
    build_tiny_pipeline("sd15", seed=0).save_pretrained(teacher)
    decoder = tmp_path / "decoder.safetensors"
    assert main(["snap", "decoder", "--teacher", str(teacher), "--run-dir", str(tmp_path / "dec"), "--out", str(decoder),
                 "--latents", "6", "--latent-steps", "2", "--steps", "3", "--batch-size", "4", "--keep", "0.5"]) == 0
    assert "pruned decoder written to" in capsys.readouterr().out
    assert main(["snap", "distill", "--teacher", str(teacher), "--run-dir", str(tmp_path / "distill"), "--start-steps", "4",
                 "--target-steps", "2", "--round-steps", "2", "--batch-size", "2", "--sample-every", "0",
                 "--decoder", str(decoder)]) == 0
    student_file = tmp_path / "distill" / "snap_student.safetensors"
    adapter = read_adapter(student_file)
    pruned = D.read_decoder(decoder)
    assert adapter.metadata.extra["decoder_config"] == pruned.config
    assert {k[len(DECODER_PREFIX):] for k in adapter.tensors if k.startswith(DECODER_PREFIX)} == set(pruned.state_dict())
    student = SnapStudent(load_teacher(teacher), student_file)
    z = _latents(student.pipe.vae, 2)
    with torch.no_grad():
        torch.testing.assert_close(student.decode(z), pruned(z), rtol=1e-3, atol=1e-3)
    assert student.images(["a cat"], [0]).shape[0] == 1
