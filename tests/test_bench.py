"""`fewstep bench` / `eval` plumbing on a tiny teacher: fixed prompts and seeds, metrics keys, grids, tables."""
import json
from pathlib import Path

import numpy as np
import pytest

from fewstep.training import bench, bundled, evaluation
from fewstep.training.cli.measure import BENCH_SET_NAMES
from fewstep.training.data import PROXY_CLASSES
from fewstep.training.pipelines import load_teacher
from fewstep.training.teacher import train_teacher

from .test_teacher import _small_proxy


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return train_teacher(_small_proxy(), root / "run", root / "pipe", preset="tiny", vae_steps=2, unet_steps=2,
                         batch_size=8, sample_every=0, progress=False)


def test_prompt_set_is_fixed():
    prompts = evaluation.prompt_set(3)
    assert len(prompts.captions) == 60 and prompts.captions[:3] == [PROXY_CLASSES[0]] * 3 and prompts.seeds[:4] == [0, 1, 2, 0]
    again = evaluation.prompt_set(3)
    assert again.captions == prompts.captions and np.array_equal(again.labels, prompts.labels) and again.seeds == prompts.seeds


def test_entries_count_guided_passes_and_every_set_holds_both_teacher_baselines():
    assert evaluation.TeacherEntry(50).nfe == 100 and evaluation.TeacherEntry(4, cfg_scale=1.0).nfe == 4
    assert [(e.steps, e.cfg_scale) for e in bench.BENCH_SETS["teacher"].entries] == [
        (50, 4.0), (50, evaluation.BEST_CFG_SCALE), (25, 4.0), (8, 4.0), (4, 4.0), (2, 4.0)]
    for name, bench_set in bench.BENCH_SETS.items():
        assert bench_set.baselines and set(bench_set.baselines) <= set(bench_set.entries), name
    assert set(BENCH_SET_NAMES) == set(bench.BENCH_SETS)
    assert evaluation.BEST_CFG_SCALE in bench.CFG_SWEEP


def test_evaluate_entry_is_deterministic_and_writes_a_grid(tiny_teacher, tmp_path):
    pipe = load_teacher(tiny_teacher)
    entry = evaluation.TeacherEntry(2)
    a = evaluation.evaluate_entry(pipe, entry, per_class=2, batch_size=16, grid_path=tmp_path / "g.png")
    b = evaluation.evaluate_entry(pipe, entry, per_class=2, batch_size=40)
    for name in ("fid", "fid_classifier", "class_fid", "precision", "recall"):
        assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
        low, high = a["intervals"][name]
        assert low <= a[name] <= high, name
    assert a["prompt_accuracy"] == b["prompt_accuracy"] and a["split"] == "validation" and a["samples"] == 40
    assert a["nfe"] == 4 and 0 <= a["prompt_accuracy"] <= 1 and a["seconds_per_image"] > 0
    test = evaluation.evaluate_entry(pipe, entry, per_class=2, batch_size=40, split="test", resamples=0)
    assert test["fid"] != a["fid"] and "intervals" not in test   # other seeds; no bootstrap asked for
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (32 * 20, 32 * 2)


def test_run_bench_writes_json_markdown_and_grids(tiny_teacher, tmp_path, monkeypatch):
    baseline = evaluation.TeacherEntry(2)
    monkeypatch.setitem(bench.BENCH_SETS, "smoke", bench.BenchSet((baseline, evaluation.TeacherEntry(1)), (baseline,)))
    samples, pipe = {}, load_teacher(tiny_teacher)
    doc = bench.run_bench("smoke", tiny_teacher, per_class=2, batch_size=20, out_dir=tmp_path, progress=False, seed_sets=2,
                          resamples=20, samples=samples, pipe=pipe)
    assert json.loads((tmp_path / "smoke.json").read_text()) == doc
    assert doc["split"] == "test" and doc["baselines"] == ["teacher-2steps-cfg4"] and doc["samples_per_configuration"] == 80
    table = (tmp_path / "smoke.md").read_text()
    assert "teacher-2steps-cfg4" in table and "teacher-1steps-cfg4" in table and "*uniform noise*" in table and " ± " in table
    one_step = doc["results"][1]
    assert set(one_step["vs"]["teacher-2steps-cfg4"]) == set(evaluation.PROXY.scores) and len(one_step["per_seed_set"]["fid"]) == 2
    assert doc["sanity"]["real_train_images"]["fid"] < doc["sanity"]["uniform_noise"]["fid"]
    assert sorted(p.name for p in (tmp_path / "smoke-grids").iterdir()) == ["teacher-1steps-cfg4.png", "teacher-2steps-cfg4.png"]
    # A second set run with the same samples cache samples nothing again; a validation run writes files of its own.
    monkeypatch.setattr(evaluation.TeacherEntry, "generate", lambda *a, **k: pytest.fail("sampled again"))
    again = bench.run_bench("smoke", tiny_teacher, per_class=2, batch_size=20, out_dir=tmp_path / "again", progress=False,
                            seed_sets=2, resamples=20, samples=samples, pipe=pipe)
    assert [r["fid"] for r in again["results"]] == [r["fid"] for r in doc["results"]]
    # A rerun into the same folder reuses the rows it saved (a stopped bench continues); other options, another
    # teacher file or --no-resume score anew.
    rerun = dict(per_class=2, batch_size=20, out_dir=tmp_path, progress=False, seed_sets=2, resamples=20, pipe=pipe)
    assert bench.run_bench("smoke", tiny_teacher, **rerun)["results"] == doc["results"]
    for changed in ({"resamples": 10}, {"resume": False}):
        with pytest.raises(pytest.fail.Exception, match="sampled again"):
            bench.run_bench("smoke", tiny_teacher, **{**rerun, **changed})
    (Path(tiny_teacher) / "model_index.json").write_text((Path(tiny_teacher) / "model_index.json").read_text() + " ")
    with pytest.raises(pytest.fail.Exception, match="sampled again"):
        bench.run_bench("smoke", tiny_teacher, **rerun)
    with pytest.raises(pytest.fail.Exception, match="sampled again"):
        bench.run_bench("smoke", tiny_teacher, per_class=2, out_dir=tmp_path, progress=False, split="validation", samples=samples,
                        pipe=pipe)
    with pytest.raises(ValueError, match="unknown bench set"):
        bench.run_bench("nope", tiny_teacher, out_dir=tmp_path)


@pytest.mark.skipif(not (bundled.BUNDLED_TEACHER / "model_index.json").is_file(), reason="the bundled teacher is not in this checkout")
def test_quickstart_runs_on_the_bundled_teacher(tmp_path, capsys):
    from fewstep.training.cli import main as cli

    assert cli(["quickstart", "--out-dir", str(tmp_path), "--per-class", "2", "--student-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "teacher-25steps-cfg4" in out and "teacher-4steps-cfg4" in out and "flash-quickstart-4steps" in out
    from PIL import Image

    rows = 4 if bundled.BUNDLED_FLASH.is_file() else 3
    assert Image.open(tmp_path / "grid.png").size == (32 * 20 * 3, 32 * rows * 3)
    assert (tmp_path / "metrics.md").read_text().count("flash-") == rows - 2
    assert (tmp_path / "flash_lora.safetensors").is_file()


def test_eval_scores_a_model_and_a_folder_of_images(tiny_teacher, tmp_path, capsys):
    import json as _json

    from PIL import Image

    from fewstep.training.cli import main as cli
    from fewstep.training.data import load_proxy_dataset

    assert cli(["eval", "--teacher", str(tiny_teacher), "--steps", "2", "--per-class", "1", "--json"]) == 0
    model = _json.loads(capsys.readouterr().out)
    assert model["nfe"] == 4 and model["fid"] > 0
    real = load_proxy_dataset("heldout")
    for i in range(0, 1500, 75):  # 20 real held-out images, one per class
        Image.fromarray(real.images[i]).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(real.captions[i])
    assert cli(["eval", "--images", str(tmp_path), "--json"]) == 0
    folder = _json.loads(capsys.readouterr().out)
    assert folder["images"] == 20 and folder["prompt_accuracy"] >= 0.9 and folder["fid"] < model["fid"]


def test_the_snapfusion_set_routes_each_student_file_and_times_unets_and_decoders(tiny_teacher, tmp_path, monkeypatch):
    from fewstep.core.adapter_file import describe, read_header
    from fewstep.training.methods.snap_architecture import SlimArchitecture, build_slim_unet
    from fewstep.training.pruned_decoder import prune_decoder
    from fewstep.training.methods.snapfusion import export_snap_student

    pipe = load_teacher(tiny_teacher)
    full = SlimArchitecture.of_teacher(pipe.unet.config)
    slim = SlimArchitecture(full.down_layers, full.up_layers, full.down_attention, full.up_attention, mid=False)
    files = {"slim": tmp_path / "slim.safetensors", "nocfg": tmp_path / "nocfg.safetensors"}
    export_snap_student(build_slim_unet(pipe.unet, slim), files["slim"], "sd15", "epsilon", 8, 4.0,
                        {"config": {"cfg_probability": 0.1}}, slim, slim=True, decoder=prune_decoder(pipe.vae, 0.5))
    export_snap_student(pipe.unet, files["nocfg"], "sd15", "epsilon", 8, 4.0, {"config": {"cfg_probability": 0.0}})
    labels = {name: bench.bench_label(describe(read_header(path), path.name)[0]) for name, path in files.items()}
    assert labels == {"slim": "snap_slim", "nocfg": "snap_nocfg"}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks": [{"block": "mid_block.attentions.0"}]}))
    monkeypatch.setitem(bench.BENCH_SETS, "snapfusion",
                        bench.BenchSet((evaluation.TeacherEntry(2), *[bench._snap(label) for label in bench.SNAP_LABELS])))
    doc = bench.run_bench("snapfusion", tiny_teacher, per_class=1, batch_size=20, out_dir=tmp_path / "out", progress=False,
                          adapter=[str(files["slim"]), str(files["nocfg"])], plan=plan)
    names = [r["name"] for r in doc["results"]]
    assert names == ["teacher-2steps-cfg4", "snap_nocfg-8steps-cfg4", "snap_slim-8steps-cfg4"]   # no full-size file given
    assert [r["nfe"] for r in doc["results"]] == [4, 16, 16]
    assert set(doc["latency"]["unet"]) == {"teacher", "snap_nocfg-8steps-cfg4", "snap_slim-8steps-cfg4"}
    assert set(doc["latency"]["decoder"]) == {"teacher", "snap_slim-8steps-cfg4"}
    assert doc["latency"]["unet"]["teacher"]["ratio_to_teacher"] == 1.0
    assert doc["block_table"]["blocks"] == [{"block": "mid_block.attentions.0"}]
    assert "per-pass latency" in (tmp_path / "out" / "snapfusion.md").read_text()


def test_the_data_free_set_puts_the_synthesized_data_student_beside_the_real_data_one(tiny_teacher, tmp_path, monkeypatch):
    """A Flash file whose provenance says its data was synthesized takes the flash_synth rows; the document carries
    what synthesizing that set cost, from the set's own log."""
    import torch

    from fewstep.core.adapter_file import AdapterMetadata, describe, read_header, write_adapter
    from fewstep.core.lora import LoraModule, write_lora

    pipe = load_teacher(tiny_teacher)
    name = next(n for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    out_features, in_features = pipe.unet.get_submodule(name).weight.shape
    lora = write_lora({name: LoraModule(torch.zeros(2, in_features), torch.zeros(out_features, 2), 2.0)})
    synth_dir = tmp_path / "synth"
    synth_dir.mkdir()
    (synth_dir / "synth_log.jsonl").write_text(json.dumps({"written": 30, "seconds": 6.0, "device": "cpu"}) + "\n"
                                               + json.dumps({"written": 10, "seconds": 2.0, "device": "cpu"}) + "\n")
    settings = {"teacher": str(tiny_teacher), "base": "sd15", "prompts": "proxy", "count": 40, "steps": 2, "cfg_scale": 4.0,
                "negative": "", "seed": 0, "layout": "latents", "path": str(synth_dir)}
    files = {}
    for label, made in (("real", {"images": 100}), ("synth", {"images": 40, "synthesized": settings})):
        files[label] = tmp_path / f"{label}.safetensors"
        write_adapter(files[label], lora, AdapterMetadata(kind="flash_lora", base="sd15", timesteps=[999, 749, 499, 249],
                                                          provenance={"method": "flash", **made}))
    assert [bench.bench_label(describe(read_header(p), p.name)[0]) for p in files.values()] == ["flash", "flash_synth"]
    monkeypatch.setitem(bench.BENCH_SETS, "data_free", bench.BenchSet((
        evaluation.TeacherEntry(2), evaluation.StudentEntry(2, adapter=str(files["real"])),
        evaluation.StudentEntry(2, label="flash_synth", adapter=None))))
    doc = bench.run_bench("data_free", tiny_teacher, per_class=1, batch_size=20, out_dir=tmp_path / "out", progress=False,
                          adapter=[str(files["synth"])])
    assert [r["name"] for r in doc["results"]] == ["teacher-2steps-cfg4", "flash-2steps", "flash_synth-2steps"]
    assert [r["training"]["dataset_images"] for r in doc["results"][1:]] == [100, 40]
    cost = doc["synth"][str(files["synth"])]["cost"]
    assert (cost["samples"], cost["seconds"], cost["seconds_per_sample"]) == (40, 8.0, 0.2)
    assert "8 s to synthesize, 0.2 s per sample" in (tmp_path / "out" / "data_free.md").read_text()
