"""Does the kNN's engine probe pick the engine that is fastest at the sizes users search?

``backend="auto"`` ranks the engines (torch, numpy, faiss, bf16) once per machine by one search
of ``knn.PROBE`` random rows (evaluation/engines.py) and uses the first for every large CPU
search. This times ``knn(x, k, backend=engine)`` for each engine at the probe's own shape, the
former probe's (3,072 rows), and at the self-searches of CUB's and Cars' test sets (clustered
rows as eval_speed.py makes them, k = the largest class, as ``evaluate`` asks) and of a
16,384-row set, in the probe's manner (each engine's calls consecutive: a BLAS whose threads
spin after its product slows the next engine's work, a cost that belongs to it), in two rounds
of opposite engine order, and reports each engine's median per size, the engine the probe
ranks first here (``engines.rank``: a near-tie stays with torch), and what that choice
costs at each size against the fastest.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/knn_engines.py [--repeats 3]

Writes benchmarks/results/knn_engines.json with the conditions (benchmarks/conditions.py);
refuses a busy machine unless ``--noisy``. ``--tiny``: toy sizes, to check the script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from conditions import Conditions
from eval_speed import make_data

from softtriple.atomic import write_json
from softtriple.evaluation.engines import Engine, available, rank
from softtriple.evaluation.knn import PROBE, measure_engines, probe_rows, search_seconds
from softtriple.evaluation.metrics import required_k

RESULTS = Path(__file__).parent / "results" / "knn_engines.json"


def cases(tiny: bool) -> dict[str, tuple[np.ndarray, int]]:
    """name: (rows, k) of each search timed; the probe's own first."""
    rows, width, k = PROBE
    if tiny:
        rows, width = 256, 16
    out = {f"probe ({rows} random rows, k {k})": (probe_rows(rows, width).numpy(), k)}
    if not tiny:  # the probe of earlier versions, which ranked the engines otherwise here
        out["former probe (3072 random rows, k 32)"] = (probe_rows(3072, width).numpy(), 32)
    for name in ("cub", "cars"):
        x, y = make_data(name)
        if tiny:
            x, y = x[:300, :16], y[:300]
        out[f"{name} ({len(x)} rows)"] = (x, required_k(y, (1, 2, 4, 8)))
    wide, _ = make_data("sop")
    size = 512 if tiny else 16384
    out[f"{size} rows (SOP-like)"] = (wide[:size, :16] if tiny else wide[:size], 32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine a round")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: check the script")
    parser.add_argument("--noisy", action="store_true",
                        help="run on a busy machine anyway; the results are marked noisy")
    args = parser.parse_args()
    conditions = Conditions.start(allow_noisy=args.noisy or args.tiny)
    engines: list[Engine] = list(available())
    probe = measure_engines()  # the probe itself, as auto runs it (not its cache)
    ranked = rank(probe)
    out: dict[str, Any] = {"command": " ".join(["OMP_WAIT_POLICY=PASSIVE .venv/bin/python",
                                                *sys.argv]),
                           "probe_seconds": probe, "probe_pick": ranked[0], "sizes": {}}
    for name, (x, k) in cases(args.tiny).items():
        times: dict[Engine, list[float]] = {engine: [] for engine in engines}
        for order in (engines, engines[::-1]):
            for engine in order:
                times[engine] += search_seconds(x, k, engine, args.repeats)
        median = {engine: statistics.median(t) for engine, t in times.items()}
        fastest = min(median, key=median.__getitem__)
        out["sizes"][name] = {
            "rows": len(x), "dim": x.shape[1], "k": k, "seconds": median, "all_seconds": times,
            "fastest": fastest, "probe_pick_over_fastest": median[ranked[0]] / median[fastest],
            "torch_over_fastest": median["torch"] / median[fastest]}
        print(f"{name}: " + ", ".join(f"{e} {s:.3f}" for e, s in median.items())
              + f" s; fastest {fastest}, the probe's pick ({ranked[0]}) "
              f"x{median[ranked[0]] / median[fastest]:.2f}", flush=True)
        write_json(args.json, {"conditions": {**conditions.finish(), "complete": False}, **out})
    write_json(args.json, {"conditions": {**conditions.finish(), "complete": True}, **out})
    print("probe:", ", ".join(f"{e} {s:.3f}" for e, s in probe.items()), "s; wrote", args.json)


if __name__ == "__main__":
    main()
