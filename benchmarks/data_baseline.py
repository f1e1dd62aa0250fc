"""Raw-pixel retrieval baseline of the built-in data sets: Recall@1/2/4/8 and MAP@R of nearest
neighbours on raw pixels (images resized to SIZE x SIZE grey, centered, unit-normalized) over the
held-out classes. Any learned embedding should beat it.

    .venv/bin/python benchmarks/data_baseline.py [NAME ...]

Writes benchmarks/results/data_baseline.json; docs/DATA.md quotes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from softtriple.atomic import write_json
from softtriple.data.baseline import raw_pixels
from softtriple.data.builtin import BUILTINS, default_root, prepared
from softtriple.data.formats import read_folder
from softtriple.evaluation import evaluate

SIZE = 32
RESULTS = Path(__file__).parent / "results" / "data_baseline.json"


def main() -> None:
    names = sys.argv[1:] or [n for n in BUILTINS if prepared(n)]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in names:
        manifest = prepared(name)
        if manifest is None:
            print(f"{name}: not prepared (softtriple data prepare {name})")
            continue
        table = read_folder(default_root() / name, BUILTINS[name].train_fraction).split("test")
        metrics = evaluate(raw_pixels(table.paths, SIZE), table.labels,
                           metrics=("recall", "map_at_r"))
        results[name] = {"test_images": len(table), "test_classes": len(set(table.labels)),
                         "pixels": f"{SIZE}x{SIZE} grey", **metrics}
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    write_json(RESULTS, results)


if __name__ == "__main__":
    main()
