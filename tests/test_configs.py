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


def test_a_faiss_kmeans_without_faiss_is_refused_before_the_work(monkeypatch, data_root,
                                                                  tmp_path, capsys):
    """A config that clusters with faiss (configs/sop.yaml as it did): on a machine without it,
    training and evaluate stop before their work (not at the first evaluation, after the test
    split is embedded or whole epochs), while reading such a run's config to embed, export or
    serve it still works."""
    from softtriple.cli import main
    from softtriple.experiment import ConfigError
    from softtriple.experiment.config import check_clustering_runs_here
    from softtriple.training import Trainer
    from test_training import tiny

    sop = Path(__file__).parent.parent / "configs" / "sop.yaml"
    faiss = ["evaluation.kmeans.backend=faiss", "evaluation.metrics=[recall, nmi]"]
    run = tmp_path / "run"
    Trainer(tiny(run, "schedule.epochs=1", "evaluation.before_training=false",
                 *faiss)).train()  # where faiss is installed
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    refusal = (r"faiss is not installed: pip install 'softtriple\[faiss\]', or set "
               r"evaluation.kmeans.backend=torch")
    check_clustering_runs_here(load_config(sop).evaluation)  # it clusters where it runs
    config = load_config(sop, faiss[:1])  # reading it is fine
    with pytest.raises(ConfigError, match=refusal):
        check_clustering_runs_here(config.evaluation)
    check_clustering_runs_here(config.evaluation, ["recall", "map_at_r"])
    for fix in ("evaluation.kmeans.backend=auto", "evaluation.kmeans.backend=torch",
                "evaluation.kmeans.backend=sklearn", "evaluation.metrics=[recall, map_at_r]"):
        check_clustering_runs_here(load_config(sop, [*faiss[:1], fix]).evaluation)
    with pytest.raises(ConfigError, match=refusal):
        Trainer(tiny(tmp_path / "new", *faiss))
    assert not (tmp_path / "new").exists()  # refused before the run folder
    from softtriple import inference

    embedded = []
    embed_split = inference.embed_split
    monkeypatch.setattr(inference, "embed_split",
                        lambda *args: embedded.append(1) or embed_split(*args))
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2 and not embedded  # refused before embedding
    assert "faiss is not installed" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--metrics", "recall"]) == 0
    assert main(["embed", str(run), "--out", str(tmp_path / "e.npz")]) == 0
