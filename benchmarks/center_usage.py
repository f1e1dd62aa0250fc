"""RQ2, why: how the multi-center runs of a compare suite use their centers
(softtriple.analysis.centers.center_usage on each finished SoftTriple / HardTriple run).

    .venv/bin/python benchmarks/center_usage.py runs/compare/emoji_head --out NAME

Writes benchmarks/results/center_usage_NAME.json; docs/RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from softtriple.analysis.centers import center_usage
from softtriple.atomic import write_json

KEYS = ("effective_centers", "centers_winning_none", "winning_centers_per_class",
        "busiest_center_share", "examples_per_class")


def by_variant(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Each variant's (the run folder's parent's name) mean over its seeds of each figure."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(Path(row["run"]).parent.name, []).append(row)
    return {name: {"seeds": len(group), **{key: statistics.mean(r[key] for r in group)
                                           for key in KEYS}}
            for name, group in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite_out", type=Path, help="a compare suite's out folder")
    parser.add_argument("--out", required=True, help="results name (e.g. emoji_head)")
    args = parser.parse_args()
    rows = []
    for run in sorted(args.suite_out.glob("*/seed*")):
        if (run / "results.json").is_file():
            usage = center_usage(run)
            if usage is not None:
                rows.append(usage)
                print(usage, flush=True)
    path = Path(__file__).parent / "results" / f"center_usage_{args.out}.json"
    write_json(path, {"suite": str(args.suite_out), "by_variant": by_variant(rows), "rows": rows,
                      "command": f".venv/bin/python benchmarks/center_usage.py "
                                 f"{args.suite_out} --out {args.out}"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
