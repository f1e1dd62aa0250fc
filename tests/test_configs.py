"""Every shipped config loads, and the paper's configs say what the paper does."""

import sys
from pathlib import Path

import pytest

from softtriple.experiment import load_config
from softtriple.experiment.build import build_config_loss

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_builds_its_loss(path):
    config = load_config(path)
    build_config_loss(config, num_classes=10)


@pytest.mark.parametrize("name", ["cub", "cars", "sop"])
def test_paper_settings(name):
    config = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert config.model.backbone == "bninception" and config.data.image_size == 224
    assert config.data.batch_size == 32 and config.schedule.epochs == 50
    assert config.schedule.milestones == [20, 40]
    assert (config.optimizer.lr, config.optimizer.loss_lr, config.optimizer.eps) == \
        (1e-4, 1e-2, 0.01)


def test_every_comparison_suite_resolves():
    """Every suite under configs/compare/ loads, and each of its runs' configs resolves (the
    paper-protocol suite for a GPU included): a dry run of each."""
    from softtriple.compare import load_suite, runs
    suites = sorted((Path(__file__).parent.parent / "configs" / "compare").glob("*.yaml"))
    assert {s.stem for s in suites} >= {"cub_paper", "glyphs_head", "fonts_head",
                                         "glyphs_centers", "glyphs_finetune", "glyphs_tune"}
    for path in suites:
        suite = load_suite(path)
        assert len(runs(suite)) == len(suite.variants) * len(suite.seeds)


def test_a_faiss_kmeans_without_faiss_is_refused_when_the_config_is_read(monkeypatch):
    """configs/sop.yaml clusters with faiss: on a machine without it, the run stops when its
    config is read, not at its first evaluation (after the test split is embedded, or, with
    evaluation.before_training=false, after whole epochs)."""
    from softtriple.experiment import ConfigError

    sop = Path(__file__).parent.parent / "configs" / "sop.yaml"
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ConfigError, match=r"faiss is not installed: pip install 'softtriple"
                                          r"\[faiss\]', or set evaluation.kmeans.backend=torch"):
        load_config(sop)
    load_config(sop, ["evaluation.kmeans.backend=torch"])
    load_config(sop, ["evaluation.kmeans.backend=sklearn"])
    load_config(sop, ["evaluation.metrics=[recall, map_at_r]"])  # no clustering, no faiss
