"""benchmarks/gpu.py, the GPU check a lent machine runs in one call, stays runnable: its every
part at toy sizes on this machine's device (no results file is written but the one asked for)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_measuring_part_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny",
                           "--parts", "loss,eval,trainer,trainer_no_autotuning",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"torch", "device", "triton"} <= set(results["conditions"])
    (loss,) = results["loss"]
    assert loss["ours"]["ms"] > 0 and loss["floor"]["ms"] > 0 and loss["ours_over_pml"] > 0
    sop, million = results["eval"]["sop"], results["eval"]["million"]
    assert sop["evaluate_over_floor"] > 0 and sop["evaluate_bf16_over_floor"] > 0
    assert million["knn_torch"]["ms"] > 0 and million["knn_bf16"]["ms"] > 0
    trainer = results["trainer"]
    assert len(trainer["epoch_seconds"]) == 2 and len(trainer["eval_seconds"]) == 2
    assert 0 < trainer["steady_over_floor"] and 0 <= trainer["recall@1"] <= 1
    first = trainer["first_epoch"]
    assert first["to_first_step_seconds"] > 0 and first["median_step_ms"] > 0
    assert len(first["first_steps_ms"]) == min(8, trainer["steps_per_epoch"] - 1)
    untuned = results["trainer_no_autotuning"]
    assert "run.cudnn_benchmark=false" in untuned["settings"]
    assert len(untuned["epoch_seconds"]) == 2 and untuned["first_epoch"]["median_step_ms"] > 0
