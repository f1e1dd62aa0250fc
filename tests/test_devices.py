"""Every place that moves tensors between devices, with the device as a parameter: on the CPU
here, and on CUDA too where a GPU is present, so a GPU run exercises code that ran here."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from softtriple.evaluation import evaluate, knn
from softtriple.evaluation.metrics import kmeans
from softtriple.models import embed

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(n: int = 300, d: int = 12, classes: int = 15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, d))[y] + 0.8 * rng.standard_normal((n, d))
    return x.astype(np.float32), y


@pytest.mark.parametrize("device", DEVICES)
def test_knn_runs_on_the_inputs_device_and_matches_numpy(device):
    x, _ = _data()
    expected_sims, expected_index = knn(x, 10, block=64)
    sims, index = knn(torch.from_numpy(x).to(device), 10, block=64)
    assert sims.device.type == index.device.type == device
    torch.testing.assert_close(sims.cpu(), expected_sims)
    assert torch.equal(index.cpu(), expected_index)
    _, index_g = knn(torch.from_numpy(x[:40]).to(device), 7, torch.from_numpy(x).to(device))
    assert torch.equal(index_g.cpu(), knn(x[:40], 7, x)[1])


@pytest.mark.parametrize("device", DEVICES)
def test_knn_default_tiles_on_the_device_match_small_tiles(device):
    """The default tile (4,096 rows on a CPU, sized to free memory on CUDA) finds the same
    neighbours, in the same order, as tiles of 16 rows, on rows with exact duplicates (ties)."""
    x, _ = _data()
    x = torch.from_numpy(np.concatenate([x, x[::3]])).to(device)
    assert torch.equal(knn(x, 10)[1].cpu(), knn(x.cpu(), 10, block=16)[1])
    assert torch.equal(knn(x[:60], 7, x)[1].cpu(), knn(x[:60].cpu(), 7, x.cpu(), block=16)[1])


def test_accelerator_tiles_are_sized_to_free_memory():
    from softtriple.evaluation.knn import block_for_memory, default_block

    assert default_block(torch.device("cpu")) == 4096
    assert block_for_memory(139 * 2**30) == 55296  # an H200's: a quarter holds 3 tiles of it
    assert 55296**2 * 4 * 3 <= 139 * 2**30 / 4 < 56320**2 * 4 * 3
    assert block_for_memory(20 * 2**30) == 20480
    assert block_for_memory(2**28) == 4096  # the smallest
    assert block_for_memory(2**50) == 65536  # the largest


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_and_kmeans_take_device_tensors(device):
    x, y = _data()
    on_device = torch.from_numpy(x).to(device)
    metrics = ("recall", "precision_at_1", "r_precision", "map_at_r", "nmi")
    assert evaluate(on_device, torch.from_numpy(y).to(device), metrics=metrics) == \
        evaluate(x, y, metrics=metrics)
    np.testing.assert_array_equal(kmeans(on_device, 15), kmeans(x, 15))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_kmeans_clusters_on_the_embeddings_device(device, monkeypatch):
    """evaluation.kmeans.backend=torch: k-means++ and Lloyd on the rows' device (no copy of the
    rows to the host before the labels), repeatable there, and within float rounding of the
    CPU's clustering (its NMI within 0.02)."""
    from softtriple.evaluation import KMeansSettings, clustering
    from softtriple.evaluation.metrics import normalized_mutual_info

    x, y = _data(n=600, d=32, classes=30)
    on_device = torch.from_numpy(x).to(device)
    devices = []
    assign = clustering._assign
    monkeypatch.setattr(clustering, "_assign", lambda rows, *rest: (
        devices.append(rows.device.type), assign(rows, *rest))[1])
    settings = KMeansSettings(backend="torch")
    labels = kmeans(on_device, 30, 0, settings)
    assert set(devices) == {device}
    assert np.array_equal(labels, kmeans(on_device, 30, 0, settings))
    cpu = kmeans(x, 30, 0, settings)
    assert abs(normalized_mutual_info(y, labels) - normalized_mutual_info(y, cpu)) < 0.02
    result = evaluate(on_device, torch.from_numpy(y).to(device), metrics=("nmi", "ami"),
                      kmeans_settings=settings)
    assert result["kmeans"].startswith("torch k-means++") and 0 < result["nmi"] <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_default_kmeans_clusters_where_the_embeddings_are(device):
    """backend auto (the default): scikit-learn for embeddings on the CPU, torch for those on a
    GPU (clustered there, not copied to the host's scikit-learn); the result names the one that
    ran."""
    from softtriple.evaluation import KMeansSettings

    x, y = _data(n=600, d=32, classes=30)
    on_device, labels = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    ran = "sklearn" if device == "cpu" else "torch"
    default = evaluate(on_device, labels, metrics=("nmi", "ami"))
    explicit = evaluate(on_device, labels, metrics=("nmi", "ami"),
                        kmeans_settings=KMeansSettings(backend=ran))
    assert default == explicit and default["kmeans"].startswith(f"{ran} k-means++")
    assert KMeansSettings().resolved(torch.device("meta")).backend == "torch"
    assert KMeansSettings(backend="sklearn").resolved(torch.device("meta")).backend == "sklearn"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_embed_moves_batches_to_the_device_and_returns_float32_on_the_host(device,
                                                                           autocast_dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).to(device)
    images = torch.randn(10, 3, 4, 4)
    loader = DataLoader(TensorDataset(images, torch.zeros(10), torch.arange(10)), batch_size=4,
                        pin_memory=device == "cuda")
    out = embed(model, loader, device, autocast_dtype, channels_last=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (10, 5)
    expected = model(images.to(device)).detach().cpu().numpy()
    tolerance = 1e-6 if autocast_dtype is None else 5e-2  # bf16: 8-bit mantissa
    np.testing.assert_allclose(out, expected, atol=tolerance, rtol=tolerance)


class _BatchSizes(torch.nn.Module):
    """A model that records the batch size of every forward it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 4 * 4, 5)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.linear(x.flatten(1))  # type: ignore[no-any-return]


@pytest.mark.parametrize("device", DEVICES)
def test_embed_pads_the_last_batch_to_one_shape_where_cudnn_autotunes_each(device):
    """With pad_last (the default under cuDNN's autotuning on CUDA) every forward has the
    loader's batch size, and the embeddings are the unpadded ones, none of the padding's."""
    torch.manual_seed(0)
    model = _BatchSizes().to(device)
    images = torch.randn(10, 3, 4, 4)
    loader = DataLoader(TensorDataset(images, torch.zeros(10), torch.arange(10)), batch_size=4)
    plain = embed(model, loader, device, pad_last=False)
    assert model.sizes == [4, 4, 2]
    model.sizes.clear()
    padded = embed(model, loader, device, pad_last=True)
    assert model.sizes == [4, 4, 4] and padded.shape == (10, 5)
    np.testing.assert_allclose(padded, plain, atol=1e-6, rtol=1e-6)
    model.sizes.clear()
    embed(model, loader, device)  # the default: pad only where cuDNN autotunes each shape
    autotuning = device == "cuda" and torch.backends.cudnn.benchmark
    assert model.sizes == ([4, 4, 4] if autotuning else [4, 4, 2])


class _HostlessTensor(torch.Tensor):
    """A tensor that, like a CUDA tensor, refuses to become a numpy array until it is copied to
    the host with ``.cpu()``: labels on any device, checked without a GPU."""

    def numpy(self, *args, **kwargs):  # type: ignore[override]
        raise TypeError("can't convert this device's tensor to numpy: use Tensor.cpu() first")

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert this device's tensor to numpy: use Tensor.cpu() first")

    def cpu(self, *args, **kwargs):  # type: ignore[override]
        return self.as_subclass(torch.Tensor)


def test_every_metric_takes_labels_that_only_copy_to_the_host():
    from softtriple.evaluation import (
        map_at_r,
        nmi,
        normalized_mutual_info,
        r_precision,
        recall_at_k,
    )
    from softtriple.evaluation.metrics import Neighbours

    x, y = _data()
    labels = torch.from_numpy(y).as_subclass(_HostlessTensor)
    with pytest.raises(TypeError):
        np.asarray(labels)  # the stand-in behaves as a CUDA tensor does
    metrics = ("recall", "precision_at_1", "r_precision", "map_at_r", "nmi", "ami")
    assert evaluate(x, labels, metrics=metrics) == evaluate(x, y, metrics=metrics)
    gallery = {"gallery": x[100:], "gallery_labels": labels[100:]}
    assert evaluate(x[:100], labels[:100], metrics=metrics[:4], **gallery) == \
        evaluate(x[:100], y[:100], metrics=metrics[:4], gallery=x[100:], gallery_labels=y[100:])
    assert recall_at_k(x, labels) == recall_at_k(x, y)
    assert r_precision(x, labels) == r_precision(x, y)
    assert map_at_r(x, labels) == map_at_r(x, y)
    assert nmi(x, labels) == nmi(x, y)
    assert normalized_mutual_info(labels, labels) == normalized_mutual_info(y, y)
    _, index = knn(x, 5)
    assert np.array_equal(Neighbours.from_index(index, labels).matches,
                          Neighbours.from_index(index, y).matches)


@pytest.mark.parametrize("device", DEVICES)
def test_the_bf16_engine_runs_on_the_inputs_device_and_matches_float32(device):
    x, _ = _data()
    on_device = torch.from_numpy(x).to(device)
    sims, index = knn(on_device, 10, backend="bf16")
    assert sims.device.type == index.device.type == device
    expected_sims, expected_index = knn(on_device, 10, backend="torch")
    assert torch.equal(index, expected_index) and torch.equal(sims, expected_sims)
    _, gallery_index = knn(on_device[:40], 7, on_device, backend="bf16")
    assert torch.equal(gallery_index, knn(on_device[:40], 7, on_device, backend="torch")[1])


# torch >= 2.9 sets float32 products' precision per backend; before, one process-wide switch
PER_BACKEND = hasattr(torch.backends.cuda.matmul, "fp32_precision")
IEEE = "ieee" if PER_BACKEND else "highest"  # what the search holds, in this torch's words


def fp32_products() -> str:
    """How float32 products are computed now, in this torch's own setting."""
    if PER_BACKEND:
        return str(torch.backends.cuda.matmul.fp32_precision)
    return torch.get_float32_matmul_precision()


@contextlib.contextmanager
def callers_reduced_precision(device: str) -> Iterator[None]:
    """What a training script sets for speed: autocast to bf16 on the device; on CUDA, TF32 for
    float32 products (``torch.set_float32_matmul_precision("high")``) and bf16 products reduced
    in bf16 (torch's default); on a CPU, oneDNN's bf16 for float32 products (torch < 2.9: the
    one switch, "medium", gives both)."""
    cuda = torch.backends.cuda.matmul
    if PER_BACKEND:
        mkldnn = torch.backends.mkldnn.matmul
        saved = (cuda.fp32_precision, cuda.allow_bf16_reduced_precision_reduction,
                 mkldnn.fp32_precision)
        cuda.fp32_precision, cuda.allow_bf16_reduced_precision_reduction = "tf32", True
        mkldnn.fp32_precision = "bf16"
    else:
        saved = (torch.get_float32_matmul_precision(), cuda.allow_bf16_reduced_precision_reduction)
        torch.set_float32_matmul_precision("medium")
        cuda.allow_bf16_reduced_precision_reduction = True
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            yield
    finally:
        if PER_BACKEND:
            (cuda.fp32_precision, cuda.allow_bf16_reduced_precision_reduction,
             mkldnn.fp32_precision) = saved
        else:
            torch.set_float32_matmul_precision(saved[0])
            cuda.allow_bf16_reduced_precision_reduction = saved[1]


def _precision_flags() -> tuple[object, ...]:
    mkldnn = torch.backends.mkldnn.matmul.fp32_precision if PER_BACKEND else None
    return (fp32_products(), torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            mkldnn, torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "bf16", "numpy"])
def test_exact_search_ignores_the_callers_reduced_precision(device, backend):
    """Called from a training loop that runs in reduced precision, the search still multiplies
    in float32 (the bf16 engine's candidate pass accumulating in float32, its bound's premise):
    the same neighbours and similarities, bit for bit, and the caller's settings as they were
    after it. Under CPU autocast the bf16 engine re-ranked in bf16: 1,591 of 3,000 rows' lists
    differed."""
    if backend == "numpy" and device != "cpu":
        pytest.skip("the numpy engine takes host rows")
    x, y = _data(n=600, d=64)
    rows = torch.from_numpy(x).to(device)
    expected = [knn(rows, 10, backend=backend), knn(rows[:40], 7, rows, backend=backend)]
    from softtriple.evaluation import KMeansSettings
    from softtriple.evaluation.engines import available

    # NMI's k-means: the torch backend's distances, or k-means++'s for faiss
    clustering = KMeansSettings(backend="torch" if backend != "numpy" or "faiss" not in
                                available() else "faiss", starts=2)
    labels, metrics = torch.from_numpy(y).to(device), ["recall", "map_at_r", "nmi"]
    expected_metrics = evaluate(rows, labels, metrics=metrics, backend=backend,
                                kmeans_settings=clustering)
    with callers_reduced_precision(device):
        flags = _precision_flags()
        got = [knn(rows, 10, backend=backend), knn(rows[:40], 7, rows, backend=backend)]
        got_metrics = evaluate(rows, labels, metrics=metrics, backend=backend,
                               kmeans_settings=clustering)
        assert _precision_flags() == flags  # the caller's, restored
    for (sims, index), (expected_sims, expected_index) in zip(got, expected, strict=True):
        assert sims.dtype == torch.float32
        assert torch.equal(index, expected_index) and torch.equal(sims, expected_sims)
    assert got_metrics == expected_metrics


@pytest.mark.parametrize("setting", ["set_float32_matmul_precision", "allow_tf32", "none"])
def test_the_search_gives_back_the_callers_tf32_setting_in_the_callers_api(setting):
    """torch refuses to read a mix of its legacy and per-backend precision settings; around the
    search the caller's reads answer as before, whichever kind it wrote (no GPU needed: these
    are process-wide settings)."""
    from softtriple.evaluation.float32 import float32_products

    matmul = torch.backends.cuda.matmul
    try:
        if setting == "set_float32_matmul_precision":
            torch.set_float32_matmul_precision("high")
        elif setting == "allow_tf32":
            matmul.allow_tf32 = True
        before = (torch.get_float32_matmul_precision(), matmul.allow_tf32, fp32_products())
        with float32_products(torch.device("cuda")):
            assert fp32_products() == IEEE
            assert not matmul.allow_bf16_reduced_precision_reduction
        assert (torch.get_float32_matmul_precision(), matmul.allow_tf32,
                fp32_products()) == before
        assert matmul.allow_bf16_reduced_precision_reduction
    finally:  # torch's defaults again, through the API the test wrote
        if setting == "set_float32_matmul_precision":
            torch.set_float32_matmul_precision("highest")
        elif setting == "allow_tf32":
            matmul.allow_tf32 = False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_images_normalized_on_the_device_equal_torchvisions_bit_for_bit(device, memory_format):
    """The loaders give uint8 images and the model normalizes them on its device: the result
    equals torchvision's ToDtype(float32, scale=True) + Normalize on each image (the pipeline's
    former tail, in the workers) bit for bit, keeps the batch's memory format, and the model's
    features of the uint8 batch equal those of the float batch torchvision would have given."""
    from torchvision.transforms import v2

    from softtriple.data import normalize_images
    from softtriple.models import EmbeddingModel
    from softtriple.models.backbones import build_backbone

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 9, 7), dtype=torch.uint8, generator=g)
    mean, std = (127 / 255, 0.456, 0.406), (128 / 255, 0.224, 0.225)  # Lite's, ImageNet's
    former = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean),
                                                                              list(std))])
    expected = torch.stack([former(image) for image in images])
    batch = images.to(device).contiguous(memory_format=memory_format)
    got = normalize_images(batch, mean, std)
    assert got.dtype == torch.float32 and got.device.type == device
    assert got.is_contiguous(memory_format=memory_format)
    assert torch.equal(got.cpu(), expected)
    model = EmbeddingModel(build_backbone("small_cnn"), 8).to(device).eval()
    model.input_mean.copy_(torch.tensor(mean).view(3, 1, 1))
    model.input_std.copy_(torch.tensor(std).view(3, 1, 1))
    with torch.no_grad():
        same = expected.to(device).contiguous(memory_format=memory_format)  # same kernels
        assert torch.equal(model(batch), model(same))
    assert "input_mean" not in model.state_dict()  # the backbone's, not a checkpoint's


def test_searches_in_two_threads_leave_the_callers_settings_as_they_were():
    """The settings are process-wide: held from the first search in to the last one out, so
    that a thread leaving first neither restores them under the other nor leaks forced ones."""
    import threading

    from softtriple.evaluation.float32 import float32_products

    before = fp32_products()
    entered, leave_first, first_left = threading.Event(), threading.Event(), threading.Event()
    seen: list[str] = []

    def first() -> None:
        with float32_products(torch.device("cpu")):
            entered.set()
            leave_first.wait(10)
        first_left.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(10)
    with float32_products(torch.device("cpu")):
        leave_first.set()
        assert first_left.wait(10)
        seen.append(fp32_products())  # the first thread has left; this one holds them
    thread.join(10)
    assert seen == [IEEE] and fp32_products() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine without a GPU is the case")
def test_a_run_trained_on_cuda_is_evaluated_and_embedded_where_no_gpu_is(data_root, tmp_path,
                                                                        capsys):
    """A run that named run.device: cuda (and fp16) is used on a machine without a GPU: on the
    CPU in fp32, said in one line, with the metrics of the same model on the CPU, where it was
    refused ("run.device is cuda but no GPU is visible"), with no way to ask for the CPU."""
    from softtriple.cli import main
    from softtriple.training import Trainer
    from test_training import tiny

    run = tmp_path / "run"
    Trainer(tiny(run, "schedule.epochs=1", "evaluation.before_training=false",
                 "evaluation.metrics=[recall]")).train()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["run"] |= {"device": "cuda", "precision": "fp16"}
    torch.save(state, tmp_path / "gpu_run.pt")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "gpu_run.pt"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "no GPU is visible here, so its model runs on the CPU in fp32" in captured.err
    assert json.loads(captured.out)["recall@1"] == pytest.approx(
        json.loads((run / "results.json").read_text())["metrics"]["recall@1"])
    assert main(["embed", str(tmp_path / "gpu_run.pt"), "--out", str(tmp_path / "e.npz")]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_plus_plus_on_the_device_draws_the_host_paths_seeds(device):
    """The seeding that never waits for the device (cumulative weights and choices there, the
    random numbers drawn up front) picks the host path's seeds wherever float rounding does not
    decide (on the CPU: all of them, duplicated rows included), and on rows that sit on fewer
    distinct points than clusters it repeats a row rather than fail."""
    from softtriple.evaluation import KMeansSettings
    from softtriple.evaluation.clustering import cluster_rows, kmeans_plus_plus

    x, _ = _data(n=600, d=16, classes=30)
    rows = torch.from_numpy(np.concatenate([x, x[:200]])).to(device)  # 200 rows twice
    seeds = kmeans_plus_plus(rows, 120, np.random.default_rng(4), on_device=True)
    host = kmeans_plus_plus(rows.cpu(), 120, np.random.default_rng(4), on_device=False)
    assert isinstance(seeds, torch.Tensor) and seeds.device.type == device
    if device == "cpu":
        assert torch.equal(seeds, host)
    assert len(torch.unique(seeds, dim=0)) == 120  # distinct points, as the host path's
    few = torch.from_numpy(x[:3]).repeat(20, 1).to(device)  # 3 distinct rows, 60 in all
    for on_device in (False, True):
        found = kmeans_plus_plus(few, 5, np.random.default_rng(0), on_device=on_device)
        assert len(torch.unique(found, dim=0)) == 3
    labels = cluster_rows(few, 5, 0, KMeansSettings(backend="torch"))
    assert labels.shape == (60,) and labels.min() >= 0 and labels.max() < 5


@pytest.mark.parametrize("device", DEVICES)
def test_neighbours_of_an_embeddings_file_search_on_the_device(device, tmp_path, capsys):
    """`softtriple neighbours` (one process) searches where it is told, a GPU by default where
    one is visible, and finds knn's neighbours; --device cuda without a GPU is one line."""
    from softtriple.cli import main
    from softtriple.experiment.run_folder import write_embeddings
    from softtriple.search import file_neighbours

    x, y = _data()
    gallery = write_embeddings(tmp_path / "g.npz", x, y, [f"{i}.png" for i in range(len(y))])
    queries = write_embeddings(tmp_path / "q.npz", x[:40], y[:40], [str(i) for i in range(40)])
    expected = knn(x, 5)
    found = file_neighbours(gallery, 5, device=device)
    assert found is not None and np.array_equal(found.indices, expected[1].numpy())
    np.testing.assert_allclose(found.similarities, expected[0].numpy(), rtol=0, atol=1e-5)
    of_queries = file_neighbours(gallery, 7, queries, device=device)
    assert of_queries is not None
    assert np.array_equal(of_queries.indices, knn(x[:40], 7, x)[1].numpy())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no GPU is visible; use auto or cpu"):
            file_neighbours(gallery, 5, device="cuda")
        assert main(["neighbours", str(gallery), "-k", "5", "--out", str(tmp_path / "n.npz"),
                     "--device", "cuda"]) == 2
        assert "no GPU is visible" in capsys.readouterr().err
