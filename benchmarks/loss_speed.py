"""SoftTriple forward + backward speed and memory against pytorch-metric-learning's SoftTripleLoss
(with its SparseCentersRegularizer where it fits in memory), the three same-shape matrix products
the step cannot avoid (the floor), and SoftMax-norm of the same batch. Every method runs in its own
process so that peak memory is its own; times are medians after warm-up.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/loss_speed.py [--json FILE]

Writes benchmarks/results/loss_speed.json; docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from conditions import Conditions

from softtriple.atomic import write_json

CONFIGS = [(32, 64, 100, 10), (256, 512, 100, 10), (256, 512, 11318, 10)]  # (B, d, C, K)
PEER_REGULARIZER_MAX_CLASSES = 2000  # its CK x CK masks: 51 GB of float32 at C = 11,318
RESULTS = Path(__file__).parent / "results" / "loss_speed.json"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_step(method: str, b: int, d: int, c: int, k: int,
              device: str | torch.device = "cpu") -> Callable[[], None]:
    """One forward + backward of ``method`` on a fixed random batch (drawn on the CPU, then moved
    to ``device``; benchmarks/gpu.py times the same steps on a GPU)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    if method in ("floor", "floor_numpy"):  # the three (B, d) x (d, CK) products of any step,
        w = torch.randn(c * k, d, generator=g).to(device)  # by torch's BLAS or numpy's
        grad = torch.randn(b, c * k, generator=g).to(device)
        if method == "floor_numpy":
            xn, wn, gn = x.detach().numpy(), w.numpy(), grad.numpy()

            def numpy_step() -> None:
                xn @ wn.T
                gn @ wn
                gn.T @ xn
            return numpy_step

        def products() -> None:
            x.detach() @ w.T
            grad @ w
            grad.T @ x.detach()
        return products
    if method.startswith("ours"):
        from softtriple.losses import SoftMaxNormLoss, SoftTripleLoss
        tau = 0.2 if method == "ours_tau0.2" else 0.0
        loss_fn: torch.nn.Module = (SoftMaxNormLoss(c, d) if method == "ours_softmax_norm"
                                    else SoftTripleLoss(c, d, k, tau=tau,
                                                        compiled=method == "ours_compiled"))
    else:
        from pytorch_metric_learning import losses, regularizers
        if method == "pml_tau0.2":
            reg = regularizers.SparseCentersRegularizer(c, k)
            loss_fn = losses.SoftTripleLoss(c, d, k, weight_regularizer=reg, weight_reg_weight=0.2)
        else:
            loss_fn = losses.SoftTripleLoss(c, d, k)
    loss_fn = loss_fn.to(device)

    def step() -> None:
        x.grad = None
        for p in loss_fn.parameters():
            p.grad = None
        loss_fn(x, y).backward()
    return step


def child(method: str, config: tuple[int, int, int, int], reps: int) -> None:
    torch.manual_seed(0)
    step = make_step(method, *config)
    base = _rss()
    for _ in range(3):  # warm-up (and, for the compiled path, its one-off compile)
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": statistics.median(times), "peak_rss_bytes": peak,
                      "step_memory_bytes": peak - base}))


def measure(method: str, config: tuple[int, int, int, int], reps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method,
                          ",".join(map(str, config)), str(reps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--noisy", action="store_true", help="run on a busy machine anyway")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, config, reps = args.child
        b, d, c, k = (int(v) for v in config.split(","))
        child(method, (b, d, c, k), int(reps))
        return
    import pytorch_metric_learning  # noqa: F401  (its version goes into the conditions)

    conditions = Conditions.start(allow_noisy=args.noisy)
    rows = []
    for config in CONFIGS:
        b, d, c, k = config
        methods = ["floor", "floor_numpy", "ours_tau0", "ours_compiled", "ours_tau0.2",
                   "ours_softmax_norm", "pml_tau0"]
        if c <= PEER_REGULARIZER_MAX_CLASSES:
            methods.append("pml_tau0.2")
        result = {m: measure(m, config, args.reps) for m in methods}
        row: dict = {"B": b, "d": d, "C": c, "K": k, "methods": result}
        # the floor: the faster BLAS of the machine for the three products
        floor = min(result["floor"]["seconds"], result["floor_numpy"]["seconds"])
        row["floor_blas"] = ("torch" if result["floor"]["seconds"] <= floor else "numpy")
        row["ours_tau0_over_floor"] = result["ours_tau0"]["seconds"] / floor
        row["ours_compiled_over_floor"] = result["ours_compiled"]["seconds"] / floor
        row["pml_tau0_over_ours_tau0"] = (result["pml_tau0"]["seconds"]
                                          / result["ours_tau0"]["seconds"])
        row["ours_tau0_memory_over_pml_tau0"] = (result["ours_tau0"]["step_memory_bytes"]
                                                 / result["pml_tau0"]["step_memory_bytes"])
        if "pml_tau0.2" in result:
            row["pml_tau0.2_over_ours_tau0.2"] = (result["pml_tau0.2"]["seconds"]
                                                  / result["ours_tau0.2"]["seconds"])
        rows.append(row)
        print(f"B={b} d={d} C={c} K={k}")
        for m, r in result.items():
            print(f"  {m:<18} {r['seconds'] * 1e3:9.2f} ms  x{r['seconds'] / floor:5.2f} floor  "
                  f"step memory {r['step_memory_bytes'] / 2**20:8.1f} MiB")
        print(f"  ours/floor {row['ours_tau0_over_floor']:.2f}  "
              f"compiled/floor {row['ours_compiled_over_floor']:.2f}  "
              f"pml/ours {row['pml_tau0_over_ours_tau0']:.2f}  "
              f"memory ours/pml {row['ours_tau0_memory_over_pml_tau0']:.2f}", flush=True)
    report = {"conditions": conditions.finish(),
              "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/loss_speed.py",
              "rows": rows}
    write_json(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
