"""`fewstep bench --reproduce NAME`: every recipe is commands the CLI takes, each input one an earlier command makes,
and --dry-run runs none of them."""
import pytest

from fewstep.training.cli import build_parser, main
from fewstep.training.reproduce import RECIPES

INPUTS = ("--adapter", "--student", "--teacher", "--plan", "--decoder", "--data")


def _value(command, flag):
    return command[command.index(flag) + 1] if flag in command else None


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_cli_commands_whose_inputs_earlier_commands_make(name):
    commands = RECIPES[name].commands("RUNS")
    made = []   # what earlier commands write: their run folders and --out files
    for command in commands:
        args = build_parser().parse_args(command)   # SystemExit on an option the CLI does not take
        assert hasattr(args, "run"), command
        inputs = [command[i + 1] for i, arg in enumerate(command) if arg in INPUTS]
        for path in inputs:
            if path.startswith("RUNS/"):
                assert any(path == m or path.startswith(m + "/") for m in made), (command, path)
        made += [m for m in (_value(command, "--run-dir"), _value(command, "--out")) if m]
    assert commands[-1][0] == "bench" and _value(commands[-1], "--set") == name


def test_dry_run_prints_the_commands_and_runs_none(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--reproduce", "sun", "--dry-run", "--split", "validation", "--runs-dir", "r"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "[1/3] fewstep train sun --run-dir r/sun --steps 1500"
    assert out[3].startswith("[3/3] fewstep bench --set sun --adapter r/sun/sun_adapter.safetensors --split validation")
    assert not any(tmp_path.iterdir())   # nothing trained, nothing written
    assert main(["bench", "--reproduce", "sun", "--set", "teacher"]) == 2
    assert main(["bench", "--dry-run"]) == 2
    assert "own --set" in capsys.readouterr().err
