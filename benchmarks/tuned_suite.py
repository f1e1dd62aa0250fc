"""From a tuning suite's summary, the suite that runs each method at its chosen settings.

    .venv/bin/python benchmarks/tuned_suite.py configs/compare/glyphs_finetune_tune.yaml \\
        runs/compare/glyphs_finetune_tune/summary.json configs/compare/glyphs_finetune_tuned.yaml

A tuning suite's variants are labelled "<method> lr=<lr> <key>=<value>" (one seed, a validation
split of the training classes). For each method the variant with the best validation Recall@1
is chosen (ties: the first in the suite's order); the new suite runs those settings on the test
classes (the tuning suite's ``set`` without ``data.validation_classes``) over ``--seeds``, with
every method paired against ``--anchor``, plus any ``--pair A,B``. The chosen variants and every
method's validation Recall@1 go into the new file's header, so that it says how it was made.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml

from softtriple.atomic import write_text


def method_of(label: str) -> str:
    """"Multi-similarity lr=0.001 batch=32" -> "Multi-similarity"."""
    return label.split(" lr=")[0]


def choose(suite: dict[str, Any], summary: dict[str, Any],
           metric: str = "recall@1") -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each method's best variant of the tuning suite, and one line per variant tried."""
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    lines, missing = [], []
    for variant in suite["variants"]:
        label = variant["label"]
        metrics = summary["variants"].get(label, {}).get("metrics", {})
        if metric not in metrics:
            missing.append(label)
            continue
        value = float(metrics[metric]["mean"])
        lines.append(f"{label}: validation {metric} {value:.3f}")
        method = method_of(label)
        if method not in best or value > best[method][0]:
            best[method] = (value, variant)
    if missing:
        raise SystemExit(f"the tuning suite is not finished: no {metric} for "
                         f"{', '.join(missing)}; run it (softtriple compare) and summarize again")
    return {method: variant for method, (_, variant) in best.items()}, lines


def merge(suite_path: Path, suite: dict[str, Any], summary: dict[str, Any],
          also: list[tuple[Path, dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any],
                                                                          dict[str, Any]]:
    """One tuning suite and summary from the first and the ``also`` ones: their variants in turn.
    Each must name the same base config (as a file) and the same common ``set``."""
    variants = list(suite["variants"])
    results = dict(summary["variants"])
    base = (suite_path.parent / suite["base"]).resolve()
    for path, other, other_summary in also:
        if (path.parent / other["base"]).resolve() != base:
            raise SystemExit(f"--also {path}: its base config is not {suite_path}'s "
                             f"({other['base']} against {suite['base']}); choose only among "
                             "runs of the same recipe")
        if other.get("set", []) != suite.get("set", []):
            raise SystemExit(f"--also {path}: its common settings differ from {suite_path}'s "
                             f"({other.get('set', [])} against {suite.get('set', [])})")
        twice = sorted({v["label"] for v in other["variants"]} & {v["label"] for v in variants})
        if twice:
            raise SystemExit(f"--also {path}: labels already tuned: {', '.join(twice)}")
        variants += other["variants"]
        results.update(other_summary["variants"])
    return {**suite, "variants": variants}, {**summary, "variants": results}


def tuned_suite(suite_path: Path, suite: dict[str, Any], chosen: dict[str, dict[str, Any]],
                lines: list[str], out_path: Path, seeds: list[int], anchor: str,
                pairs: list[list[str]], base: str | None = None,
                also: tuple[Path, ...] = ()) -> str:
    """The new suite file's text: a header naming its source and choices, then the YAML."""
    if anchor not in chosen:
        raise SystemExit(f"--anchor {anchor!r} is not a method of the tuning suite; "
                         f"methods: {', '.join(chosen)}")
    common = [s for s in suite.get("set", []) if not s.startswith("data.validation_classes")]
    base = base or os.path.relpath(suite_path.parent / suite["base"], out_path.parent)
    new = {"description": f"Every method of {suite_path.name} at the settings its tuning chose "
                          f"(best validation Recall@1), on the test classes of {Path(base).stem}"
                          f", {len(seeds)} seeds.",
           "base": base, "out": str(Path(suite["out"]).with_name(out_path.stem)),
           "seeds": seeds, "set": common,
           "variants": [{"label": method, "set": variant["set"]}
                        for method, variant in chosen.items()],
           "paired": [[method, anchor] for method in chosen if method != anchor] + pairs}
    sources = " and ".join(path.as_posix() for path in (suite_path, *also))
    header = [f"# generated by benchmarks/tuned_suite.py from {sources} (one seed, "
              f"a validation split of the training classes): each method at its best",
              "# validation Recall@1; the test classes were not read to choose. Chosen:"]
    header += [f"#   {variant['label']}" for variant in chosen.values()]
    header += ["# every variant tried:"] + [f"#   {line}" for line in lines]
    return "\n".join(header) + "\n" + yaml.safe_dump(new, sort_keys=False, width=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", type=Path, help="the tuning suite's YAML")
    parser.add_argument("summary", type=Path, help="its summary.json (softtriple compare)")
    parser.add_argument("out", type=Path, help="the tuned suite to write")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--base", help="another run config for the chosen settings (relative to "
                                       "OUT's folder), e.g. a data set too small to tune on")
    parser.add_argument("--anchor", default="SoftMax-norm", help="every method is paired with it")
    parser.add_argument("--pair", action="append", default=[], metavar="A,B",
                        help="another paired difference (repeatable)")
    parser.add_argument("--also", nargs=2, action="append", default=[], type=Path,
                        metavar=("SUITE", "SUMMARY"),
                        help="another tuning suite of the same recipe and its summary, whose "
                             "variants join the choice (repeatable)")
    args = parser.parse_args()
    also = [(path, yaml.safe_load(path.read_text()), json.loads(summary.read_text()))
            for path, summary in args.also]
    suite, summary = merge(args.suite, yaml.safe_load(args.suite.read_text()),
                           json.loads(args.summary.read_text()), also)
    chosen, lines = choose(suite, summary)
    text = tuned_suite(args.suite, suite, chosen, lines, args.out,
                       [int(s) for s in args.seeds.split(",")], args.anchor,
                       [pair.split(",") for pair in args.pair], args.base,
                       tuple(path for path, _, _ in also))
    write_text(args.out, text)
    print(f"wrote {args.out}: " + "; ".join(v["label"] for v in chosen.values()))


if __name__ == "__main__":
    main()
