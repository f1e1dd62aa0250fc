"""RQ4 of docs/RESULTS.md: one training step's time and memory for each loss of the comparison as
the number of classes C grows (100 to 100,000) at a fixed batch (B = 64, d = 64): forward,
backward and the Adam update of the loss's own parameters (centers, proxies). Each (loss, C) runs
in its own process, so that its peak memory (resident set growth after torch's own set-up, which
one small warm-up step with an Adam update pays) is its own;
times are medians of 20 warm steps.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/loss_scaling.py

Writes benchmarks/results/loss_scaling.json; docs/RESULTS.md quotes it.
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

from softtriple.atomic import write_json
from softtriple.losses import build_loss

BATCH, DIM = 64, 64
CLASSES = (100, 1_000, 10_000, 100_000)
LOSSES = {  # label: (name, arguments)
    "SoftTriple K=10 tau=0.2": ("softtriple", {"centers_per_class": 10}),
    "SoftTriple K=10 tau=0": ("softtriple", {"centers_per_class": 10, "tau": 0.0}),
    "SoftMax-norm": ("softmax_norm", {}),
    "ProxyNCA": ("proxy_nca", {"scale": 3.0}),
    "Proxy-Anchor": ("proxy_anchor", {}),
    "Triplet semi-hard": ("triplet", {}),
    "N-pairs": ("npair", {}),
}
RESULTS = Path(__file__).parent / "results" / "loss_scaling.json"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(label: str, classes: int) -> None:
    torch.manual_seed(0)
    name, args = LOSSES[label]
    sized = {"num_classes": classes, "embedding_dim": DIM} if name in (
        "softtriple", "softmax_norm", "proxy_nca", "proxy_anchor") else {}
    # torch's own set-up (autograd, and the modules Adam's first step imports: ~150 MiB)
    warm = build_loss("softmax_norm", num_classes=8, embedding_dim=DIM)
    warm(torch.randn(BATCH, DIM, requires_grad=True), torch.arange(BATCH) % 8).backward()
    torch.optim.Adam(warm.parameters(), lr=1e-2, eps=0.01).step()
    before = _rss()
    loss_fn = build_loss(name, **sized, **args)
    params = list(loss_fn.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2, eps=0.01) if params else None
    x = torch.randn(BATCH, DIM, requires_grad=True)
    labels = torch.arange(BATCH) % min(classes, BATCH // 2)  # two images per class
    peak, times = 0, []
    for step in range(25):
        start = time.perf_counter()
        loss = loss_fn(x, labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None
        if step >= 5:
            times.append(time.perf_counter() - start)
        peak = max(peak, _rss())
    print(json.dumps({"seconds": statistics.median(times), "memory_bytes": peak - before,
                      "parameter_bytes": sum(p.numel() * p.element_size() for p in params)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    rows = []
    for label in LOSSES:
        for classes in CLASSES:
            done = subprocess.run([sys.executable, __file__, "--child", label, str(classes)],
                                  capture_output=True, text=True, check=True)
            row = {"loss": label, "classes": classes, **json.loads(done.stdout)}
            rows.append(row)
            print(f"{label:<26}C={classes:>7}  {row['seconds'] * 1e3:8.2f} ms  "
                  f"{row['memory_bytes'] / 2**20:8.1f} MiB")
    write_json(args.json, {"batch": BATCH, "dim": DIM, "threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
