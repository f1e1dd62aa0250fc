"""benchmarks/tuned_suite.py: the suite that runs each method at its best validation settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from softtriple.compare import load_suite

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "tuned_suite.py"


def write_suite(suite: Path, summary: Path, recalls: dict[str, float | None],
                common: list[str]) -> tuple[Path, Path]:
    """A tuning suite of ../base.yaml, one variant per label (its lr from the label), and a
    summary with each label's validation Recall@1 (none for an unfinished one)."""
    variants = [{"label": label, "set": [f"optimizer.lr={label.split('lr=')[1].split()[0]}"]}
                for label in recalls]
    suite.write_text(yaml.safe_dump({"base": "../base.yaml", "out": f"runs/compare/{suite.stem}",
                                     "seeds": [0], "set": common, "variants": variants}))
    summary.write_text(json.dumps({"variants": {
        label: {"metrics": {"recall@1": {"mean": value}}} if value is not None else {}
        for label, value in recalls.items()}}))
    return suite, summary


COMMON = ["data.validation_classes=0.5", "evaluation.every=0"]


def write_tuning(folder: Path, recalls: dict[str, float | None]) -> tuple[Path, Path]:
    configs = folder / "configs"
    (configs / "compare").mkdir(parents=True)
    (configs / "base.yaml").write_text((REPO / "configs" / "glyphs.yaml").read_text())
    return write_suite(configs / "compare" / "tune.yaml", folder / "summary.json", recalls,
                       COMMON)


def test_each_method_runs_at_its_best_validation_settings(tmp_path):
    suite, summary = write_tuning(tmp_path, {
        "SoftMax-norm lr=0.0003 la=20": 0.60, "SoftMax-norm lr=0.001 la=20": 0.70,
        "Triplet lr=0.0003 batch=32": 0.50, "Triplet lr=0.001 batch=32": 0.40})
    out = tmp_path / "configs" / "compare" / "tuned.yaml"
    subprocess.run([sys.executable, str(SCRIPT), str(suite), str(summary), str(out),
                    "--seeds", "0,1"], check=True, capture_output=True, text=True)
    tuned = yaml.safe_load(out.read_text())
    assert [v["label"] for v in tuned["variants"]] == ["SoftMax-norm", "Triplet"]
    assert tuned["variants"][0]["set"] == ["optimizer.lr=0.001"]
    assert tuned["variants"][1]["set"] == ["optimizer.lr=0.0003"]
    assert tuned["set"] == ["evaluation.every=0"]  # the test classes, not the validation split
    assert tuned["paired"] == [["Triplet", "SoftMax-norm"]] and tuned["seeds"] == [0, 1]
    assert "Triplet lr=0.001 batch=32: validation recall@1 0.400" in out.read_text()
    loaded = load_suite(out)  # the base config resolves from the new file's folder
    assert len(loaded.variants) == 2
    # the same choices on another data set's recipe (fonts reuses glyphs' tuning)
    (tmp_path / "configs" / "other.yaml").write_text((REPO / "configs" / "fonts.yaml").read_text())
    other = tmp_path / "configs" / "compare" / "other_tuned.yaml"
    subprocess.run([sys.executable, str(SCRIPT), str(suite), str(summary), str(other),
                    "--base", "../other.yaml"], check=True, capture_output=True, text=True)
    moved = yaml.safe_load(other.read_text())
    assert moved["base"] == "../other.yaml" and moved["out"] == "runs/compare/other_tuned"
    assert moved["variants"] == tuned["variants"] and load_suite(other).base.name == "other.yaml"


def test_an_unfinished_tuning_is_refused(tmp_path):
    suite, summary = write_tuning(tmp_path, {"SoftMax-norm lr=0.001 la=20": 0.7,
                                             "Triplet lr=0.001 batch=32": None})
    done = subprocess.run([sys.executable, str(SCRIPT), str(suite), str(summary),
                           str(tmp_path / "tuned.yaml")], capture_output=True, text=True)
    assert done.returncode != 0 and "not finished" in done.stderr
    assert "Triplet lr=0.001 batch=32" in done.stderr
    assert not (tmp_path / "tuned.yaml").exists()


def test_an_anchor_that_is_no_method_is_refused(tmp_path):
    suite, summary = write_tuning(tmp_path, {"SoftMax-norm lr=0.001 la=20": 0.7})
    done = subprocess.run([sys.executable, str(SCRIPT), str(suite), str(summary),
                           str(tmp_path / "tuned.yaml"), "--anchor", "ProxyNCA"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "not a method" in done.stderr


def test_also_extends_the_grid_past_its_edge(tmp_path):
    suite, summary = write_tuning(tmp_path, {
        "SoftMax-norm lr=0.001 la=20": 0.60, "SoftMax-norm lr=0.003 la=20": 0.70,
        "Triplet lr=0.0003 batch=32": 0.50, "Triplet lr=0.001 batch=32": 0.40})
    edge, edge_summary = tmp_path / "configs" / "compare" / "edge.yaml", tmp_path / "edge.json"
    write_suite(edge, edge_summary, {"SoftMax-norm lr=0.01 la=20": 0.75,
                                     "Triplet lr=0.01 batch=32": 0.10}, COMMON)
    out = tmp_path / "configs" / "compare" / "tuned.yaml"
    subprocess.run([sys.executable, str(SCRIPT), str(suite), str(summary), str(out),
                    "--also", str(edge), str(edge_summary)],
                   check=True, capture_output=True, text=True)
    tuned = yaml.safe_load(out.read_text())
    assert [v["set"] for v in tuned["variants"]] == [["optimizer.lr=0.01"],
                                                     ["optimizer.lr=0.0003"]]
    text = out.read_text()
    assert "edge.yaml" in text.splitlines()[0]
    assert "Triplet lr=0.01 batch=32: validation recall@1 0.100" in text
    # another recipe's runs, or a label tuned twice, are refused
    for edge_common, labels, message in (
            (["evaluation.every=0"], {"SoftMax-norm lr=0.01 la=20": 0.75}, "common settings"),
            (COMMON, {"SoftMax-norm lr=0.003 la=20": 0.75}, "already tuned")):
        write_suite(edge, edge_summary, labels, edge_common)
        done = subprocess.run([sys.executable, str(SCRIPT), str(suite), str(summary),
                               str(tmp_path / "refused.yaml"), "--also", str(edge),
                               str(edge_summary)], capture_output=True, text=True)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert not (tmp_path / "refused.yaml").exists()
