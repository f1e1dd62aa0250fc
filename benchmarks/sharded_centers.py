"""Sharded against replicated SoftTriple centers under data parallelism: memory per process and
step time as the number of classes C grows, 2 gloo processes on this CPU (K = 10, d = 64, global
batch 64, a Linear embedding layer over random 64-d features).

- replicated: every rank holds all C K d centers inside DDP (SoftTripleLoss; DDP all-reduces
  their gradient every step), the only mode before ShardedSoftTripleLoss;
- sharded: each rank holds its block of C / 2 classes (ShardedSoftTripleLoss; DDP over the
  embedding layer only).

A step is forward, backward and Adam's update of model and centers (lr 0.01, as in training).
Memory is each process's peak resident set (VmHWM) minus its resident set after torch's set-up;
the time is the median of the timed steps after a warm-up step. A (mode, C) whose modelled memory
does not fit this machine is not started and is reported with its model (see
docs/PERFORMANCE.md).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sharded_centers.py

Writes benchmarks/results/sharded_centers.json; docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from softtriple.atomic import write_json

BATCH, DIM, K, PROCESSES = 64, 64, 10, 2
CLASSES = (10_000, 100_000, 300_000, 1_000_000)
STEPS = 3
RESULTS = Path(__file__).parent / "results" / "sharded_centers.json"
GIB = 2.0 ** 30


def modelled_gib(mode: str, classes: int, processes: int = PROCESSES, k: int = K,
                 dim: int = DIM) -> float:
    """Memory of the centers per process: weights, gradient and Adam's two moments (4 copies of
    float32); replicated DDP keeps one more copy in its gradient buckets."""
    copies = 5 if mode == "replicated" else 4
    per_rank = classes if mode == "replicated" else -(-classes // processes)
    return copies * 4 * per_rank * k * dim / GIB


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(mode: str, classes: int, out: Path) -> None:
    from softtriple import distributed as dist
    from softtriple.experiment.build import Objective
    from softtriple.losses import SoftTripleLoss
    from softtriple.losses.sharded_softtriple import ShardedSoftTripleLoss

    dist.setup(torch.device("cpu"))
    torch.set_num_threads(1)
    world, rank = dist.world_size(), dist.rank()
    base = _status("VmRSS")
    torch.manual_seed(0)
    layer = nn.Linear(DIM, DIM)
    if mode == "replicated":
        loss: nn.Module = SoftTripleLoss(classes, DIM, centers_per_class=K)
        objective: nn.Module = nn.parallel.DistributedDataParallel(Objective(layer, loss))
    else:
        loss = ShardedSoftTripleLoss(classes, DIM, centers_per_class=K)
        objective = Objective(nn.parallel.DistributedDataParallel(layer), loss)
    optimizer = torch.optim.Adam([{"params": layer.parameters(), "lr": 1e-4},
                                  {"params": loss.parameters(), "lr": 1e-2}], eps=0.01)
    generator = torch.Generator().manual_seed(1 + rank)
    local = BATCH // world
    times = []
    for step in range(STEPS + 1):
        features = torch.randn(local, DIM, generator=generator)
        labels = torch.randint(0, classes, (local,), generator=generator)
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        objective(features, labels).backward()
        optimizer.step()
        dist.barrier()
        if step:
            times.append(time.perf_counter() - start)
    peak = _status("VmHWM") - base
    rows = dist.gather({"peak_gib": peak / GIB, "step_s": statistics.median(times)})
    if dist.is_main():
        out.write_text(json.dumps({
            "mode": mode, "classes": classes, "processes": world,
            "peak_gib_per_process": max(r["peak_gib"] for r in rows),
            "step_s": max(r["step_s"] for r in rows),
            "modelled_gib_per_process": modelled_gib(mode, classes, world)}))
    dist.teardown()


def ratios(rows: list[dict]) -> list[dict]:
    """Sharded over replicated, memory and step time, for each class count both modes ran."""
    by = {(r["mode"], r["classes"]): r for r in rows if "step_s" in r}
    return [{"classes": c,
             "memory": by["sharded", c]["peak_gib_per_process"]
             / by["replicated", c]["peak_gib_per_process"],
             "step_time": by["sharded", c]["step_s"] / by["replicated", c]["step_s"]}
            for mode, c in by if mode == "sharded" and ("replicated", c) in by]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="*", default=list(CLASSES))
    parser.add_argument("--memory-gib", type=float, default=20.0,
                        help="skip runs whose modelled memory over all processes exceeds this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for classes in args.classes:
        for mode in ("replicated", "sharded"):
            need = modelled_gib(mode, classes) * PROCESSES
            row: dict = {"mode": mode, "classes": classes, "processes": PROCESSES,
                         "modelled_gib_per_process": modelled_gib(mode, classes)}
            if need > args.memory_gib:
                row["skipped"] = (f"modelled {need:.1f} GiB over {PROCESSES} processes exceeds "
                                  f"--memory-gib {args.memory_gib:g}")
            else:
                tmp = args.out.with_suffix(".part.json")
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={PROCESSES}", __file__, "--worker", mode,
                                str(classes), str(tmp)], check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
                row = json.loads(tmp.read_text())
                tmp.unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(args.out, {
        "ratios": ratios(rows), "batch": BATCH, "embedding_dim": DIM, "centers_per_class": K,
        "steps": STEPS,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per process",
        "torch": torch.__version__, "command": "benchmarks/sharded_centers.py", "rows": rows})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
