"""The demo's job, shrunk to seconds, and its settings equal to configs/glyphs.yaml."""

import json
from pathlib import Path

import pytest
import torch

from softtriple import demo
from softtriple.cli import main
from softtriple.data.builtin import glyphs
from softtriple.experiment import load_config

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
needs_fonts = pytest.mark.skipif(bool(glyphs.missing_packages()),
                                 reason="Debian CJK font packages not installed")


def test_demo_settings_are_configs_glyphs_yaml():
    """The same recipe; only the folder differs: the demo starts over in runs/demo each time,
    so it must never be a folder that `train --config configs/glyphs.yaml` writes."""
    shipped = load_config(Path(__file__).parent.parent / "configs" / "glyphs.yaml").to_dict()
    ours = demo.demo_config().to_dict()
    assert ours["run"].pop("out") == "runs/demo" != shipped["run"].pop("out")
    assert shipped == ours


@needs_fonts
def test_demo_runs_and_reports_three_columns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOFTTRIPLE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(glyphs, "characters", lambda: glyphs.__dict__["_all_characters"]()[:40])
    quick = ["data.max_classes=12", "schedule.epochs=1", "schedule.max_steps_per_epoch=2",
             "data.workers=0", "data.image_size=32", "run.progress=false",
             f"run.out={tmp_path / 'run'}"]
    args = ["demo"]
    for item in quick:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    for word in ("raw pixels", "pretrained", "trained", "recall@1", "run folder"):
        assert word in out
    assert (tmp_path / "run" / "results.json").is_file()
    summary = json.loads((tmp_path / "run" / "demo.json").read_text())  # the README's table
    assert summary["seed"] == 0 and summary["cpu"]
    for column in ("raw pixels", "pretrained", "trained"):
        assert set(summary[column]) == set(demo.SHOWN)
        assert f"{summary[column]['recall@1']:.3f}" in out


@pytest.mark.parametrize("device", DEVICES)
def test_the_raw_pixel_baseline_is_cached_per_image_version(tmp_path, monkeypatch, device):
    """The baseline needs no model: computed on the run's device once, read back equal; an
    image that changes on disk computes it again."""
    import os

    import numpy as np
    from PIL import Image

    from softtriple.data import ImageTable

    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16), np.uint8)).save(paths[-1])
    table = ImageTable(paths, np.arange(12) // 3, np.array(["test"] * 12), tmp_path)
    first = demo.raw_pixel_metrics(table, device=torch.device(device))
    assert list((tmp_path / ".softtriple-cache").glob("raw-pixels-*.json"))
    calls = []
    evaluate = demo.evaluate
    monkeypatch.setattr(demo, "evaluate", lambda *a, **k: calls.append(a[0].device.type)
                        or evaluate(*a, **k))
    assert demo.raw_pixel_metrics(table, device=torch.device(device)) == first and not calls
    os.utime(paths[0], ns=(1, 1))  # another version of one image
    assert demo.raw_pixel_metrics(table, device=torch.device(device)) == first
    assert calls == [device]
