"""softtriple report on a tiny run: every picture is written, is a real picture, and the page
references only files that exist."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from softtriple.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("SOFTTRIPLE_DATA", str(root / "data"))
    args = ["train"]
    for item in ["model.backbone=small_cnn", "model.embedding_dim=8", "data.image_size=16",
                 "data.workers=0", "data.batch_size=32", "schedule.epochs=2",
                 "schedule.max_steps_per_epoch=6", "run.progress=false",
                 f"run.out={root / 'run'}", "loss.args={centers_per_class: 3}",
                 "evaluation.metrics=[recall, map_at_r, nmi]"]:
        args += ["--set", item]
    assert main(args) == 0  # softtriple train writes the report when the trainer returns
    yield root / "run"
    mp.undo()


EXPECTED = ["curves.png", "retrieval.png", "embedding_map.png", "effective_centers.png",
            "center_images.png"]


@pytest.mark.parametrize("name", EXPECTED)
def test_picture_is_real(run, name):
    with Image.open(run / "plots" / name) as image:
        assert image.width >= 200 and image.height >= 100
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 5  # not one flat colour
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_html_references_only_existing_files(run):
    page = (run / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sorted(refs) == sorted(f"plots/{n}" for n in EXPECTED)
    assert all((run / ref).is_file() for ref in refs)
    assert "recall@1" in page and "embedding_dim: 8" in page


def test_report_command_rewrites(run, capsys):
    (run / "plots" / "curves.png").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "plots" / "curves.png").is_file()
    assert "report.html" in capsys.readouterr().out


def test_report_of_unfinished_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    assert "has not finished" in capsys.readouterr().err
