"""`fewstep synth` and `--data-free`: the teacher writes a training set from prompts; killed runs resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fewstep.core.adapter_file import read_adapter
from fewstep.training import synth as S
from fewstep.training import synth_sets as sets
from fewstep.training.cli import main
from fewstep.training.data import PROXY_CLASSES, read_image_folder
from fewstep.training.teacher_data import load_teacher_data
from fewstep.training.pipelines import load_teacher
from fewstep.training.tiny_models import build_tiny_pipeline

PROMPTS = ["a handwritten digit three", "a silhouette of a cat", "a handwritten digit seven"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "tiny-sd15"
    build_tiny_pipeline("sd15", seed=0).save_pretrained(path)
    return path


def _settings(teacher, layout="images", count=7, **kw) -> sets.SynthSettings:
    return sets.SynthSettings(teacher=str(teacher), base="sd15", prompts="test", count=count, steps=2, cfg_scale=3.0,
                           layout=layout, **kw)


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("layout", ["images", "latents"])
def test_a_killed_run_resumes_without_duplicates_or_gaps(tiny_teacher, tmp_path, monkeypatch, layout):
    pipe = load_teacher(tiny_teacher)
    settings = _settings(tiny_teacher, layout)
    S.synthesize(pipe, settings, PROMPTS, tmp_path / "straight", batch_size=3, progress=False)

    writer = "_write_chunk" if layout == "latents" else "_write_images"
    real, calls = getattr(S, writer), []

    def dies_on_the_second_chunk(*args):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        real(*args)

    monkeypatch.setattr(S, writer, dies_on_the_second_chunk)
    with pytest.raises(Killed):
        S.synthesize(pipe, settings, PROMPTS, tmp_path / "killed", batch_size=3, progress=False)
    monkeypatch.setattr(S, writer, real)
    assert sets.done_indices(tmp_path / "killed") == {0, 1, 2}
    if layout == "images":   # a sample cut between its image and its caption counts as missing
        (tmp_path / "killed" / "000001.txt").unlink()
    report = S.synthesize(pipe, settings, PROMPTS, tmp_path / "killed", batch_size=2, progress=False)
    assert report["written"] == (5 if layout == "images" else 4) and report["count"] == 7
    assert sets.synth_cost(tmp_path / "killed")["samples"] == 3 + report["written"]   # the chunks written, redone ones too

    if layout == "images":
        straight, killed = read_image_folder(tmp_path / "straight"), read_image_folder(tmp_path / "killed")
        assert killed.captions == straight.captions == [PROMPTS[i % 3] for i in range(7)]
        assert np.abs(killed.images.astype(int) - straight.images.astype(int)).max() <= 1   # batched differently
        record = json.loads((tmp_path / "killed" / "000004.json").read_text())
        assert record == {"index": 4, "caption": PROMPTS[1], "seed": 4, "steps": 2, "cfg_scale": 3.0, "negative": "",
                          "teacher": str(tiny_teacher)}
    else:
        indices = [i for chunk in sorted((tmp_path / "killed").glob("latents-*.safetensors"))
                   for i in sets._chunk_metadata(chunk)["indices"]]
        assert sorted(indices) == list(range(7))   # each sample once
        straight, killed = sets.read_latent_set(tmp_path / "straight"), sets.read_latent_set(tmp_path / "killed")
        assert killed.captions == straight.captions == [PROMPTS[i % 3] for i in range(7)]
        torch.testing.assert_close(killed.latents, straight.latents, atol=1e-4, rtol=1e-4)   # batched differently


def test_a_latent_set_reads_back_as_training_data_without_the_vae(tiny_teacher, tmp_path):
    pipe = load_teacher(tiny_teacher)
    settings = _settings(tiny_teacher, "latents", count=5, seed=10)
    S.synthesize(pipe, settings, PROMPTS, tmp_path / "set", batch_size=2, progress=False)
    latents = torch.cat([load_file(str(p))["latents"] for p in sorted((tmp_path / "set").glob("latents-*.safetensors"))])
    expected = S.teacher_latents(pipe, [PROMPTS[i % 3] for i in range(5)], [10 + i for i in range(5)], 2, 3.0)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)   # sample i: prompt i, seed 10 + i (other batches)

    data = load_teacher_data(tiny_teacher, str(tmp_path / "set"))
    assert data.captions == [PROMPTS[i % 3] for i in range(5)] and not data.std.any()
    batch = data.batch_fn(4)(torch.Generator().manual_seed(0))
    rows = torch.randint(5, (4,), generator=torch.Generator().manual_seed(0))   # the batch's draw of samples
    torch.testing.assert_close(batch["latents"], latents[rows])   # the exact latents, scaled as the UNet sees them

    other = build_tiny_pipeline("sdxl", seed=0)
    other.save_pretrained(tmp_path / "tiny-sdxl")
    with pytest.raises(sets.SynthError, match="latents of a sd15 teacher"):
        load_teacher_data(tmp_path / "tiny-sdxl", str(tmp_path / "set"))


def test_an_unfinished_latent_set_and_changed_settings_are_refused(tiny_teacher, tmp_path):
    pipe = load_teacher(tiny_teacher)
    S.synthesize(pipe, _settings(tiny_teacher, "latents", count=3), PROMPTS, tmp_path / "set", progress=False)
    (tmp_path / "set" / sets.SETTINGS_FILE).write_text(json.dumps({**json.loads((tmp_path / "set" / sets.SETTINGS_FILE).read_text()),
                                                                "count": 5}))
    with pytest.raises(sets.SynthError, match="2 of 5 samples are not written yet"):
        sets.read_latent_set(tmp_path / "set")
    with pytest.raises(sets.SynthError, match=r"was written with steps 2 \(now 4\)"):
        S.synthesize(pipe, sets.SynthSettings(**{**_settings(tiny_teacher, "latents").__dict__, "steps": 4}), PROMPTS,
                     tmp_path / "set", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.png").write_bytes(b"")
    with pytest.raises(sets.SynthError, match="holds files but no fewstep_synth.json"):
        S.synthesize(pipe, _settings(tiny_teacher), PROMPTS, tmp_path / "other", progress=False)


def test_prompts_come_from_a_file_or_a_built_in_set(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red fox\n\n  a castle at dusk  \n")
    assert S.read_prompts(str(path)) == ["a red fox", "a castle at dusk"]
    assert S.read_prompts("proxy-classes") == list(PROXY_CLASSES)
    assert len(S.read_prompts("proxy")) > 10000
    with pytest.raises(sets.SynthError, match="not a built-in set"):
        S.read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(sets.SynthError, match="holds no prompts"):
        S.read_prompts(str(tmp_path / "empty.txt"))


def test_cli_synth_and_data_free_training(tiny_teacher, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main(["synth", "--teacher", str(tiny_teacher), "--prompts", str(prompts), "--n", "4", "--steps", "2",
                 "--out", str(tmp_path / "set")]) == 0
    assert "4 samples in" in capsys.readouterr().out and len(read_image_folder(tmp_path / "set")) == 4
    assert main(["synth", "--teacher", str(tiny_teacher), "--prompts", str(tmp_path / "nope.txt"), "--n", "4",
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a built-in set" in capsys.readouterr().err

    flash = ["train", "flash", "--teacher", str(tiny_teacher), "--run-dir", str(tmp_path / "run"), "--phase-steps", "1,1,1,1",
             "--batch-size", "2", "--lora-rank", "2", "--teacher-steps", "4", "--sample-every", "0"]
    assert main(flash + ["--data-free", str(prompts), "--data", "proxy"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(flash + ["--data-free", str(prompts), "--synth-count", "6", "--synth-steps", "2"]) == 0
    assert sets.read_latent_set(tmp_path / "run" / "synth").captions == [PROMPTS[i % 3] for i in range(6)]
    made = read_adapter(tmp_path / "run" / "flash_lora.safetensors").metadata.provenance
    assert made["images"] == 6 and made["synthesized"]["path"] == str(tmp_path / "run" / "synth")
    assert made["synthesized"]["prompts"] == str(prompts) and made["synthesized"]["layout"] == "latents"
    assert sets.synth_cost(tmp_path / "run" / "synth")["samples"] == 6
    options = json.loads((tmp_path / "run" / "training_options.json").read_text())
    assert options["synth"] == {"prompts": str(prompts), "count": 6, "steps": 2, "cfg_scale": 7.5}


def test_a_fine_tune_of_the_bundled_teacher_takes_its_cfg_default(tiny_teacher, tmp_path):
    from fewstep.training.bundled import BUNDLED_TEACHER
    from fewstep.training.evaluation import DEFAULT_CFG_SCALE
    from fewstep.training.cli.train import _synth_cfg

    child, grandchild, loop = tmp_path / "ft", tmp_path / "ft-of-ft", tmp_path / "loop"
    for folder, parent in ((child, BUNDLED_TEACHER), (grandchild, child), (loop, loop)):
        folder.mkdir()
        (folder / "fewstep_teacher.json").write_text(json.dumps({"finetuned_from": str(parent)}))
    assert DEFAULT_CFG_SCALE != 7.5
    assert _synth_cfg(None, BUNDLED_TEACHER) == _synth_cfg(None, child) == _synth_cfg(None, grandchild) == DEFAULT_CFG_SCALE
    assert _synth_cfg(None, tiny_teacher) == _synth_cfg(None, loop) == 7.5 and _synth_cfg(2.0, child) == 2.0


def test_two_processes_split_the_set_and_write_each_sample_once(tiny_teacher, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                           "fewstep.training.cli", "synth", "--teacher", str(tiny_teacher), "--prompts", "proxy-classes",
                           "--count", "9", "--steps", "2", "--batch-size", "2", "--latents", "--out", str(tmp_path / "set")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("9 samples in") == 1
    indices = [i for chunk in sorted((tmp_path / "set").glob("latents-*.safetensors")) for i in sets._chunk_metadata(chunk)["indices"]]
    assert sorted(indices) == list(range(9))
    # Each process wrote its own share: 5 chunks of at most 2, split 3/2, and no chunk twice.
    cost = [json.loads(line) for line in (tmp_path / "set" / sets.COST_LOG).read_text().splitlines()]
    assert sum(c["written"] for c in cost) == 9 and len(cost) == 5
    assert sets.read_latent_set(tmp_path / "set").captions == [PROXY_CLASSES[i] for i in range(9)]
