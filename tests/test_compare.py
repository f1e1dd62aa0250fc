"""softtriple compare: a two-variant, two-seed suite on digits under the head protocol runs,
resumes a run killed mid-training, and summarizes exactly what its runs' results.json say; the
feature cache is reused and rebuilt when an image changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from softtriple import compare
from softtriple.cli import main
from softtriple.experiment import ConfigError
from softtriple.experiment.config import load_config

BASE = """
model: {backbone: efficientnet_lite0, embedding_dim: 8, freeze_backbone: true, head_hidden: 16}
data: {format: builtin, root: digits, image_size: 32, flip: false, augment: false,
       feature_cache: true, batch_size: 16, workers: 0}
loss: {name: softtriple, args: {centers_per_class: 2}}
optimizer: {lr: 1.0e-3, loss_lr: 1.0e-2}
schedule: {epochs: 2, milestones: [1]}
evaluation: {every: 0, before_training: false, metrics: [recall, map_at_r, nmi],
             kmeans: {starts: 2}}
run: {report: false, progress: false}
"""


def _suite(folder: Path, epochs: int = 2) -> Path:
    (folder / "base.yaml").write_text(BASE)
    suite = folder / "suite.yaml"
    suite.write_text(f"""
base: base.yaml
out: {folder / 'out'}
seeds: [0, 1]
set: [schedule.epochs={epochs}]
variants:
  - {{label: SoftTriple K=2, set: ["loss.args={{centers_per_class: 2}}"]}}
  - {{label: SoftMax-norm, set: [loss.name=softmax_norm]}}
paired: [[SoftTriple K=2, SoftMax-norm]]
""")
    return suite


def test_suite_runs_resumes_a_killed_run_and_summarizes_its_runs(data_root, tmp_path):
    suite = compare.load_suite(_suite(tmp_path, epochs=4))
    first = compare.runs(suite)[0]
    # one run's training process is SIGKILLed after its second epoch's log line (its first
    # checkpoint written), before it finishes (softtriple.faults)
    process = subprocess.Popen(compare.train_command(suite, first, 0),
                               env={**os.environ, "SOFTTRIPLE_KILL_AT": "logged:2"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert process.wait(timeout=240) == -signal.SIGKILL
    assert (first.folder / "checkpoints" / "last.pt").is_file()
    assert first.status == "partial"
    assert main(["compare", str(tmp_path / "suite.yaml")]) == 0
    assert all(r.status == "done" for r in compare.runs(suite))

    # the resumed run equals an uninterrupted one
    fresh = load_config(suite.base, [*suite.set, *first.variant.set, "run.seed=0",
                                     f"run.out={tmp_path / 'fresh'}"])
    from softtriple.training import Trainer
    expected = Trainer(fresh).train()["metrics"]
    resumed = json.loads((first.folder / "results.json").read_text())["metrics"]
    assert resumed == pytest.approx(expected)

    summary = json.loads((suite.out / "summary.json").read_text())
    for variant in suite.variants:
        values = [json.loads((r.folder / "results.json").read_text())["metrics"]["recall@1"]
                  for r in compare.runs(suite) if r.variant is variant]
        stats = summary["variants"][variant.label]["metrics"]["recall@1"]
        assert stats["mean"] == pytest.approx(np.mean(values))
        assert stats["std"] == pytest.approx(np.std(values, ddof=1))
        assert stats["n"] == 2
    diff = next(p for p in summary["paired"] if p["metric"] == "recall@1")
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    text = (suite.out / "summary.md").read_text()
    assert "SoftMax-norm" in text and "**" in text and "k-means++" in text
    assert (suite.out / "plots" / "bars.png").is_file()

    # a finished suite is only summarized again: no run folder changes
    stamps = {r.folder: (r.folder / "results.json").stat().st_mtime_ns
              for r in compare.runs(suite)}
    assert main(["compare", str(tmp_path / "suite.yaml")]) == 0
    assert stamps == {r.folder: (r.folder / "results.json").stat().st_mtime_ns
                      for r in compare.runs(suite)}


def test_dry_run_lists_runs_and_bad_suites_fail_early(data_root, tmp_path, capsys):
    suite_file = _suite(tmp_path)
    assert main(["compare", str(suite_file), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("new") for line in lines)
    text = suite_file.read_text().replace("loss.name=softmax_norm", "loss.nam=softmax_norm")
    suite_file.write_text(text)
    with pytest.raises(ConfigError, match="variant 'SoftMax-norm': unknown config key loss.nam"):
        compare.load_suite(suite_file)
    assert main(["compare", str(suite_file)]) == 2
    assert "unknown config key loss.nam" in capsys.readouterr().err
    for wrong, message in [("loss.name=proxy_ncaa", "loss.name='proxy_ncaa' is not a loss"),
                           ("loss.args.centres_per_class=4",
                            "loss.args.centres_per_class is not an argument of loss "
                            "'softmax_norm'; valid: la, margin"),
                           ("loss.args.la=-1", "loss.args of softmax_norm: la must be")]:
        suite_file.write_text(text.replace("loss.nam=softmax_norm",
                                           f"loss.name=softmax_norm, {wrong}"))
        assert main(["compare", str(suite_file), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err


def test_feature_cache_is_reused_and_rebuilt_when_an_image_changes(tmp_path, monkeypatch):
    from softtriple.data.builtin import prepare
    from softtriple.experiment.loaders import load_table

    monkeypatch.setenv("SOFTTRIPLE_DATA", str(tmp_path))
    prepare("digits", tmp_path)
    from softtriple.experiment.build import build_model
    from softtriple.training.feature_cache import cached_features

    config = load_config(None, ["model.freeze_backbone=true", "data.root=digits",
                                "data.image_size=32"])
    model = build_model(config)
    table = load_table(config.data).split("test")
    args = ("efficientnet_lite0", None, 32, 64, torch.device("cpu"))
    first, made = cached_features(model, table, *args, progress=False)
    assert made == len(table) and first.shape == (len(table), 1280)
    again, made = cached_features(model, table, *args, progress=False)
    assert made == 0 and np.array_equal(first, again)
    changed = table.paths[3]
    from PIL import Image
    Image.new("RGB", (8, 8), "white").save(changed)
    third, made = cached_features(model, table, *args, progress=False)
    assert made == 1
    assert not np.allclose(third[3], first[3])
    assert np.array_equal(np.delete(third, 3, 0), np.delete(first, 3, 0))
    # a damaged cache (truncated, rows short of its keys, NaN features) is rebuilt, with a word
    from softtriple.training.feature_cache import cache_file, model_key
    cache = cache_file(table.root, f"features-{model_key('efficientnet_lite0', None, 32)}.npz")
    good = cache.read_bytes()
    with np.load(cache) as data:
        keys, features = data["keys"], data["features"]
    nan = features.copy()
    nan[5] = np.nan
    for damage in (lambda: cache.write_bytes(good[: len(good) // 2]),
                   lambda: np.savez(cache, keys=keys, features=features[:-2]),
                   lambda: np.savez(cache, keys=keys, features=nan)):
        damage()
        with pytest.warns(UserWarning, match="unreadable .*; rebuilding it"):
            rebuilt, made = cached_features(model, table, *args, progress=False)
        assert made == len(table) and np.isfinite(rebuilt).all()
        np.testing.assert_allclose(rebuilt, third, atol=1e-5)


def test_feature_cache_refuses_augmentation_and_random_backbones(data_root, tmp_path):
    from softtriple.training import Trainer

    with pytest.raises(ConfigError, match="augment=false"):
        Trainer(load_config(None, ["model.freeze_backbone=true", "data.feature_cache=true",
                                   f"run.out={tmp_path}"]))
    with pytest.raises(ConfigError, match="pretrained features"):
        Trainer(load_config(None, ["model.backbone=small_cnn", "model.freeze_backbone=true",
                                   "data.feature_cache=true", "data.augment=false",
                                   f"run.out={tmp_path}"]))


def test_runs_sharing_the_cores_wait_passively_and_a_lone_run_does_not(monkeypatch):
    """compare's runs keep OpenMP's default wait policy one at a time (it trained 1.5x faster),
    and sleep-at-once threads when several share the cores (``threads`` set per run)."""
    from softtriple.compare import _run_environment
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "OMP_WAIT_POLICY" not in _run_environment(0)
    assert _run_environment(1)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own choice stands alone
    assert _run_environment(0)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_carry_takes_an_earlier_summarys_matching_runs_and_no_others(tmp_path, capsys):
    """A summary committed by another checkout seeds the run folders it matches (same base,
    same settings and seed), so that compare trains only the rest; its rows come back unchanged
    in the next summary, marked as carried."""
    suite = compare.load_suite(_suite(tmp_path))
    first, second, third, fourth = compare.runs(suite)  # seed 0 of each variant, then seed 1
    metrics = {"recall@1": 0.5, "map_at_r": 0.25, "nmi": 0.75}

    def row(run: compare.Run, **change: object) -> dict[str, object]:
        return {"variant": run.variant.label, "seed": run.seed, "run": "elsewhere",
                "seconds": 12.5, "metrics": metrics, "kmeans": "sklearn",
                "settings": compare.run_settings(suite, run), **change}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"base": "/another/checkout/base.yaml", "runs": [
        row(first), row(second, settings=["schedule.epochs=9"]),
        {k: v for k, v in row(third).items() if k != "settings"},
        row(fourth, variant="ProxyNCA")]}))
    assert main(["compare", str(suite.path), "--carry", str(earlier), "--summarize-only"]) == 0
    out = capsys.readouterr().out
    assert "carried 1 finished run(s)" in out
    assert "SoftMax-norm seed 0: its settings differ" in out
    assert "SoftTriple K=2 seed 1: the summary does not record its settings" in out
    assert "ProxyNCA seed 1: not a run of this suite" in out
    assert [run.status for run in compare.runs(suite)] == ["done", "new", "new", "new"]
    (carried,) = json.loads((suite.out / "summary.json").read_text())["runs"]
    assert carried["metrics"] == metrics and carried["seconds"] == 12.5
    assert carried["carried_from"] == str(earlier)
    assert carried["settings"] == compare.run_settings(suite, first)
    # a folder that holds anything is never overwritten
    assert compare.carry(suite, earlier)[0] == 0
    # another suite's summary, or no summary at all, is refused in one line
    earlier.write_text(json.dumps({"base": "fonts.yaml", "runs": [row(first)]}))
    with pytest.raises(ConfigError, match="made from fonts.yaml, this suite's from base.yaml"):
        compare.carry(suite, earlier)
    earlier.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a compare summary"):
        compare.carry(suite, earlier)
    with pytest.raises(ConfigError, match="missing.json: no such file"):
        compare.carry(suite, tmp_path / "missing.json")
