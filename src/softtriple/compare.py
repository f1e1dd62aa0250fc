"""Suites of runs: every (variant, seed) of a comparison trained as a normal run folder, then
summarized over seeds.

A suite file (YAML; ``configs/compare/`` holds ours)::

    base: ../glyphs_head.yaml        # a run config, relative to the suite file
    out: runs/compare/glyphs_head    # the suite's folder (relative to the working directory)
    seeds: [0, 1, 2, 3, 4]
    set: [evaluation.every=0]        # overrides for every run
    variants:                        # each a label and its overrides
      - {label: SoftTriple, set: [loss.name=softtriple]}
      - {label: K=4, group: tau=0.2, x: 4, set: [...]}   # x/group: a sweep, plotted against x
    paired: [[SoftTriple, SoftMax-norm]]   # per-seed differences with a 95% interval

Run ``OUT/<variant>/seed<S>/`` is finished when it holds results.json (skipped), interrupted
when it holds a checkpoint (resumed), and otherwise started afresh. The summary
(summary.json, summary.md, plots/) is written from the runs' results.json files alone, so
rerunning a finished suite only summarizes it again. ``--carry SUMMARY`` first takes the finished
runs of an earlier summary of the suite (each row records its settings), so that a suite longer
than one machine's session is finished by another checkout from the committed summary.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from softtriple.atomic import write_json, write_text
from softtriple.experiment.config import ConfigError, load_config, read_yaml_mapping
from softtriple.experiment.run_folder import RunDir

SUITE_KEYS = ("base", "out", "seeds", "set", "variants", "paired", "description")
VARIANT_KEYS = ("label", "set", "group", "x")
NOT_METRICS = ("queries", "lone_queries")
LOWER_IS_BETTER = ("effective_centers",)  # not ranked: fewer centers is a finding, not a win


@dataclass
class Variant:
    label: str
    set: list[str] = field(default_factory=list)
    group: str | None = None  # a sweep's line (e.g. "tau=0.2")
    x: float | None = None  # a sweep's position (e.g. K)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", self.label).strip("_") or "variant"


@dataclass
class Suite:
    path: Path
    base: Path
    out: Path
    seeds: list[int]
    set: list[str]
    variants: list[Variant]
    paired: list[tuple[str, str]] = field(default_factory=list)
    description: str = ""


@dataclass
class Run:
    variant: Variant
    seed: int
    folder: Path

    @property
    def status(self) -> str:
        """done (results.json), partial (a checkpoint to resume) or new."""
        run_dir = RunDir(self.folder)
        if run_dir.finished:
            return "done"
        if run_dir.checkpointed:
            return "partial"
        return "new"


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of KEY=VALUE strings; got {value!r}")
    return list(value)


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; every run's config is resolved once to catch errors early."""
    file = Path(path)
    raw = read_yaml_mapping(file, "suite file", "base, out, seeds, set, variants")
    unknown = sorted(set(raw) - set(SUITE_KEYS))
    if unknown:
        raise ConfigError(f"unknown suite key(s) {', '.join(unknown)} in {file}; valid: "
                          f"{', '.join(SUITE_KEYS)}")
    for key in ("base", "out", "variants"):
        if key not in raw:
            raise ConfigError(f"{file} needs '{key}'")
    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"seeds must be a non-empty list of integers; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat: {seeds}")
    variants = []
    for i, entry in enumerate(raw["variants"] or []):
        if not isinstance(entry, dict):
            raise ConfigError(f"variants[{i}] must be a mapping with a label; got {entry!r}")
        bad = sorted(set(entry) - set(VARIANT_KEYS))  # before the label: 'lable' is named
        if bad:
            raise ConfigError(f"unknown key(s) {', '.join(map(str, bad))} in variants[{i}]; "
                              f"valid: {', '.join(VARIANT_KEYS)}")
        if "label" not in entry:
            raise ConfigError(f"variants[{i}] has no label; give each variant one")
        variants.append(Variant(str(entry["label"]), _strings(entry.get("set"),
                                f"variants[{i}].set"), entry.get("group"), entry.get("x")))
    if not variants:
        raise ConfigError(f"{file} lists no variants")
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"variant labels must be distinct as folder names; got {slugs}")
    labels = {v.label for v in variants}
    paired = []
    for pair in raw.get("paired") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and set(pair) <= labels):
            raise ConfigError(f"paired entries are [label, label] of listed variants; got {pair!r}")
        paired.append((str(pair[0]), str(pair[1])))
    suite = Suite(file, (file.parent / str(raw["base"])).resolve(), Path(str(raw["out"])),
                  list(seeds), _strings(raw.get("set"), "set"), variants, paired,
                  str(raw.get("description", "")))
    for variant in suite.variants:  # a typo fails now, not after hours of other runs
        try:
            load_config(suite.base, [*suite.set, *variant.set])
        except ConfigError as error:
            raise ConfigError(f"variant {variant.label!r}: {error}") from error
    return suite


def runs(suite: Suite) -> list[Run]:
    """Every (variant, seed), seed by seed: a suite stopped early has whole seeds of every
    variant rather than every seed of a few variants."""
    return [Run(v, seed, suite.out / v.slug / f"seed{seed}")
            for seed in suite.seeds for v in suite.variants]


def run_settings(suite: Suite, run: Run) -> list[str]:
    """The overrides of the base config that make a run what it is, its seed included."""
    return [*suite.set, *run.variant.set, f"run.seed={run.seed}"]


def train_command(suite: Suite, run: Run, threads: int) -> list[str]:
    """The ``softtriple train`` command line of one run (a resume where it was interrupted)."""
    if run.status == "partial":
        return [sys.executable, "-m", "softtriple", "train", "--resume", str(run.folder),
                "--set", "run.progress=false"]
    command = [sys.executable, "-m", "softtriple", "train", "--config", str(suite.base)]
    settings = [*run_settings(suite, run), f"run.out={run.folder}", "run.progress=false"]
    if threads:
        settings.append(f"run.threads={threads}")
    for item in settings:
        command += ["--set", item]
    return command


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, ask for SIGTERM when the comparison dies, so that a
    killed comparison leaves no training running on that a resumed one would collide with."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run_environment(threads: int) -> dict[str, str]:
    """A run's environment: this one's, and with several runs sharing the cores (``threads``
    set) OpenMP threads that sleep as soon as they wait, leaving the cycles to the other runs.
    One run at a time keeps OpenMP's default, which spins briefly: sleeping at once made the
    demo's training 1.5x slower (docs/PERFORMANCE.md)."""
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if threads else dict(os.environ)


def _execute(suite: Suite, run: Run, threads: int) -> tuple[Run, bool, float, str]:
    if run.status == "new" and run.folder.exists():
        shutil.rmtree(run.folder)  # a start that died before its first checkpoint
    run.folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with RunDir(run.folder).compare_log.open("a") as log:
        code = subprocess.call(train_command(suite, run, threads), stdout=log,
                               stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                               env=_run_environment(threads))
    seconds = time.perf_counter() - start
    timing = run.folder / "compare.json"
    spent = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    write_json(timing, {"seconds": spent + seconds})
    tail = ""
    if code != 0:
        lines = RunDir(run.folder).compare_log.read_text().strip().splitlines()
        tail = lines[-1] if lines else f"exit status {code}"
    return run, code == 0, seconds, tail


def run_suite(suite: Suite, jobs: int = 1, log: Any = print) -> list[str]:
    """Run every unfinished run, ``jobs`` at a time; return the failures' one-line reasons."""
    todo = [r for r in runs(suite) if r.status != "done"]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    failures: list[str] = []
    log(f"{suite.path}: {len(runs(suite)) - len(todo)} runs done, {len(todo)} to run "
        f"({jobs} at a time)")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_execute, suite, run, threads) for run in todo]
        for done, future in enumerate(futures, 1):
            run, ok, seconds, tail = future.result()
            name = f"{run.variant.label} seed {run.seed}"
            log(f"[{done}/{len(todo)}] {name}: {'done' if ok else 'FAILED'} in {seconds:.0f} s"
                + ("" if ok else f": {tail} (log: {RunDir(run.folder).compare_log})"))
            if not ok:
                failures.append(f"{name}: {tail}")
    return failures


def carry(suite: Suite, summary_file: str | Path) -> tuple[int, list[str]]:
    """Write the finished runs of an earlier summary of this suite (another checkout's, e.g. a
    committed benchmarks/results/compare/*.json) into their run folders, so that the suite
    trains only the rest: a row is carried where its run's folder holds nothing yet and the row
    names the same base config and the same settings (overrides and seed). Its results.json
    holds the row's metrics and ``carried_from``; its time stays the row's. The rows trust the
    summary for everything the settings do not say (the code version, the machine). Returns the
    runs carried and one line for each row not carried."""
    path = Path(summary_file)
    if not path.is_file():
        raise ConfigError(f"--carry {path}: no such file; give the summary.json of an earlier "
                          "compare of this suite (e.g. benchmarks/results/compare/NAME.json)")
    try:
        summary = json.loads(path.read_text())
        rows, base = list(summary["runs"]), Path(str(summary["base"])).name
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"--carry {path}: not a compare summary ({error.__class__.__name__}: "
                          f"{error}); give a summary.json written by softtriple compare") from error
    if base != suite.base.name:
        raise ConfigError(f"--carry {path}: its runs were made from {base}, this suite's from "
                          f"{suite.base.name}; carry only a summary of the same suite")
    by_key = {(run.variant.label, run.seed): run for run in runs(suite)}
    carried, skipped = 0, []
    for row in rows:
        name = f"{row.get('variant')} seed {row.get('seed')}"
        run = by_key.get((row.get("variant"), row.get("seed")))
        if run is None:
            skipped.append(f"{name}: not a run of this suite")
        elif row.get("settings") != run_settings(suite, run):
            skipped.append(f"{name}: " + ("the summary does not record its settings"
                                          if "settings" not in row else "its settings differ"))
        elif run.folder.exists() and any(run.folder.iterdir()):
            skipped.append(f"{name}: its folder is not empty ({run.status})")
        else:
            run.folder.mkdir(parents=True, exist_ok=True)
            if row.get("seconds") is not None:
                write_json(run.folder / "compare.json", {"seconds": row["seconds"]})
            write_json(RunDir(run.folder).results,
                       {"metrics": {**row["metrics"], "kmeans": row.get("kmeans")},
                        "carried_from": str(path)})
            carried += 1
    return carried, skipped


# ----------------------------------------------------------------------------- summary
def _t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def _stats(values: Sequence[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": len(array),
            "values": [float(v) for v in array]}


def summarize(suite: Suite) -> dict[str, Any]:
    """summary.json (every run's metrics and per-variant statistics), summary.md and plots."""
    rows: list[dict[str, Any]] = []
    variants: dict[str, Any] = {}
    for v in suite.variants:
        per_metric: dict[str, list[float]] = {}
        seeds, seconds = [], 0.0
        for run in runs(suite):
            if run.variant is not v or run.status != "done":
                continue
            results = RunDir(run.folder).read_results()
            metrics = {k: float(x) for k, x in results["metrics"].items()
                       if isinstance(x, int | float) and k not in NOT_METRICS}
            timing = run.folder / "compare.json"
            run_seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
            seconds += run_seconds or 0.0
            rows.append({"variant": v.label, "seed": run.seed, "run": str(run.folder),
                         "seconds": run_seconds, "metrics": metrics,
                         "kmeans": results["metrics"].get("kmeans"),
                         "settings": run_settings(suite, run),
                         **({"carried_from": results["carried_from"]}
                            if "carried_from" in results else {})})
            seeds.append(run.seed)
            for key, value in metrics.items():
                per_metric.setdefault(key, []).append(value)
        variants[v.label] = {"group": v.group, "x": v.x, "seeds": seeds, "seconds": seconds,
                             "metrics": {k: _stats(x) for k, x in per_metric.items()}}
    paired = []
    for a, b in suite.paired:
        by_seed = {(r["variant"], r["seed"]): r["metrics"] for r in rows}
        common = [s for s in suite.seeds if (a, s) in by_seed and (b, s) in by_seed]
        for metric in ("recall@1", "map_at_r", "nmi"):
            diffs = [by_seed[(a, s)][metric] - by_seed[(b, s)][metric] for s in common
                     if metric in by_seed[(a, s)] and metric in by_seed[(b, s)]]
            if not diffs:
                continue
            stats = _stats(diffs)
            half = (_t_quantile_975(len(diffs) - 1) * stats["std"] / math.sqrt(len(diffs))
                    if len(diffs) > 1 else float("nan"))
            paired.append({"a": a, "b": b, "metric": metric, **stats,
                           "ci95": [stats["mean"] - half, stats["mean"] + half]})
    summary = {"suite": str(suite.path), "base": str(suite.base), "seeds": suite.seeds,
               "variants": variants, "paired": paired, "runs": rows}
    suite.out.mkdir(parents=True, exist_ok=True)
    write_json(suite.out / "summary.json", summary)
    write_text(suite.out / "summary.md", summary_markdown(summary))
    from softtriple.analysis.compare_plots import plot_summary
    plot_summary(summary, suite.out / "plots")
    return summary


def metric_order(summary: dict[str, Any]) -> list[str]:
    keys = {k for v in summary["variants"].values() for k in v["metrics"]}
    preferred = ["recall@1", "recall@2", "recall@4", "recall@8", "recall@10", "recall@100",
                 "precision_at_1", "r_precision", "map_at_r", "nmi", "ami",
                 "effective_centers"]
    return [k for k in preferred if k in keys] + sorted(keys - set(preferred))


def summary_markdown(summary: dict[str, Any]) -> str:
    """One table: a row per variant, a column per metric (mean +- std over seeds, the best mean
    of each metric in bold), the number of seeds and the total wall time."""
    metrics = metric_order(summary)
    best = {}
    for m in metrics:
        means = [v["metrics"][m]["mean"] for v in summary["variants"].values()
                 if m in v["metrics"]]
        if means and m not in LOWER_IS_BETTER:
            best[m] = max(means)
    head = ["variant", *metrics, "seeds", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, v in summary["variants"].items():
        cells = [label]
        for m in metrics:
            if m not in v["metrics"]:
                cells.append("")
                continue
            s = v["metrics"][m]
            digits = 2 if m == "effective_centers" else 3
            text = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
            cells.append(f"**{text}**" if best.get(m) == s["mean"] else text)
        cells += [str(len(v["seeds"])), f"{v['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    out = [f"Suite `{summary['suite']}`, base config `{summary['base']}`: mean ± sample std "
           f"over seeds; the best mean of each metric in bold.", "", *lines]
    if summary["paired"]:
        out += ["", "Paired differences (same seed), mean and 95% t-interval:", "",
                "| a - b | metric | mean | 95% interval | seeds |", "|---|---|---:|---:|---:|"]
        for p in summary["paired"]:
            out.append(f"| {p['a']} - {p['b']} | {p['metric']} | {p['mean']:+.4f} | "
                       f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] | {p['n']} |")
    kmeans = {r["kmeans"] for r in summary["runs"] if r.get("kmeans")}
    if kmeans:
        out += ["", f"NMI/AMI clustering: {'; '.join(sorted(kmeans))}."]
    return "\n".join(out) + "\n"
