"""The CLI's contracts: one-line user errors (exit 2, traceback only on request), --version, --preset, help texts."""

from __future__ import annotations

import re
import shutil
import typing

import pytest
from data_helpers import LEROBOT_FIXTURE, edit_info

from fastwam import __version__
from fastwam.cli import main
from fastwam.config import PRESETS
from fastwam.errors import UserError
from fastwam.presets import PresetName, parse_with_preset
from fastwam.train import TrainArgs


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    code, out, _ = _run(capsys, ["--version"])
    assert code == 0 and out.strip() == f"fastwam {__version__}"


@pytest.fixture
def bad_fps_dataset(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(LEROBOT_FIXTURE, root)
    edit_info(root, lambda info: info.__setitem__("fps", "eighty"))
    return root


@pytest.mark.parametrize("case, says", [
    ("steps_zero", r"--steps must be a positive number.*got 0"),
    ("steps_negative", r"--steps must be a positive number.*got -5"),
    ("no_dataset", r"/nonexistent: dataset directory not found"),
    ("bad_fps", r"info\.json: field 'fps' must be a positive whole number.*'eighty'"),
    ("bad_preset", r"unknown preset 'bogus'; available: libero_2cam224, small_cpu, tiny"),
    ("config_name", r"--config.name 'tiny' only relabels the config.*--preset"),
    ("resume_nothing", r"--resume: .* holds no checkpoint.*drop --resume"),
])
def test_user_errors_are_one_line_with_exit_code_2(capsys, tmp_path, bad_fps_dataset, monkeypatch, case, says):
    monkeypatch.delenv("FASTWAM_DEBUG", raising=False)
    base = ["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-progress"]
    argv = {
        "steps_zero": base + ["--synthetic", "--steps", "0"],
        "steps_negative": base + ["--synthetic", "--steps", "-5"],
        "no_dataset": base + ["--dataset", "/nonexistent"],
        "bad_fps": base + ["--dataset", str(bad_fps_dataset)],
        "bad_preset": ["train", "--preset", "bogus", "--synthetic"],
        "config_name": ["train", "--synthetic", "--config.name", "tiny"],
        "resume_nothing": base + ["--synthetic", "--resume"],
    }[case]
    code, _, err = _run(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("fastwam train: error: ") and re.search(says, lines[0]), lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_adds_the_traceback(capsys, monkeypatch, how):
    monkeypatch.delenv("FASTWAM_DEBUG", raising=False)
    argv = ["train", "--preset", "tiny", "--synthetic", "--steps", "0"]
    if how == "env":
        monkeypatch.setenv("FASTWAM_DEBUG", "1")
    else:
        argv = ["--debug"] + argv
    code, _, err = _run(capsys, argv)
    assert code == 2 and "Traceback" in err and "UserError" in err
    assert err.strip().splitlines()[-1].startswith("fastwam train: error: --steps must be a positive")


def test_preset_names_are_the_presets():
    assert typing.get_args(PresetName) == tuple(PRESETS)


def test_config_name_is_not_a_preset_switch():
    with pytest.raises(UserError, match="choose the preset with --preset"):
        parse_with_preset(["--config.name", "tiny"], TrainArgs, "t")
    args = parse_with_preset(["--preset", "tiny", "--config.name", "tiny"], TrainArgs, "t")
    assert args.preset == "tiny" and args.config == PRESETS["tiny"]()


def _help(capsys, monkeypatch, argv: list[str]) -> str:
    """A command's --help as one line of words (box drawing and line wrapping removed)."""
    monkeypatch.setenv("COLUMNS", "80")  # one column of option groups (wider terminals get several side by side)
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.replace("│", " ").split())


def _option_help(text: str, option: str) -> str:
    """The help text of one option: the words between its name (and metavar) and the next option or `(default`."""
    negation = r"(?:, --[a-z.-]*no-[a-z-]+)?"
    metavars = r"(?: (?:[A-Z]{1,5}(?= )|\{[^ ]*\}|\[[A-Z .\[\]]*\]))*"  # INT, {a,b}, [FLOAT [FLOAT ...]]
    m = re.search(re.escape(option) + negation + metavars + r" (.*?)(?: \(default|\s--|\s╰)", text)
    assert m, f"{option} not in help"
    return m.group(1)


@pytest.mark.parametrize("command", [["train"], ["ablate"], ["bench", "latency"], ["bench", "train"],
                                     ["bench", "data"]])
def test_preset_is_listed_with_its_choices(capsys, monkeypatch, command):
    assert "--preset {tiny,small_cpu,libero_2cam224}" in _help(capsys, monkeypatch, command)


def test_help_texts_belong_to_their_option(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, ["train"])
    assert "robot state" in _option_help(text, "--config.data.state-key")
    assert "actions" in _option_help(text, "--config.data.action-key")
    assert "PNG" in _option_help(text, "--config.train.sample-every")
    assert "video" not in _option_help(text, "--config.train.sample-every").replace("imagined", "")
    model = re.findall(r"(?<!, )(--config\.model\.[a-z-]+)", text)  # not the --config.model.no-... of a flag
    helps = [_option_help(text, opt) for opt in dict.fromkeys(model)]
    assert len(helps) > 15 and all(helps), helps
    assert len(set(helps)) == len(helps), "model options repeat one help text"
    for option in ("--preset", "--steps", "--resume", "--auto-resume", "--accept-changes", "--progress"):
        assert _option_help(text, option), option


def test_demo_and_eval_help(capsys, monkeypatch):
    demo = _help(capsys, monkeypatch, ["demo"])
    for option in ("--out", "--tasks", "--episodes-per-task", "--train-steps", "--variants", "--eval-episodes",
                   "--eval-seeds"):
        assert _option_help(demo, option), option
    evaluation = _help(capsys, monkeypatch, ["eval", "metaworld"])
    assert _option_help(evaluation, "--progress") == "show a progress bar"
