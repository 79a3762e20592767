"""`fewstep bench` / `eval` plumbing on a tiny teacher: fixed prompts and seeds, metrics keys, grids, tables."""
import json

import numpy as np
import pytest

from fewstep.training import bench, evaluation
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
    captions, labels, seeds = evaluation.prompt_set(3)
    assert len(captions) == 60 and captions[:3] == [PROXY_CLASSES[0]] * 3 and seeds[:4] == [0, 1, 2, 0]
    again = evaluation.prompt_set(3)
    assert again[0] == captions and np.array_equal(again[1], labels) and again[2] == seeds


def test_entries_count_guided_passes():
    assert evaluation.TeacherEntry(50).nfe == 100 and evaluation.TeacherEntry(4, cfg_scale=1.0).nfe == 4
    assert [e.steps for e in bench.BENCH_SETS["teacher"]] == [50, 25, 8, 4, 2]


def test_evaluate_entry_is_deterministic_and_writes_a_grid(tiny_teacher, tmp_path):
    pipe = load_teacher(tiny_teacher)
    entry = evaluation.TeacherEntry(2)
    a = evaluation.evaluate_entry(pipe, entry, per_class=2, batch_size=16, grid_path=tmp_path / "g.png")
    b = evaluation.evaluate_entry(pipe, entry, per_class=2, batch_size=40)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-4) and a["prompt_accuracy"] == b["prompt_accuracy"]
    assert a["nfe"] == 4 and 0 <= a["prompt_accuracy"] <= 1 and a["seconds_per_image"] > 0
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (32 * 20, 32 * 2)


def test_run_bench_writes_json_markdown_and_grids(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.BENCH_SETS, "smoke", [evaluation.TeacherEntry(2), evaluation.TeacherEntry(1)])
    doc = bench.run_bench("smoke", tiny_teacher, per_class=1, batch_size=20, out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "smoke.json").read_text()) == doc
    table = (tmp_path / "smoke.md").read_text()
    assert "teacher-2steps-cfg4" in table and "teacher-1steps-cfg4" in table and "*uniform noise*" in table
    assert doc["sanity"]["real_train_images"] < doc["sanity"]["uniform_noise"]
    assert sorted(p.name for p in (tmp_path / "smoke-grids").iterdir()) == ["teacher-1steps-cfg4.png", "teacher-2steps-cfg4.png"]
    with pytest.raises(ValueError, match="unknown bench set"):
        bench.run_bench("nope", tiny_teacher, out_dir=tmp_path)


@pytest.mark.skipif(not (evaluation.BUNDLED_TEACHER / "model_index.json").is_file(), reason="the bundled teacher is not in this checkout")
def test_quickstart_runs_on_the_bundled_teacher(tmp_path, capsys):
    from fewstep.training.cli import main as cli

    assert cli(["quickstart", "--out-dir", str(tmp_path), "--per-class", "2", "--student-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "teacher-25steps-cfg4" in out and "teacher-4steps-cfg4" in out and "flash-quickstart-4steps" in out
    from PIL import Image

    rows = 4 if evaluation.BUNDLED_FLASH.is_file() else 3
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
    monkeypatch.setitem(bench.BENCH_SETS, "snapfusion", [evaluation.TeacherEntry(2), *[bench._snap(label) for label in bench.SNAP_LABELS]])
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
    monkeypatch.setitem(bench.BENCH_SETS, "data_free", [evaluation.TeacherEntry(2), evaluation.StudentEntry(2, adapter=str(files["real"])),
                                                        evaluation.StudentEntry(2, label="flash_synth", adapter=None)])
    doc = bench.run_bench("data_free", tiny_teacher, per_class=1, batch_size=20, out_dir=tmp_path / "out", progress=False,
                          adapter=[str(files["synth"])])
    assert [r["name"] for r in doc["results"]] == ["teacher-2steps-cfg4", "flash-2steps", "flash_synth-2steps"]
    assert [r["training"]["dataset_images"] for r in doc["results"][1:]] == [100, 40]
    cost = doc["synth"][str(files["synth"])]["cost"]
    assert (cost["samples"], cost["seconds"], cost["seconds_per_sample"]) == (40, 8.0, 0.2)
    assert "8 s to synthesize, 0.2 s per sample" in (tmp_path / "out" / "data_free.md").read_text()
