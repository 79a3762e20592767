"""bench/budget.py's bookkeeping: method variants, budgets turned into steps, Flash's phases scaled to a budget."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import budget  # noqa: E402
import step_cost  # noqa: E402


def test_a_variant_keeps_its_name_its_step_cost_spelling_and_its_options():
    method = budget.Method.parse("shared8=flash[pairs_per_rollout=4,teacher_steps=8,dmd_weights=[0,0,0,0]]")
    assert (method.name, method.method, method.spec) == ("shared8", "flash", "flash[pairs_per_rollout=4,teacher_steps=8,dmd_weights=[0,0,0,0]]")
    assert method.options == {"pairs_per_rollout": 4, "teacher_steps": 8, "dmd_weights": [0, 0, 0, 0]}
    assert budget.Method.parse("lcm") == budget.Method("lcm", "lcm", "lcm", {})
    assert step_cost.split_top_level("lcm,a=flash[x=1,y=[1,2]],sun") == ["lcm", "a=flash[x=1,y=[1,2]]", "sun"]
    with pytest.raises(SystemExit, match="METHOD one of"):
        step_cost.parse_method("flsah")


def test_a_budget_is_minutes_over_the_measured_seconds_per_step(tmp_path):
    first, later = tmp_path / "first.json", tmp_path / "later.json"
    first.write_text(json.dumps({"results": {"lcm": {"seconds_per_step": 1.5}, "flash": {"seconds_per_step": 4.0}}}))
    later.write_text(json.dumps({"results": {"lcm": {"seconds_per_step": 3.0}, "flash": {"seconds_per_step": 9.0},
                                             "flash[dmd_interval=4]": {"seconds_per_step": 6.0}}}))
    costs = budget.step_costs([str(first), str(later)])
    assert costs == {"lcm": 1.5, "flash": 4.0, "flash[dmd_interval=4]": 3.0}   # the later run priced by its LCM step
    assert budget.budget_steps(budget.Method.parse("lcm"), 5, costs) == 200
    # against a neighbour timed in the same run: 4.0 s times 6 / 9
    assert budget.priced_against(costs, [str(first), str(later)], "flash[dmd_interval=4]", "flash") == pytest.approx(8 / 3)
    with pytest.raises(SystemExit, match="no --step-cost file measured it beside"):
        budget.priced_against(costs, [str(first), str(later)], "flash[dmd_interval=4]", "sun")
    with pytest.raises(SystemExit, match=r"no step cost for 'flash\[pairs_per_rollout=4\]'.*step_cost.py"):
        budget.budget_steps(budget.Method.parse("flash[pairs_per_rollout=4]"), 5, costs)


def test_the_budgets_configs_scale_flash_phases_and_the_rates_and_set_the_others_steps():
    flash = budget.Method.parse("flash[pairs_per_rollout=4]").config(2.0, 301)
    preset = step_cost.flash.load_config("proxy")
    assert sum(flash.phase_steps) == 301 and max(flash.phase_steps) - min(flash.phase_steps) <= 1
    assert (flash.lr, flash.disc_lr, flash.pairs_per_rollout) == (2 * preset.lr, 2 * preset.disc_lr, 4)
    lcm = budget.Method.parse("lcm").config(0.5, 200)
    assert (lcm.steps, lcm.lr) == (200, 0.5 * step_cost.lcm.load_config("proxy").lr)
    assert budget.Method.parse("sun").nested and not budget.Method.parse("flash").nested


def test_a_name_means_one_variant_across_runs(tmp_path):
    budget.register([budget.Method.parse("lean=flash[teacher_steps=8]"), budget.Method.parse("lcm")], tmp_path)
    budget.register([budget.Method.parse("lean=flash[teacher_steps=8]")], tmp_path)   # the same again is fine
    with pytest.raises(SystemExit, match=r"'lean' already names 'flash\[teacher_steps=8\]'.*another name"):
        budget.register([budget.Method.parse("lean=flash[teacher_steps=4]")], tmp_path)
    assert json.loads((tmp_path / "budget-methods.json").read_text()) == {"lcm": "lcm", "lean": "flash[teacher_steps=8]"}


def test_ablation_rows_take_other_step_counts_and_samplers(monkeypatch):
    method = budget.Method.parse("lcm")
    default = budget.entries(method, Path("a.safetensors"), "5min-lr1")
    assert [(e.steps, e.sampler, e.label) for e in default] == [(n, None, "lcm@5min-lr1") for n in (4, 2, 1)]
    other = budget.entries(method, Path("a.safetensors"), "5min-lr1", [1], "ddim")
    assert [(e.steps, e.sampler, e.name) for e in other] == [(1, "ddim", "lcm@5min-lr1-1steps-ddim")]
    monkeypatch.setattr(sys, "argv", ["budget.py", "--sampler", "ddim"])
    with pytest.raises(SystemExit):   # only ablation rows may change how a student is sampled
        budget.main()


def _row(label, steps, fid, split="test", sampler=None, spread=0.1):
    replicates = {s: [fid + spread * k for k in (-1, 0, 1)] if s == "fid" else [0.5, 0.5, 0.5] for s in budget.SCORES}
    name = f"{label}-{steps}steps" + (f"-{sampler}" if sampler else "")
    return {"row": {"name": name, "label": label, "steps": steps, "sampler": sampler, "split": split, "samples": 3,
                    "adapter": f"{label}.safetensors", "fid": fid, "fid_classifier": 0.5, "prompt_accuracy": 0.5,
                    "intervals": {s: [fid - 1, fid + 1] if s == "fid" else [0.4, 0.6] for s in budget.SCORES},
                    "replicates": replicates, "per_seed_set": {s: [fid] if s == "fid" else [0.5] for s in budget.SCORES},
                    "training": {"train_steps": 10, "images_seen": 320}}}


def test_the_report_compares_each_row_with_lcm_at_its_budget_and_names_ablation_samplers(tmp_path):
    from PIL import Image

    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"batch_size": 32, "results": {"lcm": {"seconds_per_step": 1.0}}}))
    rows = {"budget-rows": [_row("lcm@5min", 4, 40.0), _row("lcm@5min", 2, 41.0), _row("flash@5min", 4, 30.0),
                            _row("flash@5min", 2, 41.05, spread=1.0), _row("gdd@5min", 1, 80.0)],
            "budget_validation-rows": [_row("flash@5min-lr2", 2, 45.0, "validation", "consistency")]}
    for folder, saved in rows.items():
        (tmp_path / folder).mkdir()
        for row in saved:
            (tmp_path / folder / f"{row['row']['name']}.json").write_text(json.dumps(row))
    args = type("Args", (), {"step_cost": [str(cost)], "results": tmp_path, "validation_per_class": 15,
                             "test_per_class": 25})()
    document = budget.report(args)
    verdicts = {(r["method"], r["sampling_steps"]): r["vs_lcm"] for r in document["results"]}
    assert verdicts[("flash", 4)]["fid"] == "better" and verdicts[("flash", 2)]["fid"] == "within noise"
    assert verdicts[("lcm", 4)] is None and verdicts[("gdd", 1)] is None   # no 1-step LCM row to compare with
    assert document["validation"]["rows"][0]["method"] == "flash (consistency sampler)"
    assert Image.open(tmp_path / "budget.png").height > 3 * 300   # a row of panels per step count: 4, 2 and 1


def test_the_report_keeps_earlier_rows_whose_files_are_not_here_and_replaces_the_rest(tmp_path):
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"batch_size": 32, "results": {"lcm": {"seconds_per_step": 1.0}}}))
    rows_dir = tmp_path / "budget-rows"
    rows_dir.mkdir()
    for row in (_row("lcm@5min", 4, 40.0), _row("lcm@45min", 4, 38.0)):
        (rows_dir / f"{row['row']['name']}.json").write_text(json.dumps(row))
    args = type("Args", (), {"step_cost": [str(cost)], "results": tmp_path, "validation_per_class": 15,
                             "test_per_class": 25})()
    budget.report(args)
    (rows_dir / "lcm@45min-4steps.json").unlink()                  # another machine scored it
    (rows_dir / "lcm@5min-4steps.json").write_text(json.dumps(_row("lcm@5min", 4, 39.0)))   # rescored here
    document = budget.report(args)
    fids = {r["budget_minutes"]: (r["fid"], r.get("carried", False)) for r in document["results"]}
    assert fids == {5.0: (39.0, False), 45.0: (38.0, True)}
    assert "* from the earlier budget.json" in (tmp_path / "budget.md").read_text()


def test_gdd_is_compared_with_lcm_at_one_step(tmp_path):
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"batch_size": 32, "results": {"lcm": {"seconds_per_step": 1.0}}}))
    (tmp_path / "budget-rows").mkdir()
    for row in (_row("lcm@5min", 1, 80.0), _row("gdd@5min", 1, 60.0)):
        (tmp_path / "budget-rows" / f"{row['row']['name']}.json").write_text(json.dumps(row))
    args = type("Args", (), {"step_cost": [str(cost)], "results": tmp_path, "validation_per_class": 15,
                             "test_per_class": 25})()
    verdicts = {r["method"]: r["vs_lcm"] for r in budget.report(args)["results"]}
    assert verdicts["gdd"]["fid"] == "better" and verdicts["lcm"] is None
