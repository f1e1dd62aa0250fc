"""``softtriple report RUN_DIR``: the pictures of a run in RUN_DIR/plots and one static
report.html (opens from disk, no server) with them, the resolved config and the final metrics."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softtriple.analysis import plots
from softtriple.atomic import write_text
from softtriple.experiment.run_folder import RunDir, read_embeddings
from softtriple.losses import SoftTripleLoss
from softtriple.losses.softtriple import MERGE_THRESHOLD


def _test_embeddings(run: RunDir) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not run.embeddings.is_file():
        raise ValueError(f"{run.embeddings} not found: the run has not finished; train it to "
                         f"the end (or resume it) first")
    return read_embeddings(run.embeddings)


def _center_assignments(run: Path, classes: int = 3,
                        candidates: int = 40) -> tuple[np.ndarray, int, list[Any]] | None:
    """Effective centers per class and, for the training classes (of up to ``candidates``
    sampled) whose images spread over the most centers, the images each center attracts most;
    None when the run's loss has no (C, K, d) centers."""
    from softtriple.data import ImageDataset, eval_transform
    from softtriple.experiment.build import build_config_loss
    from softtriple.experiment.loaders import load_table
    from softtriple.inference import load_model

    model, config, state = load_model(run)
    if config.loss.shard_centers:  # blocks of centers written by each process: all of them
        from softtriple.experiment.checkpoint import read_center_rows
        rows = read_center_rows(RunDir(run).checkpoints, state["center_blocks"], 0,
                                int(state["num_classes"]))["centers"]
        if rows.shape[1] == 1:  # SoftMax-norm: one center per class
            return None
        loss: Any = SoftTripleLoss(rows.shape[0], rows.shape[2], centers_per_class=rows.shape[1])
        loss.centers.data.copy_(rows)
    else:
        loss = build_config_loss(config, int(state["num_classes"]))
        loss.load_state_dict(state["loss"])
    if not isinstance(loss, SoftTripleLoss):
        return None
    counts = loss.effective_centers(MERGE_THRESHOLD).cpu().numpy()
    centers = torch.nn.functional.normalize(loss.centers.detach(), dim=2)  # (C, K, d)
    table = load_table(config.data).split("train")
    labels, original = table.encoded_labels()
    dataset = ImageDataset(table, labels,
                           eval_transform(config.data.image_size, model.interpolation))
    rng = np.random.default_rng(config.run.seed)
    sampled = rng.choice(len(original), min(candidates, len(original)), replace=False)
    found = []
    for c in sampled:
        idx = np.flatnonzero(labels == c)
        with torch.no_grad():
            x = model(torch.stack([dataset[int(i)][0] for i in idx]))
        sims = x @ centers[c].T  # (n_c, K)
        owner = sims.argmax(dim=1)
        per_center = []
        for k in range(centers.shape[1]):
            mine = (owner == k).nonzero()[:, 0]
            order = mine[sims[mine, k].argsort(descending=True)]
            if len(order):
                per_center.append([str(table.paths[idx[int(i)]]) for i in order])
        name = table.class_names.get(int(original[c]), str(int(original[c])))
        found.append((len(per_center), name, per_center))
    found.sort(key=lambda item: -item[0])  # stable: ties keep the sampled order
    return counts, centers.shape[1], [(name, groups) for _, name, groups in found[:classes]]


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                   for k, v in metrics.items())
    return f"<table>{rows}</table>"


def write_report(run: str | Path) -> Path:
    """Write RUN/plots/*.png and RUN/report.html; return the HTML path."""
    run_dir = RunDir(run)
    out = run_dir.plots
    out.mkdir(parents=True, exist_ok=True)
    embeddings, labels, paths = _test_embeddings(run_dir)
    figures: list[tuple[str, Path]] = []
    figures.append(("Training curves", plots.plot_curves(run_dir.read_metrics(), out)))
    figures.append(("Retrieval on held-out classes (blue: query; green: same class; red: "
                    "another class)", plots.plot_gallery(embeddings, labels, paths, out)))
    figures.append(("Embedding map of held-out classes",
                    plots.plot_embedding_map(embeddings, labels, out)))
    centers = _center_assignments(run_dir.root)
    if centers is not None:
        counts, k, assignments = centers
        figures.append(("Effective centers per training class",
                        plots.plot_effective_centers(counts, k, MERGE_THRESHOLD, out)))
        figures.append(("What each center learned", plots.plot_center_images(assignments, out)))
    results = run_dir.read_results()
    config_text = run_dir.config.read_text()
    body = "".join(f"<h2>{html.escape(title)}</h2><img src=\"plots/{path.name}\" alt=\""
                   f"{html.escape(title)}\">" for title, path in figures)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>softtriple run {html.escape(run_dir.root.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{max-width:100%}}
td{{padding:2px 12px}}pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>softtriple run: {html.escape(str(run_dir.root))}</h1>
<h2>Final metrics on held-out classes</h2>{_metrics_table(results["metrics"])}
{body}
<h2>Resolved configuration</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    write_text(run_dir.report, page)
    return run_dir.report
