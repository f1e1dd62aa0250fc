"""Evaluation speed and peak memory: softtriple.evaluation.evaluate against
pytorch-metric-learning's AccuracyCalculator, each in its own process, on random data shaped like
the CUB-200-2011, Cars196 and Stanford Online Products test sets.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py [--only sop] [--no-nmi]

Writes benchmarks/results/eval_speed.json; docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from softtriple.atomic import write_json

SHAPES = {  # name: (images, dim, classes, min images per class, max images per class)
    "cub": (5924, 512, 100, 59, 60),
    "cars": (8131, 512, 98, 82, 83),
    "sop": (60502, 512, 11316, 2, 12),
}
RESULTS = Path(__file__).parent / "results" / "eval_speed.json"


def make_data(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered random embeddings (class mean + noise) with the data set's class sizes."""
    n, d, classes, lo, hi = SHAPES[name]
    rng = np.random.default_rng(seed)
    sizes = np.full(classes, lo)
    while sizes.sum() < n:  # hand out the remaining images to classes below the cap
        room = np.flatnonzero(sizes < hi)
        extra = min(n - sizes.sum(), len(room))
        sizes[rng.choice(room, size=extra, replace=False)] += 1
    labels = rng.permutation(np.repeat(np.arange(classes), sizes))
    means = rng.standard_normal((classes, d)).astype(np.float32)
    x = means[labels] + 1.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x, labels.astype(np.int64)


def child(tool: str, path: str, nmi: bool) -> None:
    """Run one evaluation in this process and print its time and peak RSS as JSON."""
    import torch

    data = np.load(path)
    x, y = data["x"], data["y"]
    start = time.perf_counter()
    if tool == "ours":
        from softtriple.evaluation import evaluate
        metrics = ["recall", "precision_at_1", "r_precision", "map_at_r"] + (["nmi"] if nmi else [])
        result = evaluate(x, y, metrics=metrics)
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        include = ["precision_at_1", "r_precision", "mean_average_precision_at_r"]
        calc = AccuracyCalculator(include=include + (["NMI"] if nmi else []),
                                  k="max_bin_count", device=torch.device("cpu"))
        # the peer ranks by L2 distance: give it unit rows so both rank by cosine similarity
        xt = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
        result = calc.get_accuracy(xt, torch.from_numpy(y))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak,
                      "metrics": {k: float(v) for k, v in result.items()}}))


def run_child(tool: str, path: str, nmi: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", tool, path]
                         + ([] if nmi else ["--no-nmi"]),
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SHAPES), action="append",
                        help="run only these shapes (repeatable)")
    parser.add_argument("--no-nmi", action="store_true", help="leave NMI (k-means) out")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], not args.no_nmi)
        return
    import pytorch_metric_learning
    import torch

    rows = []
    for name in args.only or list(SHAPES):
        x, y = make_data(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "data.npz")
            np.savez(path, x=x, y=y)
            for nmi in ([False] if args.no_nmi else [False, True]):
                ours, peer = run_child("ours", path, nmi), run_child("pml", path, nmi)
                row = {"shape": name, "n": len(x), "dim": x.shape[1], "classes": int(y.max() + 1),
                       "nmi": nmi, "ours": ours, "pml": peer,
                       "time_ratio_ours_over_pml": ours["seconds"] / peer["seconds"],
                       "memory_ratio_ours_over_pml":
                           ours["peak_rss_bytes"] / peer["peak_rss_bytes"]}
                rows.append(row)
                gib = 2**30
                print(f"{name:>5} nmi={nmi!s:<5} ours {ours['seconds']:7.1f} s "
                      f"{ours['peak_rss_bytes'] / gib:5.2f} GiB | pml {peer['seconds']:7.1f} s "
                      f"{peer['peak_rss_bytes'] / gib:5.2f} GiB | "
                      f"time x{row['time_ratio_ours_over_pml']:.2f} "
                      f"memory x{row['memory_ratio_ours_over_pml']:.2f}", flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "pytorch_metric_learning": pytorch_metric_learning.__version__,
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
              "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py",
              "rows": rows}
    write_json(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
