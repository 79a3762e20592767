"""The attributes split: its images are what their captions say, each reader reads real images right and catches
wrong prompts, the scores tell a set that ignores an attribute from one that follows it, and `fewstep bench` runs it."""
import dataclasses
import json

import numpy as np
import pytest

from fewstep.training import attributes as A
from fewstep.training import data as D
from fewstep.training import bench, bundled, evaluation
from fewstep.training.scores import compare


@pytest.fixture(scope="module")
def heldout():
    return D.attribute_dataset("heldout", per_class=10)   # 200 coloured items, 200 pairs


def test_images_are_what_their_captions_say(heldout):
    data, prompts = heldout
    assert len(data) == 400 and data.images.shape[1:] == (32, 32, 3) and data.images.dtype == np.uint8
    first = prompts[0]
    assert first.kind == D.COLOURED and data.captions[0] == (f"a {D.COLOUR_NAMES[first.colour]} {D.ITEM_NAMES[first.first]} on "
                                                            f"a {D.COLOUR_NAMES[first.background]} background")
    # The frame is the background colour; the brightest stroke pixel of the source is the item colour.
    assert (data.images[0, 0, 0] == D.COLOURS[D.COLOUR_NAMES[first.background]]).all()
    pair = next(p for p in prompts if p.kind == D.PAIR and p.first >= 10)
    assert pair.caption == f"{'an' if D.ITEM_NAMES[pair.first][0] in 'aeiou' else 'a'} {D.ITEM_NAMES[pair.first]} left of a {D.ITEM_NAMES[pair.second]}"
    assert [p.kind for p in prompts].count(D.PAIR) == 200
    assert np.bincount([p.first for p in prompts if p.kind == D.COLOURED], minlength=20).tolist() == [10] * 20   # balanced
    again, _ = D.attribute_dataset("heldout", per_class=10)
    assert np.array_equal(again.images, data.images) and again.captions == data.captions
    train = D.load_dataset("proxy-attributes")
    assert len(train) == 2 * len(D.load_dataset("proxy")) and len(set(train.captions)) == len(D.all_prompts(D.COLOURED)) + 200


def test_each_reader_reads_real_images_and_catches_a_wrong_prompt(heldout):
    data, prompts = heldout
    right = A.read_attributes(data.images, prompts)
    assert np.nanmean(right["class"]) > 0.9 and np.nanmean(right["colour"]) > 0.98
    assert np.nanmean(right["pair"]) > 0.85 and np.nanmean(right["position"]) > 0.98
    assert np.isnan(right["colour"][[p.kind == D.PAIR for p in prompts]]).all()   # a pair names no colour
    wrong = {
        "colour": [dataclasses.replace(p, colour=p.background, background=p.colour) if p.kind == D.COLOURED else p for p in prompts],
        "class": [dataclasses.replace(p, first=(p.first + 10) % 20) if p.kind == D.COLOURED else p for p in prompts],
        "position": [dataclasses.replace(p, first=p.second, second=p.first) if p.kind == D.PAIR else p for p in prompts],
    }
    for attribute, prompts_wrong in wrong.items():
        read = A.read_attributes(data.images, prompts_wrong)
        assert np.nanmean(read[attribute]) < 0.05, attribute
        untouched = {"colour": "position", "class": "position", "position": "colour"}[attribute]
        assert np.nanmean(read[untouched]) == np.nanmean(right[untouched])   # readers are independent of each other


def test_prompt_sets_split_the_seeds_and_cover_every_caption():
    validation, test = A.prompt_set(10, "validation", 2), A.prompt_set(10, "test", 2)
    assert len(validation.captions) == 400 and not set(validation.seeds) & set(test.seeds)
    assert (validation.labels == D.COLOURED).sum() == 200 and np.bincount(validation.seed_sets).tolist() == [200, 200]
    first_set = [p for p, s in zip(validation.attributes, validation.seed_sets) if s == 0]
    assert len({p for p in first_set if p.kind == D.PAIR}) == 100   # each seed set runs through the prompts of a kind
    again = A.prompt_set(10, "validation", 2)
    assert again.captions == validation.captions and again.seeds == validation.seeds


def test_the_scores_tell_a_set_that_ignores_colour_from_one_that_follows_it():
    layout = A.prompt_set(5, "validation", 2)   # 200 samples
    train = D.load_proxy_dataset("train")
    members = {c: iter(np.flatnonzero(train.labels == c)) for c in range(20)}

    def image(prompt):
        items = [train.images[next(members[c])] for c in (prompt.first, prompt.second) if c >= 0]
        return D.compose(prompt, *items)

    # The same real items, composed as each prompt says, and with item and background colour swapped.
    good = np.stack([image(p) for p in layout.attributes])
    members = {c: iter(np.flatnonzero(train.labels == c)) for c in range(20)}
    bad = np.stack([image(dataclasses.replace(p, colour=p.background, background=p.colour) if p.kind == D.COLOURED else p)
                    for p in layout.attributes])
    good_scores, bad_scores = A.score_images(good, layout, resamples=30), A.score_images(bad, layout, resamples=30)
    assert set(good_scores) >= set(A.SCORES)
    assert good_scores["intervals"]["colour_accuracy"][0] > bad_scores["intervals"]["colour_accuracy"][1]
    verdicts = compare(bad_scores, good_scores)
    assert verdicts["colour_accuracy"] == "worse" and verdicts["prompt_accuracy"] == "worse"
    assert verdicts["class_accuracy"] == verdicts["position_accuracy"] == "within noise"


def test_the_attributes_bench_set_runs_on_its_prompts(tmp_path, monkeypatch):
    from fewstep.training.pipelines import load_teacher
    from fewstep.training.teacher import train_teacher

    data, _ = D.attribute_dataset("heldout", per_class=2)
    teacher = train_teacher(data, tmp_path / "run", tmp_path / "pipe", preset="tiny", vae_steps=2, unet_steps=2, batch_size=8,
                            sample_every=0, progress=False)
    baseline = evaluation.TeacherEntry(2)
    monkeypatch.setitem(bench.BENCH_SETS, "attributes", dataclasses.replace(
        bench.BENCH_SETS["attributes"], entries=(baseline, evaluation.TeacherEntry(2, 1.0)), baselines=(baseline,)))
    doc = bench.run_bench("attributes", teacher, per_class=1, batch_size=20, out_dir=tmp_path, progress=False, seed_sets=2,
                          resamples=10, pipe=load_teacher(teacher))
    assert doc["prompts"] == "attributes" and doc["scores"] == list(A.SCORES) and doc["baselines"] == [baseline.name]
    assert doc["results"][1]["samples"] == 40 and set(doc["results"][1]["vs"][baseline.name]) == set(A.SCORES)
    assert doc["sanity"]["real_train_images"]["colour_accuracy"] > 0.9 > doc["sanity"]["uniform_noise"]["prompt_accuracy"]
    table = (tmp_path / "attributes.md").read_text()
    assert "colour ↑" in table and "position ↑" in table and json.loads((tmp_path / "attributes.json").read_text()) == doc
    assert bench.BENCH_SETS["attributes"].teacher == bundled.BUNDLED_ATTRIBUTES_TEACHER
    assert bench.BENCH_SETS["teacher"].teacher == bundled.BUNDLED_TEACHER and len(D.PROXY_CLASSES) == 20


def test_a_bundled_teacher_trains_its_students_on_its_own_data_with_the_proxy_preset(tmp_path, capsys, monkeypatch):
    from fewstep.training.bench import is_bundled_lineage
    from fewstep.training.cli import main

    attributes_teacher = tmp_path / "attributes_teacher"
    attributes_teacher.mkdir()
    monkeypatch.setitem(bundled.BUNDLED_TEACHER_DATA, attributes_teacher, "proxy-attributes")
    assert bundled.bundled_teacher_data(bundled.BUNDLED_TEACHER) == "proxy" and is_bundled_lineage(attributes_teacher)
    assert bundled.bundled_teacher_data(tmp_path) is None and not is_bundled_lineage(tmp_path)
    for teacher, data, preset in ((attributes_teacher, "proxy-attributes", "proxy"), (tmp_path, "proxy", "paper")):
        assert main(["train", "flash", "--teacher", str(teacher), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
        options = json.loads(capsys.readouterr().out)
        assert (options["data"], options["preset"]) == (data, preset)


@pytest.mark.skipif(not (bundled.BUNDLED_ATTRIBUTES_TEACHER / "model_index.json").is_file(),
                    reason="the bundled attributes teacher is not in this checkout")
def test_the_bundled_attributes_teacher_follows_colour_and_pairs_with_cfg_and_loses_them_without():
    """The stick separates what CFG buys: without it the bundled teacher's colour, pair and prompt accuracy fall beyond
    the noise (validation prompts, 8 steps; class accuracy alone needs more samples than a test can afford)."""
    from fewstep.training.pipelines import load_teacher

    pipe = load_teacher(bundled.BUNDLED_ATTRIBUTES_TEACHER)
    guided, unguided = (evaluation.evaluate_entry(pipe, evaluation.TeacherEntry(8, cfg_scale), per_class=5, batch_size=100,
                                                  seed_sets=2, resamples=30, suite=A.SUITE) for cfg_scale in (4.0, 1.0))
    verdicts = compare(unguided, guided)
    assert verdicts["colour_accuracy"] == verdicts["pair_accuracy"] == verdicts["prompt_accuracy"] == "worse", verdicts
