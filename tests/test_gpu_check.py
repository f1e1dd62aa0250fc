"""benchmarks/gpu.py, the GPU check a lent machine runs in one call, stays runnable: its every
part at toy sizes on this machine's device (no results file is written but the one asked for)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_measuring_part_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny",
                           "--parts", "loss,eval,trainer,loader,trainer_no_autotuning,kmeans",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"torch", "device", "triton"} <= set(results["conditions"])
    (loss,) = results["loss"]
    assert loss["ours"]["ms"] > 0 and loss["floor"]["ms"] > 0 and loss["ours_over_pml"] > 0
    assert loss["tf32"]["ours_over_floor"] > 0 and loss["tf32"]["ours_over_ieee_ours"] > 0
    sop, million = results["eval"]["sop"], results["eval"]["million"]
    assert sop["evaluate_over_floor"] > 0 and sop["evaluate_bf16_over_floor"] > 0
    assert million["knn_torch"]["ms"] > 0 and million["knn_bf16"]["ms"] > 0
    trainer = results["trainer"]
    assert len(trainer["epoch_seconds"]) == 2 and len(trainer["eval_seconds"]) == 2
    assert 0 < trainer["steady_over_floor"] and 0 <= trainer["recall@1"] <= 1
    assert len(trainer["median_step_ms"]) == 2 and trainer["steady_step_over_floor"] > 0
    assert trainer["floor_profile"]["profiled_wall_ms_per_step"] > 0
    assert all(ms >= 0 for ms in trainer["floor_profile"]["host_ms_per_step"].values())
    first = trainer["first_epoch"]
    assert first["to_first_step_seconds"] > 0 and first["median_step_ms"] > 0
    assert len(first["first_steps_ms"]) == min(8, trainer["steps_per_epoch"] - 1)
    loader = results["loader"]
    assert set(loader["images_per_second"]) == {"uint8 from files", "float32 from files",
                                                "uint8 decoded once", "float32 decoded once"}
    assert all(rate > 0 for rate in loader["images_per_second"].values())
    assert loader["per_image_one_thread"]["decode_ms"] > 0
    kmeans = results["kmeans"]
    assert kmeans["lloyd_iterations"] >= 1 and kmeans["one_start_seconds"] > 0
    assert 0 < kmeans["nmi"] <= 1
    assert kmeans["assign"]["assign_over_product"] > 0
    assert kmeans["sop_yaml"]["kmeans"].endswith("(not the paper's)")
    assert kmeans["sop_yaml"]["seconds"] > 0 and 0 < kmeans["sop_yaml"]["nmi"] <= 1
    assert kmeans["assign"]["same_labels_fraction"] > 0.99
    untuned = results["trainer_no_autotuning"]
    assert "run.cudnn_benchmark=false" in untuned["settings"]
    assert len(untuned["epoch_seconds"]) == 2 and untuned["first_epoch"]["median_step_ms"] > 0
    judged = {g["goal"]: g for g in results["acceptance"]}
    assert judged["trainer: first epoch over a steady one"]["met"] in (True, False)
    assert judged["demo recipe: seconds after imports"]["met"] is None  # not run: not met
    # a second call adds the parts the first left, replacing those it runs again; its demo
    # part, with no demo data where it looks, says what to do
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny",
                           "--parts", "demo,kmeans", "--update", "--demo-data",
                           str(tmp_path / "none"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    updated = json.loads(out.read_text())
    assert updated["loss"] == results["loss"] and updated["trainer"] == results["trainer"]
    assert 0 < updated["kmeans"]["nmi"] <= 1 and updated["seconds"]["kmeans"] > 0
    assert "--pack-demo" in updated["demo"]["error"]
    assert updated["command"].count("gpu.py") == 2 and len(updated["later_conditions"]) == 1


def test_the_gpu_check_keeps_to_its_budget_and_names_the_parts_it_left(tmp_path):
    """A part still running when the budget ends is stopped, with its error written; a part
    that no budget is left for is skipped and named, with the --parts that runs it."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny",
                           "--parts", "trainer,demo,demo_graphed", "--budget", "0.5",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert "over the check's budget" in results["trainer"]["error"]
    assert results["seconds"]["trainer"] < 30  # stopped, not run to its end
    assert "--parts demo" in results["skipped"]["demo"] and "demo" not in results
    if not torch.cuda.is_available():  # the graphed demo is for CUDA alone
        assert results["skipped"]["demo_graphed"] == "model.cuda_graph needs CUDA"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--parts",
                           "loss,warp"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0 and "unknown parts ['warp']" in done.stderr


def test_the_gpu_check_packs_the_demos_classes_and_runs_the_demo_on_them(tmp_path):
    """--pack-demo copies the demo's classes of a prepared glyphs folder (here a toy one: 8
    classes, the first 4 train) with a manifest the demo accepts, and the demo part trains the
    demo's recipe on the copy in a fresh process."""
    from PIL import Image

    from softtriple.atomic import write_json
    from softtriple.data.builtin import folder_checksum

    source = tmp_path / "source"
    for c in range(8):
        folder = source / "glyphs" / f"u{0x4e00 + c:05x}"
        folder.mkdir(parents=True)
        for font in range(4):
            Image.new("L", (40, 40), 40 * font + 10 * c).save(folder / f"font{font}.png")
    write_json(source / "glyphs" / "manifest.json",
               {"name": "glyphs", "classes": 8, "images": 32, "train_fraction": 0.5,
                "checksum": folder_checksum(source / "glyphs")})
    packed = tmp_path / "packed"
    script = str(REPO / "benchmarks" / "gpu.py")
    done = subprocess.run([sys.executable, script, "--tiny", "--pack-demo", "--demo-source",
                           str(source), "--demo-data", str(packed)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((packed / "glyphs" / "manifest.json").read_text())
    assert (manifest["classes"], manifest["images"]) == (6, 24)
    assert sorted(p.name for p in (packed / "glyphs").iterdir() if p.is_dir()) == \
        ["u04e00", "u04e01", "u04e02", "u04e04", "u04e05", "u04e06"]  # 3 train, 3 test
    assert manifest["checksum"] == folder_checksum(packed / "glyphs")
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, script, "--tiny", "--parts", "demo", "--demo-data",
                           str(packed), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    demo = json.loads(out.read_text())["demo"]
    assert "error" not in demo, demo
    assert demo["seconds_after_imports"] > 0 and len(demo["epoch_seconds"]) == 2
    assert demo["baseline_seconds"] > 0
    assert demo["recipe_baseline_seconds"] < demo["baseline_seconds"]  # read from its cache
    assert demo["report_seconds"] > 0
    assert demo["floor"]["ms"] > 0 and demo["floor"]["profile"]["host_ms_per_step"]
    assert demo["steps_per_epoch"] > 0 and demo["steady_step_over_floor"] > 0
    assert 0 <= demo["trained"]["recall@1"] <= 1 and demo["cpu"]["recall@1"] > 0.5
    assert "data.max_classes=3" in demo["overrides"]


def test_the_gpu_check_judges_the_issues_goals_on_what_it_measured():
    """Each goal met, missed, or not measured where its part did not run or failed (never met
    by default)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu

    sop, big = gpu.LOSS_SHAPES
    results = {
        "loss": [{"B": sop[0], "d": sop[1], "C": sop[2], "K": sop[3], "ours_over_floor": 1.4,
                  "ours_over_pml": 0.6, "memory_over_pml": 0.7}],  # the C 100,000 row missing
        "trainer": {"error": "RuntimeError: CUDA out of memory"},
        "demo": {"seconds_after_imports": 29.0, "recall@1_minus_cpu": -0.02},
        "tests": {"failures": 1, "errors": 0}}
    judged = {g["goal"]: g["met"] for g in gpu.acceptance(results)}
    shape = f"B {sop[0]}, d {sop[1]}, C {sop[2]:,}, K {sop[3]}"
    assert judged[f"loss at {shape}: time over the three products"] is True
    assert judged[f"loss at {shape}: time over PML's"] is False
    assert judged[f"loss at {shape}: peak memory over PML's"] is True  # at most 0.7
    assert judged[f"loss at B {big[0]}, d {big[1]}, C {big[2]:,}, K {big[3]}: time over PML's"] \
        is None
    assert judged["trainer: first epoch over a steady one"] is None
    assert judged["demo recipe: seconds after imports"] is True
    assert judged["demo recipe: held-out Recall@1 minus the CPU demo's"] is False
    assert judged["device tests: failed or errored"] is False
    lines = gpu.verdict_lines(gpu.acceptance(results))
    assert sum(line.lstrip().startswith("MISSED") for line in lines) == 3
    results |= {"command": "benchmarks/gpu.py", "conditions": {
        "device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11.0",
        "nvidia_smi": {"driver_version": "580.65"}}}
    table = gpu.markdown_table(results)  # the docs' table
    assert table.startswith("Measured on NVIDIA H200 (driver 580.65), torch 2.11.0")
    assert table.count("| **missed** |") == 3 and table.count("| met |") == 3
