"""Slow: every loss of the paper's comparison, selected with --set loss.name=..., trains a small
CNN on glyphs to a held-out Recall@1 above the untrained model's. Run with: pytest -m slow"""

from __future__ import annotations

import json

import pytest

from softtriple.cli import main
from softtriple.data.builtin import glyphs

PAIR_LOSSES = {"npair", "lifted", "triplet", "clustering"}


@pytest.mark.slow
@pytest.mark.skipif(bool(glyphs.missing_packages()), reason="Debian CJK fonts not installed")
@pytest.mark.parametrize("name", ["softtriple", "hardtriple", "softmax_norm", "proxy_nca",
                                  "npair", "lifted", "triplet", "clustering"])
def test_loss_trains_above_untrained(name, tmp_path):
    settings = ["model.backbone=small_cnn", "model.embedding_dim=32", "data.root=glyphs",
                "data.image_size=32", "data.flip=false", "data.max_classes=100",
                "data.workers=0", "data.batch_size=32", "schedule.epochs=4",
                "schedule.milestones=[3]", "optimizer.lr=0.001", "evaluation.every=0",
                "evaluation.metrics=[recall]", "run.progress=false", "run.report=false",
                f"run.out={tmp_path}", f"loss.name={name}"]
    if name in PAIR_LOSSES:
        settings += ["data.sampler=class_balanced", "data.images_per_class=2"]
    if name == "softtriple":
        settings += ["loss.args={centers_per_class: 4}"]
    args = ["train"]
    for item in settings:
        args += ["--set", item]
    assert main(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before, after = lines[0]["test/recall@1"], lines[-1]["test/recall@1"]
    assert after > before + 0.02, (before, after)
