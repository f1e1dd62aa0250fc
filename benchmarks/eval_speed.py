"""Evaluation speed and peak memory: softtriple.evaluation.evaluate against
pytorch-metric-learning's AccuracyCalculator, on random clustered data shaped like the
CUB-200-2011, Cars196 and Stanford Online Products test sets.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py [--only sop] [--repeats 5]

Warm (the headline): both tools in one process, one warm-up call each (the peer's first call
pays one-off set-up), then ``--repeats`` calls of each, interleaved, and the median of each.
The floor: this machine's fastest way to the same neighbours without our selection, timed
interleaved with both tools: the full (N x N) similarity product by each BLAS on the machine
(torch's, numpy's, faiss's exact search with the same k), plus one torch top-k of its rows; the
fastest of them. "ours bf16" is ours with the bf16 engine (evaluation/bf16.py) named, timed
with the others; its metrics must equal ours exactly. Cold: one call in a fresh process per
tool, with its peak RSS. The same
retrieval metrics on both sides (precision@1, R-precision, MAP@R with k = the largest class;
ours adds Recall@1/2/4/8), and
the benchmark checks that they agree within 1e-4. Writes benchmarks/results/eval_speed.json, which
docs/PERFORMANCE.md quotes, with the conditions (CPU, BLAS, threads, load before and after;
benchmarks/conditions.py); it refuses to run on a busy machine unless ``--noisy``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from conditions import Conditions

from softtriple.atomic import write_json

SHAPES = {  # name: (images, dim, classes, min images per class, max images per class)
    "cub": (5924, 512, 100, 59, 60),
    "cars": (8131, 512, 98, 82, 83),
    "sop": (60502, 512, 11316, 2, 12),
}
RESULTS = Path(__file__).parent / "results" / "eval_speed.json"
PRODUCT_ROWS = 8192  # the bf16 anatomy times the product of this many query rows
PEER_NAMES = {"precision_at_1": "precision_at_1", "r_precision": "r_precision",
              "map_at_r": "mean_average_precision_at_r"}


def make_data(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered random embeddings (class mean + noise; Recall@1 about 0.75 at CUB size, as
    hard as a trained model's test set) with the data set's class sizes."""
    n, d, classes, lo, hi = SHAPES[name]
    rng = np.random.default_rng(seed)
    sizes = np.full(classes, lo)
    while sizes.sum() < n:  # hand out the remaining images to classes below the cap
        room = np.flatnonzero(sizes < hi)
        extra = min(n - sizes.sum(), len(room))
        sizes[rng.choice(room, size=extra, replace=False)] += 1
    labels = rng.permutation(np.repeat(np.arange(classes), sizes))
    means = rng.standard_normal((classes, d)).astype(np.float32)
    x = means[labels] + 3.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x, labels.astype(np.int64)


def tools(x: np.ndarray, y: np.ndarray) -> dict[str, Callable[[], dict[str, float]]]:
    """The two evaluations, ours with each engine that matters here, as calls on the same data."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from softtriple.evaluation import evaluate

    calc = AccuracyCalculator(include=list(PEER_NAMES.values()), k="max_bin_count",
                              device=torch.device("cpu"))

    def ours(backend: str = "auto") -> dict[str, float]:
        metrics = ["recall", "precision_at_1", "r_precision", "map_at_r"]
        return {k: float(v) for k, v in evaluate(x, y, metrics=metrics,
                                                 backend=backend).items()}  # type: ignore[arg-type]

    def peer() -> dict[str, float]:
        # the peer ranks by L2 distance: give it unit rows so both rank by cosine similarity
        xt = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
        return {k: float(v) for k, v in calc.get_accuracy(xt, torch.from_numpy(y)).items()}

    return {"ours": ours, "pml": peer,
            # the bf16 candidate pass with its exact float32 re-rank (evaluation/bf16.py)
            "ours bf16": lambda: ours("bf16"), "ours torch": lambda: ours("torch")}


def floors(x: np.ndarray, k: int) -> dict[str, Callable[[], Any]]:
    """The same neighbours by each BLAS here without our selection: the (N x N) product and one
    torch top-k of its rows (torch's MKL, numpy's OpenBLAS), and faiss's exact search."""
    import torch

    from softtriple.evaluation.engines import faiss_search

    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    xt = torch.from_numpy(xn)
    return {"torch matmul + topk": lambda: (xt @ xt.T).topk(k + 1, dim=1),
            "numpy matmul + topk": lambda: torch.from_numpy(xn @ xn.T).topk(k + 1, dim=1),
            # the kNN's own call of faiss, without its tie handling
            "faiss exact search": lambda: faiss_search(xn, xn, k + 1)}


def bf16_anatomy(x: np.ndarray, k: int) -> dict[str, Any]:
    """Where the bf16 engine's time goes: its bound against the largest error on these rows,
    the candidates per query and per block (the share of the gallery its exact re-rank must
    score), how many blocks fall back to the float32 path, and the bf16 product's time against
    the float32 one's (the most the engine can save; the first PRODUCT_ROWS queries against the
    whole gallery)."""
    import torch

    from softtriple.evaluation import bf16

    q = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    q16 = q.to(torch.bfloat16)
    beta = bf16.similarity_bound(q, q16, q, q16)
    rows = bf16.strip_rows(len(q))
    per_row, per_block, error = [], [], 0.0
    for a in range(0, len(q), rows):
        strip = (q16[a:a + rows] @ q16.T).float()
        error = max(error, float((strip - q[a:a + rows] @ q.T).abs().max()))
        strip[torch.arange(strip.shape[0]), torch.arange(a, a + strip.shape[0])] = -np.inf
        kth = strip.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        band = strip >= kth - 2 * beta
        per_row.append(band.sum(dim=1).float())
        per_block.append(float(band.any(dim=0).float().mean()))
    products = {}
    timed_rows = min(len(q), PRODUCT_ROWS)  # SOP's whole product would not fit in memory
    for name, (left, right) in {"bf16": (q16, q16), "float32": (q, q)}.items():
        left[:timed_rows] @ right.T
        start = time.perf_counter()
        left[:timed_rows] @ right.T
        products[name] = time.perf_counter() - start
    return {"k": k, "bound": beta, "largest_error": error, "block_rows": rows,
            "product_rows": timed_rows,
            "candidates_per_query": float(torch.cat(per_row).mean()),
            "block_union_share": statistics.mean(per_block),
            "blocks_falling_back": sum(s > bf16.FALLBACK_SHARE for s in per_block) /
            len(per_block), "product_seconds": products}


def product_topk(q: Any, x: Any, k: int, block_bytes: int = 2**31) -> tuple[Any, Any]:
    """torch's (m, d) x (d, N) product and one top-k per row, in blocks of query rows whose
    product stays under ``block_bytes`` (8,192 x 1,000,000 in one piece is 32 GB): the
    float32 floor of a gallery search. Returns the (m, k) similarities and indices."""
    import torch

    step = max(1, block_bytes // (4 * len(x)))
    parts = [(q[i:i + step] @ x.T).topk(k, dim=1) for i in range(0, len(q), step)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def million(rows: int, queries: int, k: int, cap: float) -> dict[str, Any]:
    """The exact kNN of a million-row gallery (``rows`` x 128, clustered as make_data's, classes
    of 10), for its first ``queries`` rows as queries (the whole self-search takes 1,000 times
    the product of CUB's test set: hours on 2 cores, so it is projected, not run): ours (auto),
    ours with the bf16 engine, faiss's exact search and torch's product + top-k, in this order,
    each timed once after a warm-up on a tenth of the queries; a tool whose warm-up, scaled to
    the whole block, would pass ``cap`` seconds is not run. The neighbours of ours and ours bf16
    must equal faiss's up to ties (the similarities at every rank equal)."""
    import torch

    from softtriple.evaluation import knn
    from softtriple.evaluation.engines import faiss_search
    from softtriple.evaluation.knn import cpu_engine

    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(rows // 10 + 1), 10)[:rows])
    means = rng.standard_normal((labels.max() + 1, 128)).astype(np.float32)
    x = means[labels] + 1.6 * rng.standard_normal((rows, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, xt = x[:queries], torch.from_numpy(x)
    calls: dict[str, Callable[[np.ndarray], Any]] = {
        "ours": lambda a: knn(a, k, x),
        "ours bf16": lambda a: knn(a, k, x, backend="bf16"),
        "faiss exact search": lambda a: faiss_search(a, x, k),
        "torch matmul + topk": lambda a: product_topk(torch.from_numpy(a), xt, k)}
    out: dict[str, Any] = {"rows": rows, "dim": 128, "queries": queries, "k": k, "cap": cap,
                           "tools": {}}
    found = {}
    cpu_engine()  # the auto engine's one-off probe, outside the timings
    for name, call in calls.items():
        start = time.perf_counter()
        call(q[:max(1, queries // 10)])
        projected = (time.perf_counter() - start) * 10
        if projected > cap:
            out["tools"][name] = {"seconds": None, "warm_up_projected_seconds": projected}
            continue
        start = time.perf_counter()
        result = call(q)
        seconds = time.perf_counter() - start
        found[name] = np.asarray(result[0], dtype=np.float32)
        out["tools"][name] = {"seconds": seconds,
                              "self_search_projected_seconds": seconds * rows / queries}
        print(f"million {name}: {seconds:.2f} s for {queries} queries", flush=True)
    if "faiss exact search" in found:
        for name in ("ours", "ours bf16"):
            if name in found and not np.allclose(found[name], found["faiss exact search"],
                                                 atol=1e-5):
                raise AssertionError(f"{name}'s neighbours differ from faiss's exact search")
    timed = {name: v["seconds"] for name, v in out["tools"].items() if v["seconds"] is not None}
    floor = {name: s for name, s in timed.items() if name not in ("ours", "ours bf16")}
    if floor:
        out["floor"] = min(floor, key=floor.__getitem__)
        for name in ("ours", "ours bf16"):
            if name in timed:
                out["tools"][name]["floor_ratio"] = timed[name] / floor[out["floor"]]
    return out


def warm(x: np.ndarray, y: np.ndarray, repeats: int) -> dict[str, Any]:
    """Median seconds of each tool and floor after one warm-up call, calls interleaved in this
    process (the floors only where the N x N product fits in memory)."""
    from softtriple.evaluation.knn import cpu_engine
    from softtriple.evaluation.metrics import required_k

    calls: dict[str, Callable[[], Any]] = dict(tools(x, y))
    torch_path = calls.pop("ours torch")  # the bf16 engine's oracle, not timed
    if len(x) ** 2 * 4 < 2**31:
        calls.update(floors(x, required_k(y, (1, 2, 4, 8))))
    metrics = {name: call() for name, call in calls.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    # exact: the same neighbours, the same numbers as the float32 path it re-ranks with (torch's
    # product; auto's engine may be numpy's or faiss's, whose rounding can order near-ties apart)
    reference = metrics["ours"] if cpu_engine() == "torch" else torch_path()
    if metrics["ours bf16"] != reference:
        raise AssertionError(f"the bf16 engine's metrics {metrics['ours bf16']} differ from "
                             f"the float32 torch path's {reference}")
    for ours_key, peer_key in PEER_NAMES.items():
        # the peer ranks by L2 distance in float32 (faiss), we by the dot product: rounding
        # may swap a few near-tied neighbours (one swap moves R-precision by 1 / (N R))
        if abs(metrics["ours"][ours_key] - metrics["pml"][peer_key]) > 1e-4:
            raise AssertionError(f"{ours_key}: ours {metrics['ours'][ours_key]} != peer "
                                 f"{metrics['pml'][peer_key]}")
    return {name: {"seconds": statistics.median(t), "all_seconds": t,
                   **({"metrics": metrics[name]} if name in ("ours", "pml", "ours bf16")
                      else {})}
            for name, t in times.items()}


def child(tool: str, path: str) -> None:
    """Run one evaluation in this fresh process; print its time and peak RSS as JSON."""
    data = np.load(path)
    call = tools(data["x"], data["y"])[tool]
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large
    # benchmark process would report its parent's peak
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) * 1024  # kB
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))


def cold(x: np.ndarray, y: np.ndarray, tool: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, x=x, y=y)
        out = subprocess.run([sys.executable, __file__, "--child", tool, path],
                             check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted([*SHAPES, "million"]), action="append",
                        help="run only these shapes (repeatable); 'million': a block of queries "
                             "against a 1,000,000 x 128 gallery, time-capped (not by default)")
    parser.add_argument("--million", nargs=2, type=int, default=[1_000_000, 8192],
                        metavar=("ROWS", "QUERIES"), help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, default=300.0,
                        help="seconds: the million-row shape skips a tool projected past this")
    parser.add_argument("--repeats", type=int, default=5, help="warm calls per tool (median)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--noisy", action="store_true",
                        help="run on a busy machine anyway; the results are marked noisy")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import faiss  # noqa: F401  (loaded before the conditions record its BLAS)
    import pytorch_metric_learning  # noqa: F401
    import torch  # noqa: F401

    from softtriple.evaluation.knn import cpu_engine
    from softtriple.evaluation.metrics import required_k

    conditions = Conditions.start(allow_noisy=args.noisy)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    def report(final: bool) -> None:
        """The results so far (a later shape that fails leaves the earlier ones written)."""
        write_json(args.json, {
            "conditions": {**conditions.finish(), "complete": final},
            "knn_engine": cpu_engine(),
            "command": " ".join(["OMP_WAIT_POLICY=PASSIVE .venv/bin/python", *sys.argv]),
            "repeats": args.repeats, "rows": rows, **extra})

    for name in args.only or list(SHAPES):
        if name == "million":
            gallery_rows, queries = args.million
            extra["million"] = million(gallery_rows, queries, k=8, cap=args.cap)
            report(final=False)
            continue
        x, y = make_data(name)
        row: dict[str, Any] = {"shape": name, "n": len(x), "dim": x.shape[1],
                               "classes": int(y.max() + 1), "warm": warm(x, y, args.repeats),
                               "bf16": bf16_anatomy(x, required_k(y, (1, 2, 4, 8))),
                               "cold": {tool: cold(x, y, tool) for tool in ("ours", "pml")}}
        for kind in ("warm", "cold"):
            row[f"{kind}_time_ratio"] = (row[kind]["ours"]["seconds"]
                                         / row[kind]["pml"]["seconds"])
        row["cold_memory_ratio"] = (row["cold"]["ours"]["peak_rss_bytes"]
                                    / row["cold"]["pml"]["peak_rss_bytes"])
        floor = {key: value for key, value in row["warm"].items()
                 if key not in ("ours", "pml", "ours bf16")}
        if floor:
            fastest = min(floor, key=lambda key: floor[key]["seconds"])
            row["floor"] = {"fastest": fastest, "seconds": floor[fastest]["seconds"]}
            row["floor_ratio"] = row["warm"]["ours"]["seconds"] / floor[fastest]["seconds"]
            row["bf16_floor_ratio"] = (row["warm"]["ours bf16"]["seconds"]
                                       / floor[fastest]["seconds"])
        row["bf16_time_ratio"] = row["warm"]["ours bf16"]["seconds"] / row["warm"]["pml"]["seconds"]
        rows.append(row)
        gib = 2**30
        floor_text = (f" | floor ({row['floor']['fastest']}) {row['floor']['seconds']:.2f} s, "
                      f"ours x{row['floor_ratio']:.2f}" if floor else "")
        print(f"{name:>5} warm: ours {row['warm']['ours']['seconds']:6.2f} s, pml "
              f"{row['warm']['pml']['seconds']:6.2f} s, x{row['warm_time_ratio']:.2f}{floor_text}"
              f" | cold: ours {row['cold']['ours']['seconds']:6.2f} s "
              f"{row['cold']['ours']['peak_rss_bytes'] / gib:.2f} GiB, pml "
              f"{row['cold']['pml']['seconds']:6.2f} s "
              f"{row['cold']['pml']['peak_rss_bytes'] / gib:.2f} GiB, "
              f"x{row['cold_time_ratio']:.2f}",
              flush=True)
        report(final=False)
    report(final=True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
