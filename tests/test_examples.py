"""Every command the README's "Command line" block and the ``--help`` examples show is run, in
order, in a scratch folder. Training commands get settings appended that make them take seconds
(one or two steps per epoch, few classes, small images); the commands themselves, their flags and
their config files are the documented ones."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from softtriple.cli import EXAMPLES, build_parser, main
from softtriple.data.builtin import glyphs
from test_data import make_cub

REPO = Path(__file__).resolve().parent.parent
FAST = ["schedule.max_steps_per_epoch=2", "data.max_classes=12", "data.image_size=32",
        "data.workers=0", "evaluation.every=0", "evaluation.before_training=false",
        "evaluation.metrics=[recall]", "run.progress=false", "run.report=false"]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    return [line.split("#", 1)[0].strip() for line in block.splitlines()
            if line.strip().startswith(("softtriple", "torchrun"))]


def help_examples() -> list[str]:
    lines = [EXAMPLES]
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for sub in action.choices.values():
            lines.append(sub.epilog or "")
    return [line.strip() for text in lines for line in text.splitlines()
            if line.strip().startswith(("softtriple", "torchrun"))]


def _in_process(args: list[str], cwd: Path, data: Path) -> subprocess.CompletedProcess[str]:
    """``softtriple ARGS`` through the console script's own entry point (cli.main) in this
    process: the same code as the installed command, without a new interpreter importing torch
    for each of the examples."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("SOFTTRIPLE_DATA", str(data))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # a crash: its traceback, as the command would print it
                err.write(traceback.format_exc())
                code = 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _run(command: str, cwd: Path, data: Path) -> subprocess.CompletedProcess[str]:
    args = shlex.split(command.replace("~/data/CUB_200_2011", str(data / "CUB_200_2011")))
    if args[0] == "torchrun":
        args = [sys.executable, "-m", "torch.distributed.run", "--master_port=29547",
                *args[1:]]
    else:
        args = args[1:]
    if "train" in args:
        config = args[args.index("--config") + 1] if "--config" in args else None
        if "--resume" not in args:
            args += ["--out", str(cwd / "runs" / "example")] if "--out" not in args else []
            args += ["--overwrite"]
        for item in FAST if config or "--resume" not in args else []:
            args += ["--set", item]
    if args[0] != sys.executable:
        return _in_process(args, cwd, data)
    env = {**os.environ, "SOFTTRIPLE_DATA": str(data), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("examples")
    for name in ("configs",):
        (cwd / name).symlink_to(REPO / name)
    data = tmp_path_factory.mktemp("data")
    make_cub(data)
    return cwd, data


@pytest.mark.skipif(bool(glyphs.missing_packages()), reason="the examples train on glyphs, "
                    "which renders from Debian fonts (make sources installs them)")
@pytest.mark.parametrize("source", ["README", "help"])
def test_documented_commands_run(scratch, source):
    cwd, data = scratch
    commands = readme_commands() if source == "README" else help_examples()
    assert len(commands) >= 8
    for command in commands:
        done = _run(command, cwd, data)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, command


def test_every_help_example_uses_a_real_subcommand():
    names = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for command in help_examples() + readme_commands():
        words = command.split()
        sub = words[words.index("softtriple") + 1] if "softtriple" in words else None
        assert sub is None or sub in names or re.match(r"^-", sub), command


@pytest.mark.parametrize("command", ["train", "demo"])
def test_set_takes_several_settings_at_once_and_repeats(command):
    """``--set a=1 b=2 --set c=3`` gives the three, in order (later ones win in load_config)."""
    args = build_parser().parse_args([command, "--set", "schedule.epochs=2", "run.seed=3",
                                      "--set", "schedule.epochs=4"])
    assert args.set == ["schedule.epochs=2", "run.seed=3", "schedule.epochs=4"]
