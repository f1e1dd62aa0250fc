"""The GPU check, in one call on the lent machine (the `device` tool), within a time budget
(``--budget``, default 280 s: the issue's five minutes less the start). Its parts, in the order
they run (the acceptance figures first; a part that the budget's remainder cannot hold is skipped
and named, to run in a second call with ``--parts``):

1. **loss**: SoftTriple forward + backward (tau = 0, the regularizer apart as in loss_speed.py)
   against pytorch-metric-learning's SoftTripleLoss and the three (B, d) x (d, CK) products the
   step cannot avoid (the floor), at SOP's shape (B 256, d 512, C 11,318, K 10) and at C 100,000
   (B 512): median ms over warm calls (CUDA events) and the step's peak memory; then the three
   again with TF32 products (what ``torch.set_float32_matmul_precision("high")`` gives a loss
   that computes in float32);
2. **trainer**: EfficientNet-Lite0 at 224 px, batch 128, bf16, channels_last on a folder of
   JPEGs written here (3,000 photographs of CUB's usual 500 x 375, 100 classes, as a user's
   folder data set; 1.6 GiB decoded, over ``data.decode_once_mib``, so the workers decode each
   file every epoch, as for CUB, Cars and SOP at their native sizes): each whole
   epoch and evaluation from metrics.jsonl (first against steady), and each epoch's steps (the
   device synchronized after each: the wait for the first batch, the first steps, the median
   step, the last), against the in-memory step floor of the same model, loss and optimizer,
   timed after the training so that the first epoch pays its own cold start (CUDA's lazy start,
   Triton's compiles, cuDNN's autotuning, the workers' start);
3. **demo**: the demo's recipe (``softtriple demo``: configs/glyphs.yaml, 8 epochs at 64 px) on
   the device in a fresh process, seconds after its imports, each epoch and evaluation, and its
   held-out Recall@1 against the CPU's (benchmarks/results/demo.json). The lent machine has no
   CJK fonts to render glyphs and the whole set (141 MiB) is over the carry limit, so the demo's
   own 600 classes (4.4 MiB) travel: ``--pack-demo`` copies them from this machine's prepared
   glyphs into ``.gpu_data/`` (carry it);
4. **tests**: the device-parametrized tests (CUDA included where a GPU is visible), their pass
   count (in 4 processes where pytest-xdist is there);
5. **demo_graphed**: part 3 with ``model.cuda_graph=true`` (the network's training pass
   replayed as CUDA graphs), its floor graphed too: whether the demo's steps are the host
   launching kernels one by one, and what graphs give the recipe's seconds and Recall@1;
6. **loader**: the training loader alone at 224 px (benchmarks/loader_speed.py: CUB-sized
   photos, batch 128, the device's default workers, each batch pinned, copied and normalized on
   the device), uint8 against float32 batches, from the files and decoded once: whether the
   trainer's loader can feed its step floor;
7. **eval**: ``evaluate`` at SOP's size (60,502 x 512) and the exact kNN of 1,000,000 x 128
   (in a child process, capped at a few times the floor), each with the float32 and the bf16
   engine (tensor cores), against the matmul + top-k floor;
8. **trainer_no_autotuning**: part 2 again, 2 epochs, with ``run.cudnn_benchmark=false``, in a
   fresh process: what cuDNN's autotuning costs the first epoch and gains the steady ones;
9. **kmeans**: one start of the paper's k-means protocol by ``evaluation.kmeans.backend=torch``
   on the device at SOP's size (11,316 clusters of 60,502 x 512), seeding (on the device, and
   with the host path's per-step copies) and Lloyd iterations timed apart: whether the official
   NMI protocol fits a GPU run at SOP scale (ten starts); configs/sop.yaml's cheap protocol as
   its evaluations run it there; and the assignment step against the product alone
   (benchmarks/nmi_protocol.py's ``assign_times``).

Results are written after each part, so a call cut short keeps what it measured, with the
issue's goals judged on what is there (``acceptance``: met, missed or not measured, also printed
at the end). ``--update`` adds a second call's parts (those the first skipped) to the first
call's file, on the same device.

    .venv/bin/python benchmarks/gpu.py [--json FILE] [--tiny] [--budget S] [--parts loss,...]
    .venv/bin/python benchmarks/gpu.py --update --parts trainer_no_autotuning,kmeans
    .venv/bin/python benchmarks/gpu.py --markdown benchmarks/results/gpu.json  # the docs' table
    .venv/bin/python benchmarks/gpu.py --pack-demo   # before the call: .gpu_data/, to carry

``--tiny`` runs every part at toy sizes (on the CPU where no GPU is visible) to check the script;
only a GPU run is written to benchmarks/results/gpu.json, with the device, driver, clocks and
versions. docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nmi_protocol
import torch
from loss_speed import make_step
from steps import RecipeStep, device_sync

from softtriple.atomic import write_json

RESULTS = Path(__file__).parent / "results" / "gpu.json"
ROOT = Path(__file__).parents[1]
DEMO_DATA = ROOT / ".gpu_data"  # $SOFTTRIPLE_DATA of the demo part: the demo's classes of glyphs
LOSS_SHAPES = [(256, 512, 11318, 10), (512, 512, 100000, 10)]  # (B, d, C, K)
TINY_LOSS_SHAPES = [(16, 32, 50, 4)]
PARTS = ("loss", "trainer", "demo", "tests", "demo_graphed", "loader", "eval",  # in this order
         "trainer_no_autotuning", "kmeans")
GRAPHED_DEMO = ("model.cuda_graph=true",)  # the demo_graphed part's settings
# the least each part needs on the GPU (guessed, the check not yet timed on one; the figures in
# gpu.json's "seconds" will tell): a part is skipped when less of the budget is left
LEAST_SECONDS = {"loss": 30, "trainer": 60, "demo": 45, "tests": 60, "demo_graphed": 30,
                 "loader": 25, "eval": 30, "trainer_no_autotuning": 40, "kmeans": 20}
DEMO_RECALL_TOLERANCE = 0.01  # "at the accuracy of the CPU demo": Recall@1 at most this lower
TEST_FILES = ["tests/test_devices.py", "tests/test_precision.py", "tests/test_training.py",
              "tests/test_fused_similarity.py", "tests/test_knn_bf16.py", "tests/test_demo.py"]


def conditions(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "cpus": os.cpu_count(), "device": str(device)}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True)
        out["nvidia_smi"] = dict(zip(query.split(","), smi.stdout.strip().split(", "),
                                     strict=False)) if smi.returncode == 0 else smi.stderr
    return out


def timed(step: Callable[[], Any], device: torch.device, reps: int,
          warmup: int = 3) -> dict[str, float]:
    """Median ms of ``reps`` warm calls (CUDA events on a GPU) and the peak memory above what
    was allocated before the first call."""
    sync = device_sync(device)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    out = {"ms": 1000 * statistics.median(times), "ms_min": 1000 * min(times)}
    if device.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def step_profile(step: Callable[[], Any], device: torch.device, steps: int = 5) -> dict[str, Any]:
    """Where a warm step's time goes, from torch.profiler over ``steps`` steps: on CUDA the
    device's kernel ms and kernel launches a step (kernels that fill a fraction of the step's
    wall time mean the host, launching them one by one, is the bound), and on every device the
    operators with the most host time a step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    sync = device_sync(device)
    step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - start
    rows = prof.key_averages()
    out: dict[str, Any] = {"profiled_wall_ms_per_step": 1000 * wall / steps}
    if cuda:
        kernels = [r for r in rows if r.device_type == DeviceType.CUDA]
        out["kernels_per_step"] = sum(r.count for r in kernels) / steps
        out["kernel_ms_per_step"] = sum(getattr(r, "self_device_time_total", 0)
                                        for r in kernels) / 1000 / steps
    host = sorted((r for r in rows if r.device_type == DeviceType.CPU),
                  key=lambda r: r.self_cpu_time_total, reverse=True)[:8]
    out["host_ms_per_step"] = {r.key: round(r.self_cpu_time_total / 1000 / steps, 3)
                               for r in host}
    return out


class OverBudget(Exception):
    """The check's time budget ran out during a part."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise OverBudget in the main thread after ``seconds`` (a child process that
    subprocess.run is waiting on is killed by it)."""
    def expire(*_: Any) -> None:
        raise OverBudget(f"over the check's budget ({seconds:.0f} s were left for this part)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def loss_times(b: int, d: int, c: int, k: int, device: torch.device,
               reps: int) -> dict[str, Any]:
    """floor, ours and pml of one shape, each measured alone, its memory freed after, with the
    ratios of ours to the others."""
    row: dict[str, Any] = {}
    for method in ("floor", "ours", "pml"):
        try:
            # loss_speed's steps: "ours" is SoftTriple at tau = 0, "pml" PML's without its
            # regularizer (its CK x CK masks do not fit at SOP scale)
            row[method] = timed(make_step(method, b, d, c, k, device), device, reps)
        except ImportError as error:
            row[method] = {"error": str(error)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "ms" in row["pml"]:
        row["ours_over_pml"] = row["ours"]["ms"] / row["pml"]["ms"]
        if "peak_mib" in row["ours"]:
            row["memory_over_pml"] = row["ours"]["peak_mib"] / row["pml"]["peak_mib"]
    row["ours_over_floor"] = row["ours"]["ms"] / row["floor"]["ms"]
    return row


@contextmanager
def tf32_products() -> Iterator[None]:
    """float32 products on TF32 tensor cores (``torch.set_float32_matmul_precision("high")``),
    the caller's setting back after (torch < 2.9 has only the process-wide switch)."""
    from softtriple.evaluation.float32 import _MatmulPrecision

    matmul = torch.backends.cuda.matmul
    owner, name, tf32 = ((matmul, "fp32_precision", "tf32") if hasattr(matmul, "fp32_precision")
                         else (_MatmulPrecision(), "value", "high"))
    saved = getattr(owner, name)
    setattr(owner, name, tf32)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def loss_section(device: torch.device, tiny: bool) -> list[dict[str, Any]]:
    """Each shape in float32 as torch multiplies it by default (IEEE) and again with TF32
    products (under ``"tf32"``): the losses compute in float32 even under bf16 autocast, so TF32
    is what would put their three products on the tensor cores."""
    rows: list[dict[str, Any]] = []
    reps = 5 if tiny else 20
    for b, d, c, k in TINY_LOSS_SHAPES if tiny else LOSS_SHAPES:
        cold = None
        if not rows:  # the process's first SoftTriple step: on CUDA it compiles the Triton
            # kernels (Triton's disk cache is empty on a fresh machine), a cost the first
            # epoch of every run on such a machine pays
            step = make_step("ours", b, d, c, k, device)
            sync = device_sync(device)
            start = time.perf_counter()
            step()
            sync()
            cold = time.perf_counter() - start
            del step
        row: dict[str, Any] = {"B": b, "d": d, "C": c, "K": k,
                               **loss_times(b, d, c, k, device, reps)}
        if cold is not None:
            row["ours_first_call_seconds"] = cold
        with tf32_products():
            row["tf32"] = loss_times(b, d, c, k, device, reps)
        row["tf32"]["ours_over_ieee_ours"] = row["tf32"]["ours"]["ms"] / row["ours"]["ms"]
        rows.append(row)
        print("loss", json.dumps(row), flush=True)
    return rows


def kmeans_section(device: torch.device, tiny: bool) -> dict[str, Any]:
    """One start of the paper's k-means protocol by the torch backend on the device at SOP's
    size (60,502 x 512 unit rows in 11,316 classes of about 5, clustered as trained embeddings
    are): the greedy k-means++ seeding and the Lloyd iterations (at most 300, scikit-learn's
    tolerance) timed apart; the official protocol is ten such starts."""
    import numpy as np

    from softtriple.evaluation import clustering, normalized_mutual_info

    n, d, c = (600, 32, 120) if tiny else (60502, 512, 11316)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=g)
    means = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1)
    x = torch.nn.functional.normalize(means[labels] + 0.5 * d**-0.5 * torch.randn(
        n, d, generator=g), dim=1).to(device)
    sync = device_sync(device)
    sync()
    start = time.perf_counter()  # the seeding whose draws go through the host, each step
    clustering.kmeans_plus_plus(x, c, np.random.default_rng(0), on_device=False)
    sync()
    seeding_host = time.perf_counter() - start
    start = time.perf_counter()  # the backend's own on a GPU: no step waits
    centers = clustering.kmeans_plus_plus(x, c, np.random.default_rng(0))
    sync()
    seeding = time.perf_counter() - start
    start = time.perf_counter()
    found, inertia, iterations = clustering._lloyd(
        x, centers.clone(), 300, clustering.lloyd_tolerance(x))  # type: ignore[union-attr]
    sync()
    lloyd = time.perf_counter() - start
    out = {"N": n, "d": d, "clusters": c, "seeding_seconds": seeding,
           "seeding_host_draws_seconds": seeding_host, "lloyd_seconds": lloyd,
           "lloyd_iterations": iterations, "one_start_seconds": seeding + lloyd,
           "ten_starts_seconds_estimate": 10 * (seeding + lloyd), "inertia": inertia,
           "nmi": normalized_mutual_info(labels.numpy(), found.cpu().numpy())}
    # configs/sop.yaml's cheap protocol (one start from random rows, 20 iterations) as an
    # evaluation of it runs on this device (backend auto)
    from softtriple.experiment import load_config
    settings = load_config(ROOT / "configs" / "sop.yaml").evaluation.kmeans
    sync()
    start = time.perf_counter()
    cheap = clustering.cluster_rows(x, c, 0, settings)
    sync()
    out["sop_yaml"] = {"kmeans": settings.resolved(x.device).describe(),
                       "seconds": time.perf_counter() - start,
                       "nmi": normalized_mutual_info(labels.numpy(), cheap)}
    del x, centers, found
    # the assignment step (once per Lloyd iteration) against the product alone
    out["assign"] = nmi_protocol.assign_times(device, (n, d, c))
    print("kmeans", json.dumps(out), flush=True)
    return out


def knn_floor(x: torch.Tensor, k: int, block: int) -> Callable[[], Any]:
    """Matmul + top-k over row blocks of unit rows, with no tie handling or merging: the least
    any exact search on this device does."""
    def run() -> None:
        for i in range(0, x.shape[0], block):
            (x[i:i + block] @ x.T).topk(k, dim=1)
    return run


def eval_section(device: torch.device, tiny: bool) -> dict[str, Any]:
    from softtriple.evaluation import evaluate
    out: dict[str, Any] = {}
    n, d = (600, 32) if tiny else (60502, 512)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, n // 5, (n,), generator=g)  # SOP: about 5 images a class
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    y = labels.to(device)
    out["sop"] = {"N": n, "d": d,
                  "evaluate": timed(lambda: evaluate(x, y, metrics=("recall",)), device, 3, 1),
                  "evaluate_bf16": timed(lambda: evaluate(x, y, metrics=("recall",),
                                                          backend="bf16"), device, 3, 1),
                  "floor": timed(knn_floor(x, 8, 8192), device, 3, 1)}
    for name in ("evaluate", "evaluate_bf16"):
        out["sop"][f"{name}_over_floor"] = out["sop"][name]["ms"] / out["sop"]["floor"]["ms"]
    n, d, k = (2000, 16, 10) if tiny else (1_000_000, 128, 10)
    big = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    out["million"] = {"N": n, "d": d, "k": k,
                      "floor": timed(knn_floor(big, k, 16384), device, 1, 1)}
    del big
    # each search is given 4x the floor (at least 10 s): past that its ratio is known to fail
    # the goal, and the rest of the budget is worth more than its exact figure
    cap = 20 if tiny else max(10, round(4 * out["million"]["floor"]["ms"] / 1000))
    out["million"]["cap_seconds"] = cap
    for backend in ("torch", "bf16"):
        child = subprocess.run([sys.executable, __file__, "--knn-child", f"{n},{d},{k}",
                                "--device", str(device), "--backend", backend],
                               capture_output=True, text=True,
                               env=os.environ | {"KNN_CAP": str(cap)})
        found = json.loads(child.stdout.strip().splitlines()[-1]) \
            if child.returncode == 0 else {"error": child.stderr[-500:]}
        out["million"][f"knn_{backend}"] = found
        if "ms" in found:
            out["million"][f"{backend}_over_floor"] = found["ms"] / out["million"]["floor"]["ms"]
    print("eval", json.dumps(out), flush=True)
    return out


def knn_child(shape: str, device: torch.device, backend: str) -> None:
    """One timed exact kNN of random unit rows, killed by an alarm at $KNN_CAP seconds."""
    import signal

    from softtriple.evaluation import knn
    n, d, k = map(int, shape.split(","))
    cap = int(os.environ.get("KNN_CAP", "60"))
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    knn(x[:1000], k, backend=backend)  # type: ignore[arg-type]  # warm: engines, allocator

    def give_up(*_: Any) -> None:
        print(json.dumps({"over_seconds": cap}), flush=True)
        os._exit(0)
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(cap)
    start = time.perf_counter()
    knn(x, k, backend=backend)  # type: ignore[arg-type]
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"ms": 1000 * (time.perf_counter() - start)}), flush=True)


def write_folder(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> None:
    """``classes`` folders of ``per_class`` photographs each (loader_speed.write_photo: random
    crops of two sample photos, JPEG), written by one process per core. Their classes carry no
    visual meaning: the part times the trainer, its Recall@1 is near chance."""
    from loader_speed import write_photos
    paths = [root / f"class_{c:03d}" / f"{i:03d}.jpg" for c in range(classes)
             for i in range(per_class)]
    write_photos(paths, size, processes=len(os.sched_getaffinity(0)))


def step_clock(optimizer: torch.optim.Optimizer,
               device: torch.device) -> tuple[list[float], Any]:
    """The perf_counter after each optimizer step, the device synchronized, appended to the list
    returned (where an epoch's time goes: worker start and the wait for the first batch, cuDNN's
    autotuning in the first steps of each shape, the steady steps), and the hook's handle."""
    marks: list[float] = [time.perf_counter()]

    def mark(*_: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
    return marks, optimizer.register_step_post_hook(mark)


def first_epoch_anatomy(marks: list[float], steps: int) -> dict[str, Any]:
    """Seconds from the epoch's start (the clock's first mark, at setup's end) to the first
    step's end, the first steps' and the last step's ms, and the median step of the epoch."""
    gaps = [1000 * (b - a) for a, b in itertools.pairwise(marks[:steps + 1])]
    if not gaps:
        return {}
    return {"to_first_step_seconds": gaps[0] / 1000, "first_steps_ms": gaps[1:9],
            "median_step_ms": statistics.median(gaps[1:] or gaps), "last_step_ms": gaps[-1]}


def median_steps_ms(marks: list[float], steps: int) -> list[float]:
    """Each epoch's median step in ms, from the gaps between its own steps (the gap before an
    epoch's first step holds the last epoch's end, an evaluation, a checkpoint and the wait for
    the first batch, so it is left out): the step rate an epoch reaches once its batches flow."""
    ends = marks[1:]
    return [statistics.median(1000 * (b - a) for a, b in
                              itertools.pairwise(ends[e * steps:(e + 1) * steps]))
            for e in range(len(ends) // steps) if steps > 1]


def epoch_and_eval_seconds(run: Path) -> tuple[list[float], list[float]]:
    """Each epoch's and each evaluation's seconds, from a run folder's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ([r["epoch_seconds"] for r in rows if "epoch_seconds" in r],
            [r["eval_seconds"] for r in rows if "eval_seconds" in r])


def trainer_section(device: torch.device, tiny: bool, work: Path,
                    cudnn_benchmark: bool = True) -> dict[str, Any]:
    """The trainer on a folder of JPEGs against its in-memory step. With ``cudnn_benchmark``
    off (a second, shorter run), what cuDNN's autotuning costs the first epoch."""
    from softtriple.experiment import load_config
    from softtriple.training import Trainer
    classes, per_class, size, batch, epochs = ((10, 8, (40, 30), 8, 2) if tiny else
                                               (100, 30, (500, 375), 128, 3))
    epochs = epochs if cudnn_benchmark else 2
    data = work / "folder"
    start = time.perf_counter()
    write_folder(data, classes, per_class, size)
    run = work / "run"
    settings = ["model.backbone=efficientnet_lite0", "data.format=folder", f"data.root={data}",
                f"data.image_size={32 if tiny else 224}", f"data.batch_size={batch}",
                f"evaluation.batch_size={batch}", f"schedule.epochs={epochs}",
                "evaluation.before_training=false", "evaluation.every=1",
                "evaluation.metrics=[recall]", "run.progress=false", "run.report=false",
                "loss.args={centers_per_class: 4}", f"run.out={run}",
                f"run.cudnn_benchmark={str(cudnn_benchmark).lower()}",
                f"run.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
                f"run.device={device.type}"]
    out: dict[str, Any] = {"images": classes * per_class, "write_seconds":
                           time.perf_counter() - start, "settings": settings}
    config = load_config(None, settings)
    start = time.perf_counter()
    trainer = Trainer(config)
    out["setup_seconds"] = time.perf_counter() - start
    marks, clock = step_clock(trainer.optimizer, device)
    marks[0] = time.perf_counter()
    result = trainer.train()
    clock.remove()
    epochs_s, evals = epoch_and_eval_seconds(run)
    steps = trainer.step // epochs
    out["first_epoch"] = first_epoch_anatomy(marks, steps)
    out |= {"epoch_seconds": epochs_s, "eval_seconds": evals, "steps_per_epoch": steps,
            "median_step_ms": median_steps_ms(marks, steps),
            "recall@1": result["metrics"].get("recall@1")}
    # the floor, after the training so that the first epoch paid its own cold start: the
    # trainer's own objective (model and loss) and optimizer stepping on one in-memory batch of
    # its loader, in the first epoch's shapes (cuDNN's choices for them already made)
    images, labels, _ = next(iter(trainer.loaders.train))
    memory = torch.channels_last if config.model.channels_last else torch.contiguous_format
    images = images.to(device).contiguous(memory_format=memory)
    labels = labels.to(device)

    def step() -> None:
        trainer.optimizer.zero_grad()
        trainer.objective(images, labels).backward()
        trainer.optimizer.step()
    out["floor"] = timed(step, device, 3 if tiny else 20)  # the objective autocasts itself
    out["floor_profile"] = step_profile(step, device, 2 if tiny else 5)
    out["floor_images_per_second"] = 1000 * batch / out["floor"]["ms"]
    steady = statistics.median(epochs_s[1:]) if len(epochs_s) > 1 else epochs_s[0]
    out["steady_images_per_second"] = steps * batch / steady
    out["steady_over_floor"] = out["steady_images_per_second"] / out["floor_images_per_second"]
    if len(out["median_step_ms"]) > 1:  # the epochs' step rate, their fixed costs apart
        out["steady_step_over_floor"] = (out["floor"]["ms"]
                                         / statistics.median(out["median_step_ms"][1:]))
    out["first_over_steady_epoch"] = epochs_s[0] / steady
    if len(evals) > 1:
        out["first_over_later_eval"] = evals[0] / statistics.median(evals[1:])
    print("trainer" if cudnn_benchmark else "trainer_no_autotuning", json.dumps(out), flush=True)
    return out


def no_autotuning_child(tiny: bool, work: Path, budget: float) -> dict[str, Any]:
    """The trainer part again with cuDNN's autotuning off, in a fresh process (so that CUDA's
    lazy start, Triton's compiles and cuDNN's caches are cold again, as in the first run), within
    ``budget`` seconds."""
    target = work / "no_autotuning.json"
    subprocess.run([sys.executable, __file__, "--parts", "trainer", "--no-autotuning",
                    "--budget", str(budget), "--json", str(target),
                    *(["--tiny"] if tiny else [])], cwd=ROOT, check=True,
                   env={k: v for k, v in os.environ.items() if k != "OUT"})
    return dict(json.loads(target.read_text())["trainer"])


TINY_DEMO = ["data.max_classes=3", "data.image_size=32", "data.batch_size=8",
             "schedule.epochs=2", "schedule.milestones=[1]", "evaluation.every=1"]


def demo_classes(tiny: bool) -> int:
    from softtriple.demo import demo_config
    return 3 if tiny else demo_config().data.max_classes


def demo_rows(root: Path, classes: int) -> list[tuple[str, str, str]]:
    """(path relative to the glyphs folder, class name, split) of each image the demo reads
    from the glyphs folder under ``root`` (its first ``classes`` classes of each split)."""
    from softtriple.demo import demo_config
    from softtriple.experiment.loaders import read_config_table
    table = read_config_table(demo_config(["data.format=folder", f"data.root={root / 'glyphs'}",
                                           f"data.max_classes={classes}"]).data)
    return [(str(Path(path).relative_to(root / "glyphs")), table.class_names[label], split)
            for path, label, split in zip(table.paths, table.labels, table.splits, strict=True)]


def pack_demo(source: Path, target: Path, classes: int) -> dict[str, Any]:
    """Copy the demo's classes of the prepared glyphs under ``source`` (its first ``classes``
    training and first ``classes`` test classes) to ``target``/glyphs, with a manifest whose
    checksum is the copy's, so that the demo takes the copy as the prepared built-in set. The
    whole set's classes split at their sorted middle, so the demo's training classes sort before
    its test classes and the copy splits into the same classes, its training labels unchanged
    (checked here: the demo reads the same images, classes and splits from both)."""
    from softtriple.data.builtin import folder_checksum, prepared
    manifest = prepared("glyphs", source)
    if manifest is None:
        raise SystemExit(f"no prepared glyphs under {source}: softtriple data prepare glyphs")
    rows = demo_rows(source, classes)
    folder = target / "glyphs"
    if folder.exists():
        shutil.rmtree(folder)
    for relative in sorted({Path(path).parent for path, _, _ in rows}):
        shutil.copytree(source / "glyphs" / relative, folder / relative)
    if demo_rows(target, classes) != rows:
        raise SystemExit(f"the copy in {folder} does not split as the whole set does")
    packed = {**manifest, "classes": 2 * classes, "images": len(rows),
              "subset_of": manifest.get("checksum"), "checksum": folder_checksum(folder),
              "subset": f"the demo's {classes} training and {classes} test classes, copied by "
                        "benchmarks/gpu.py --pack-demo"}
    write_json(folder / "manifest.json", packed)
    return packed


def demo_floor(overrides: list[str], tiny: bool) -> dict[str, Any]:
    """The demo recipe's step on one in-memory batch (steps.RecipeStep: its model, loss,
    optimizer, batch and image size, on the device the recipe trains on, its network graphed
    where the overrides say model.cuda_graph=true), timed and profiled: what the demo's steady
    steps would take with no loader, logging or checks around them."""
    from softtriple.demo import demo_config
    step = RecipeStep.build(demo_config(overrides))
    return {"batch": step.config.data.batch_size, "image_size": step.config.data.image_size,
            **timed(step, step.device, 3 if tiny else 30),
            "profile": step_profile(step, step.device, 2 if tiny else 10)}


def demo_child(overrides: list[str], target: Path, tiny: bool) -> None:
    """The demo's raw-pixel baseline (no model: the image check, a search and a k-means on the
    recipe's device, cached next to the data for later demos) timed first and apart, then its
    recipe (softtriple.demo.train_demo: training and evaluations, the baseline read from that
    cache: its seconds there as ``recipe_baseline_seconds``) in this fresh process, timed from
    after its imports, then its report (plots) timed apart, then its step's floor (demo_floor);
    seconds, metrics, each epoch's and evaluation's seconds and steps to ``target``."""
    from softtriple.analysis.report import write_report
    from softtriple.data.builtin import prepare
    from softtriple.demo import demo_config, raw_pixel_metrics, train_demo
    from softtriple.experiment.build import resolve_device
    from softtriple.experiment.loaders import load_table
    prepare("glyphs")
    config = demo_config(overrides)
    start = time.perf_counter()  # on the recipe's device, as train_demo asks for it
    raw_pixel_metrics(load_table(config.data).split("test"), device=resolve_device(
        config.run.device))
    baseline_seconds = time.perf_counter() - start
    start = time.perf_counter()
    shown = train_demo([*overrides, "run.report=false"])
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    write_report(shown["run"]["folder"])  # make demo's report, timed apart from the recipe
    report_seconds = time.perf_counter() - start
    run = Path(shown["run"]["folder"])
    epochs, evals = epoch_and_eval_seconds(run)
    steps = json.loads((run / "results.json").read_text())["steps"] // max(len(epochs), 1)
    write_json(target, {"seconds_after_imports": seconds, "baseline_seconds": baseline_seconds,
                        "recipe_baseline_seconds": shown["run"]["baseline_seconds"],
                        "report_seconds": report_seconds,
                        "trained": shown["trained"], "pretrained": shown["pretrained"],
                        "epoch_seconds": epochs, "eval_seconds": evals, "steps_per_epoch": steps,
                        "floor": demo_floor(overrides, tiny)})


def demo_section(tiny: bool, work: Path, data: Path, name: str = "demo",
                 extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The demo's recipe (with the ``extra`` settings) on the device in a fresh process,
    against the CPU's demo.json."""
    if not (data / "glyphs" / "manifest.json").is_file():
        return {"error": f"no demo data in {data}: run benchmarks/gpu.py --pack-demo on a "
                         "machine with glyphs prepared, and carry .gpu_data"}
    target = work / f"{name}.json"
    overrides = [f"run.out={work / name}", *(TINY_DEMO if tiny else []), *extra]
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"SOFTTRIPLE_DATA": str(data)}
    done = subprocess.run([sys.executable, __file__, "--demo-child", json.dumps(overrides),
                           "--json", str(target), *(["--tiny"] if tiny else [])], cwd=ROOT,
                          capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    out: dict[str, Any] = {"overrides": overrides, **json.loads(target.read_text())}
    cpu = json.loads((Path(__file__).parent / "results" / "demo.json").read_text())
    out["cpu"] = {"seconds": cpu["seconds"], "machine": cpu["cpu"],
                  "recall@1": cpu["trained"]["recall@1"]}
    out["recall@1_minus_cpu"] = out["trained"]["recall@1"] - cpu["trained"]["recall@1"]
    epochs = out["epoch_seconds"]
    if len(epochs) > 1:
        steady = statistics.median(epochs[1:])
        out["first_over_steady_epoch"] = epochs[0] / steady
        # the trainer's steady step against the same step on an in-memory batch: what the
        # loader, logging and checks around a step cost at the demo's size
        out["steady_step_ms"] = 1000 * steady / out["steps_per_epoch"]
        out["steady_step_over_floor"] = out["floor"]["ms"] / out["steady_step_ms"]
    print(name, json.dumps(out), flush=True)
    return out


def tests_section(work: Path) -> dict[str, Any]:
    """The device-parametrized tests' pass count; in 4 processes where pytest-xdist is there
    (the lent machines have it; these files pass under it here too), the CUDA ones sharing the
    device."""
    import importlib.util
    report = work / "junit.xml"
    start = time.perf_counter()
    workers = 4 if importlib.util.find_spec("xdist") and (os.cpu_count() or 1) >= 8 else 0
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(["-n", str(workers)] if workers else []),
                           f"--junitxml={report}", *TEST_FILES], cwd=ROOT,
                          capture_output=True, text=True)
    tail = done.stdout[-3000:]
    import xml.etree.ElementTree as ET
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    out = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"]
           - counts["skipped"], "failed": failed, "seconds": time.perf_counter() - start,
           "processes": workers or 1, "tail": tail}
    print("tests", json.dumps({k: v for k, v in out.items() if k != "tail"}), flush=True)
    return out


def loader_section(device: torch.device, tiny: bool) -> dict[str, Any]:
    """The training loader alone (benchmarks/loader_speed.py) with the device's default
    workers: uint8 against float32 batches, what it feeds against the trainer's floor."""
    import loader_speed
    out = (loader_speed.measure(device, batch=8, size=32, steps=2, rounds=1) if tiny else
           loader_speed.measure(device, steps=8, rounds=1, threads=torch.get_num_threads()))
    print("loader", json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: check the script")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="which parts, comma-separated (they run in the order above)")
    parser.add_argument("--budget", type=float, default=280.0,
                        help="seconds for the whole check (default 280): a part is skipped when "
                             "less than it needs is left, and stopped when the budget runs out")
    parser.add_argument("--update", action="store_true",
                        help="add this call's parts to the results file of an earlier call on "
                             "the same device (--json, default benchmarks/results/gpu.json), "
                             "replacing the parts run again")
    parser.add_argument("--markdown", type=Path, default=None, metavar="GPU_JSON",
                        help="print the goals judged in a results file as a markdown table "
                             "(for docs/PERFORMANCE.md; measures nothing)")
    parser.add_argument("--knn-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-autotuning", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--demo-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pack-demo", action="store_true",
                        help="copy the demo's classes of this machine's prepared glyphs into "
                             "--demo-data (to carry to a machine that cannot render them)")
    parser.add_argument("--demo-source", type=Path, default=None,
                        help="the data folder holding the prepared glyphs (default: "
                             "$SOFTTRIPLE_DATA or data/)")
    parser.add_argument("--demo-data", type=Path, default=DEMO_DATA,
                        help="$SOFTTRIPLE_DATA of the demo part (default: .gpu_data)")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return
    if args.demo_child:
        demo_child(json.loads(args.demo_child), args.json, args.tiny)
        return
    if args.pack_demo:
        from softtriple.data.builtin import default_root
        packed = pack_demo(args.demo_source or default_root(), args.demo_data,
                           demo_classes(args.tiny))
        print(f"{args.demo_data / 'glyphs'}: {packed['images']} images, {packed['classes']} "
              "classes of glyphs, the demo's (carry this folder)")
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.knn_child:
        knn_child(args.knn_child, device, args.backend)
        return
    run_check(args, device)


def run_check(args: argparse.Namespace, device: torch.device) -> None:
    """The parts asked for, in PARTS' order, within ``args.budget`` seconds from the first
    part's start; the results written after each part, so that a call cut short keeps what it
    measured."""
    now = conditions(device)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "budget_seconds": args.budget,
                               "conditions": now, "tiny": args.tiny}
    target = args.json or default_target(device, args.tiny)
    if args.update:  # an earlier call's parts stay; the parts asked again are replaced
        results = earlier_results(target, now)
        results["command"] = f"{results['command']} ; {' '.join(sys.argv)}"
        results.setdefault("later_conditions", []).append(now)
        for name in args.parts.split(","):
            for where in (results, results.get("seconds", {}), results.get("skipped", {})):
                where.pop(name, None)
    ends = time.perf_counter() + args.budget
    asked = args.parts.split(",")
    unknown = sorted(set(asked) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; valid: {','.join(PARTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts: dict[str, Callable[[], Any]] = {
            "loss": lambda: loss_section(device, args.tiny),
            "trainer": lambda: trainer_section(device, args.tiny, work, not args.no_autotuning),
            "demo": lambda: demo_section(args.tiny, work, args.demo_data),
            "tests": lambda: tests_section(work),
            "loader": lambda: loader_section(device, args.tiny),
            "demo_graphed": lambda: demo_section(args.tiny, work, args.demo_data, "demo_graphed",
                                                 GRAPHED_DEMO),
            "eval": lambda: eval_section(device, args.tiny),
            "trainer_no_autotuning": lambda: no_autotuning_child(
                args.tiny, work, ends - time.perf_counter()),
            "kmeans": lambda: kmeans_section(device, args.tiny)}
        for name in (p for p in PARTS if p in asked):
            left = ends - time.perf_counter()
            # toy sizes and the no-autotuning child (its parent checked) need no least
            least = 0 if args.tiny or args.no_autotuning else LEAST_SECONDS[name]
            why = None
            if name == "demo_graphed" and device.type != "cuda":
                why = "model.cuda_graph needs CUDA"
            elif left <= least:
                why = (f"{max(left, 0):.0f} s of the budget left, it needs about {least} s: run "
                       f"it with --parts {name}")
            if why is not None:
                results.setdefault("skipped", {})[name] = why
                print(name, "skipped:", why, flush=True)
                write_results(results, args.json, device, args.tiny)
                continue
            start = time.perf_counter()
            try:
                with deadline(left):
                    results[name] = parts[name]()
            except Exception as error:  # one part's failure leaves the others' figures
                results[name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
                print(name, "failed:", results[name]["error"], flush=True)
            results.setdefault("seconds", {})[name] = time.perf_counter() - start
            write_results(results, args.json, device, args.tiny)  # each part's, if cut short
    if not args.no_autotuning:  # the no-autotuning child's parent gives the verdicts
        print("\n".join(verdict_lines(results["acceptance"])))
    print("wrote", args.json or default_target(device, args.tiny) or "$OUT")


def default_target(device: torch.device, tiny: bool) -> Path | None:
    """Where results go without --json: a GPU run's benchmarks/results/gpu.json; a toy or CPU
    run only to $OUT."""
    return RESULTS if device.type == "cuda" and not tiny else None


def earlier_results(target: Path | None, now: dict[str, Any]) -> dict[str, Any]:
    """``--update``: the results file this call adds its parts to (an earlier call's, on the
    same kind of device as ``now``, this call's conditions), or SystemExit naming what is
    wrong."""
    if target is None or not target.is_file():
        raise SystemExit(f"--update needs the earlier call's results at --json (no file "
                         f"{target}); copy its $OUT/gpu.json there first")
    earlier: dict[str, Any] = json.loads(target.read_text())
    if earlier["conditions"].get("gpu") != now.get("gpu"):
        raise SystemExit(f"{target} was measured on {earlier['conditions'].get('gpu')}, this "
                         f"machine is {now.get('gpu')}: figures of two devices do not mix; "
                         f"write this call's to another --json")
    return earlier


def goal(text: str, value: float | None, limit: float, at_most: bool = True) -> dict[str, Any]:
    """One of the issue's goals: ``met`` is None where the value was not measured."""
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"goal": text, "value": value, "limit": limit,
            "at": "most" if at_most else "least", "met": met}


def acceptance(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's must-show goals against what ``results`` measured, in the parts' order; a
    part not run, skipped or failed leaves its goals unmeasured (met None), never met."""
    def part(name: str) -> dict[str, Any]:
        found = results.get(name)
        return found if isinstance(found, dict) and "error" not in found else {}

    goals = []
    rows = results.get("loss")
    shapes = [row for row in rows if "error" not in row] if isinstance(rows, list) else []
    for b, d, c, k in (TINY_LOSS_SHAPES if results.get("tiny") else LOSS_SHAPES):
        row: dict[str, Any] = next(
            (r for r in shapes if (r["B"], r["d"], r["C"], r["K"]) == (b, d, c, k)), {})
        shape = f"B {b}, d {d}, C {c:,}, K {k}"
        goals += [goal(f"loss at {shape}: time over the three products",
                       row.get("ours_over_floor"), 1.5),
                  goal(f"loss at {shape}: time over PML's", row.get("ours_over_pml"), 0.5),
                  goal(f"loss at {shape}: peak memory over PML's",
                       row.get("memory_over_pml"), 0.7)]
    trainer = part("trainer")
    goals += [goal("trainer at 224 px: steady epoch's images/s over the in-memory step floor's",
                   trainer.get("steady_over_floor"), 0.8, at_most=False),
              goal("trainer: first epoch over a steady one", trainer.get("first_over_steady_epoch"),
                   1.5),
              goal("trainer: first evaluation over a later one",
                   trainer.get("first_over_later_eval"), 2.0)]
    demo = part("demo")
    goals += [goal("demo recipe: seconds after imports", demo.get("seconds_after_imports"), 30.0),
              goal("demo recipe: held-out Recall@1 minus the CPU demo's",
                   demo.get("recall@1_minus_cpu"), -DEMO_RECALL_TOLERANCE, at_most=False)]
    tests = part("tests")
    goals.append(goal("device tests: failed or errored",
                      tests["failures"] + tests["errors"] if tests else None, 0))
    return goals


def verdict_lines(goals: list[dict[str, Any]]) -> list[str]:
    """One line a goal: met, MISSED or not measured, its value against its limit."""
    lines = []
    for g in goals:
        state = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        lines.append(f"{state:>12}  {g['goal']}: {value} (at {g['at']} {g['limit']:g})")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    """The goals of a results file as docs/PERFORMANCE.md's table: goal, measured, limit,
    verdict, with the device it was measured on."""
    conditions = results["conditions"]
    device = conditions.get("gpu") or conditions["device"]
    driver = conditions.get("nvidia_smi", {})
    driver = driver.get("driver_version") if isinstance(driver, dict) else None
    lines = [f"Measured on {device}" + (f" (driver {driver})" if driver else "") +
             f", torch {conditions['torch']}, by `{results['command']}`:", "",
             "| goal | measured | limit | verdict |", "|---|---:|---:|---|"]
    for g in acceptance(results):
        state = {True: "met", False: "**missed**", None: "not measured"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        lines.append(f"| {g['goal']} | {value} | at {g['at']} {g['limit']:g} | {state} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], target: Path | None, device: torch.device,
                  tiny: bool) -> None:
    """To ``target`` (a GPU run's default: benchmarks/results/gpu.json) and $OUT/gpu.json, with
    the issue's goals judged on what is there (``acceptance``)."""
    results["acceptance"] = acceptance(results)
    target = target or default_target(device, tiny)
    if target is not None:
        write_json(target, results)
    out = os.environ.get("OUT")
    if out:
        write_json(Path(out) / "gpu.json", results)


if __name__ == "__main__":
    main()
