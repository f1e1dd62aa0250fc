"""Several processes with torch.distributed (gloo, CPU): every loss means the same thing on 1 or
N processes, the trainer's N-process runs equal its one-process run, and the samplers' blocks."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softtriple.data.samplers import ClassBalancedBatchSampler, ShardedBatchSampler
from softtriple.experiment import ConfigError
from softtriple.experiment.checkpoint import load_checkpoint
from softtriple.training import Trainer
from test_training import TINY, tiny

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", *args]


def run_checks(processes: int, *checks: str) -> None:
    done = subprocess.run(torchrun(processes, str(HERE / "distributed_checks.py"), *checks),
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("processes,checks", [
    (2, ["losses", "pipeline", "sharded_loss", "sharded_knn"]),
    (3, ["losses", "pipeline", "sharded_knn"]), (4, ["sharded_loss"])])
def test_every_loss_and_gradient_equals_one_process_on_the_global_batch(data_root, processes,
                                                                         checks):
    """Every loss (gathered where it couples the batch) and ShardedSoftTripleLoss: value and
    every gradient equal one process on the same global batch; the sharded kNN and evaluation
    equal one process (tests/distributed_checks.py)."""
    run_checks(processes, *checks)


@pytest.mark.parametrize("sampler", [
    lambda world, rank: ShardedBatchSampler(40, 12 // world, 3, world, rank),
    lambda world, rank: ClassBalancedBatchSampler(np.arange(40) % 10, 6 // world, 2, 3,
                                                  world, rank),
])
def test_the_ranks_blocks_in_rank_order_are_the_one_process_batch(sampler):
    one = list(sampler(1, 0))
    for world in (2, 3):
        blocks = [list(sampler(world, rank)) for rank in range(world)]
        joined = [[j for b in blocks for j in b[i]] for i in range(len(one))]
        assert joined == one


def _params(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run)
    return {**state["model"], **{f"loss.{k}": v for k, v in state["loss"].items()}}


def test_two_processes_train_like_one_on_the_same_global_batch(data_root, tmp_path):
    """Semi-hard triplet (gathered) with the class-balanced sampler and augmentation on; the
    two-node test below trains SoftTriple (no gather) with the shuffled sampler."""
    common = [*TINY, "schedule.epochs=2", "model.freeze_bn=true",
              "evaluation.before_training=false", "loss.name=triplet",
              "data.sampler=class_balanced", "data.images_per_class=4", "data.augment=true"]
    for name, launcher in (("one", [sys.executable, "-m", "softtriple"]),
                           ("two", torchrun(2, "-m", "softtriple"))):
        args = [*launcher, "train", "--out", str(tmp_path / name)]
        for item in common:
            args += ["--set", item]
        subprocess.run(args, check=True, env=ENV, capture_output=True, timeout=300)
    one, two = _params(tmp_path / "one"), _params(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r1["metrics"]["recall@1"] == pytest.approx(r2["metrics"]["recall@1"], abs=1e-6)
    log1 = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]
    log2 = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert [row["train/loss"] for row in log1] == pytest.approx(
        [row["train/loss"] for row in log2], rel=1e-4)  # the logged loss is the global one


def test_sync_bn_on_cpu_is_a_clear_error(data_root, tmp_path, monkeypatch):
    from softtriple import distributed
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="model.sync_bn needs CUDA devices"):
        Trainer(tiny(tmp_path / "run", "model.sync_bn=true", "run.device=cpu"))


def _train(launcher: list[str], out: Path, settings: list[str], *extra: str) -> None:
    args = [*launcher, "train", "--out", str(out), *extra]
    for item in settings:
        args += ["--set", item]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _sharded_params(run: Path) -> dict[str, torch.Tensor]:
    from softtriple.experiment.checkpoint import read_center_rows
    state = load_checkpoint(run)
    centers = read_center_rows(run / "checkpoints", state["center_blocks"], 0,
                               state["num_classes"])
    return {**state["model"], "centers": centers["centers"], "exp_avg": centers["exp_avg"]}


def test_sharded_centers_train_like_one_process_and_resume_on_another_count(data_root, tmp_path):
    settings = [*TINY, "model.freeze_bn=true", "evaluation.before_training=false",
                "loss.shard_centers=true", "loss.args={centers_per_class: 3}"]
    one = [sys.executable, "-m", "softtriple"]
    _train(one, tmp_path / "one", [*settings, "schedule.epochs=2"])
    _train(torchrun(2, "-m", "softtriple"), tmp_path / "two", [*settings, "schedule.epochs=1"])
    blocks = sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("centers-*.pt"))
    assert blocks == ["centers-000000000-000000003-step4.pt",  # 5 digits over 2 processes
                      "centers-000000003-000000005-step4.pt"]
    _train(one, tmp_path / "two", [*settings, "schedule.epochs=2"], "--resume",
           str(tmp_path / "two"))  # resharded onto one process
    assert [p.name for p in (tmp_path / "two" / "checkpoints").glob("centers-*.pt")] == [
        "centers-000000000-000000005-step8.pt"]  # the two-process blocks are gone
    a, b = _sharded_params(tmp_path / "one"), _sharded_params(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    ra = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]
    rb = json.loads((tmp_path / "two" / "results.json").read_text())["metrics"]
    assert ra["effective_centers"] == rb["effective_centers"]
    assert ra["recall@1"] == pytest.approx(rb["recall@1"], abs=1e-6)
    from softtriple.cli import main  # the report reads every block's centers
    assert main(["report", str(tmp_path / "two")]) == 0
    assert (tmp_path / "two" / "plots" / "effective_centers.png").is_file()
    assert (tmp_path / "two" / "plots" / "center_images.png").is_file()


def test_shard_centers_is_refused_for_a_loss_without_centers():
    from softtriple.experiment import load_config
    from softtriple.experiment.build import build_config_loss
    config = load_config(None, ["loss.name=triplet", "loss.shard_centers=true"])
    with pytest.raises(ConfigError, match="loss.shard_centers applies to softtriple, "
                                          "hardtriple, softmax_norm; triplet has no class"):
        build_config_loss(config, 10)


def test_a_two_node_job_on_one_machine_trains_like_one_process(data_root, tmp_path):
    """Two torchrun launches, as on two machines: --nnodes 2, a --node-rank each, one c10d
    rendezvous endpoint (localhost here, the first node's address on a real cluster)."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    settings = [*TINY, "schedule.epochs=2", "model.freeze_bn=true",
                "evaluation.before_training=false", "data.augment=true"]
    flags = [arg for item in settings for arg in ("--set", item)]
    _train([sys.executable, "-m", "softtriple"], tmp_path / "one", settings)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"localhost:{port}", "--rdzv-id", "two-nodes", "-m", "softtriple", "train", "--out",
         str(tmp_path / "nodes"), *flags], env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-3000:]
    one, two = _params(tmp_path / "one"), _params(tmp_path / "nodes")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]
    r2 = json.loads((tmp_path / "nodes" / "results.json").read_text())["metrics"]
    assert r1["recall@1"] == pytest.approx(r2["recall@1"], abs=1e-6)
    from softtriple.experiment.run_folder import (
        read_embeddings,  # streamed shard by shard into one file
    )
    e1, l1, p1 = read_embeddings(tmp_path / "one" / "test_embeddings.npz")
    e2, l2, p2 = read_embeddings(tmp_path / "nodes" / "test_embeddings.npz")
    np.testing.assert_allclose(e1, e2, rtol=1e-4, atol=1e-5)
    assert (l1 == l2).all() and p1 == p2


def test_initial_sharded_centers_do_not_depend_on_the_process_count():
    from softtriple.distributed import block as class_block
    from softtriple.losses.sharded_softtriple import init_center_block
    full = init_center_block(0, 3000, 3, 8, seed=1)
    for world in (2, 3, 7):
        blocks = [class_block(3000, world, rank) for rank in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == 3000
        assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
        joined = torch.cat([init_center_block(*block, 3, 8, seed=1) for block in blocks])
        assert torch.equal(joined, full)
    assert not torch.equal(init_center_block(0, 3000, 3, 8, seed=2), full)


def test_sharded_loss_in_one_process_is_softtriple():
    from softtriple.losses import SoftTripleLoss
    from softtriple.losses.sharded_softtriple import ShardedSoftTripleLoss
    torch.manual_seed(0)
    x, y = torch.randn(12, 8, dtype=torch.float64), torch.randint(0, 5, (12,))
    single = SoftTripleLoss(5, 8, centers_per_class=3).double()
    sharded = ShardedSoftTripleLoss(5, 8, centers_per_class=3).double()
    sharded.centers.data.copy_(single.centers.data)
    x.requires_grad_(True)
    got = torch.autograd.grad(sharded(x, y), [x, sharded.centers])
    want = torch.autograd.grad(single(x, y), [x, single.centers])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(sharded(x, y), single(x, y))
    assert torch.autograd.gradcheck(lambda e: sharded(e, y), (x,))


def test_a_per_process_batch_that_splits_a_class_is_refused(data_root):
    from softtriple.data import DataError
    from softtriple.experiment import load_config
    from softtriple.experiment.loaders import build_loaders
    config = load_config(None, ["data.sampler=class_balanced", "data.images_per_class=4",
                                "data.batch_size=12"])
    build_loaders(config.data, 8, 0)  # one process: 3 classes of 4
    with pytest.raises(DataError, match=r"data.batch_size 12 \(6 per process\) must be a "
                                        r"multiple of data.images_per_class 4"):
        build_loaders(config.data, 8, 0, world=2, rank=0)


def test_center_blocks_written_by_any_process_count_read_back_for_any_other(tmp_path):
    from softtriple.distributed import block as class_block
    from softtriple.experiment.checkpoint import (
        CheckpointError,
        center_block_name,
        read_center_rows,
        save_checkpoint,
    )
    full = torch.randn(11, 3, 4)
    moments = torch.rand(11, 3, 4)
    names = []
    for rank in range(3):  # written by 3 processes
        start, stop = class_block(11, 3, rank)
        names.append(center_block_name(start, stop, 7))
        save_checkpoint(tmp_path / names[-1], {"start": start, "stop": stop,
                                               "centers": full[start:stop],
                                               "exp_avg": moments[start:stop],
                                               "exp_avg_sq": moments[start:stop] ** 2,
                                               "step": torch.tensor(7.0)})
    for world in (1, 2, 4, 11):  # read by others
        for rank in range(world):
            start, stop = class_block(11, world, rank)
            rows = read_center_rows(tmp_path, names, start, stop)
            assert torch.equal(rows["centers"], full[start:stop])
            assert torch.equal(rows["exp_avg_sq"], moments[start:stop] ** 2)
            assert float(rows["step"]) == 7.0
    (tmp_path / names[1]).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"center block .*centers-000000004-000000008-"
                                              r"step7.pt is truncated or corrupt"):
        read_center_rows(tmp_path, names, 0, 11)
    with pytest.raises(CheckpointError, match="do not cover classes 0 to 10"):
        read_center_rows(tmp_path, [names[0], names[2]], 0, 11)


def test_neighbours_command_on_two_processes_equals_knn(tmp_path):
    from softtriple.evaluation import knn
    from softtriple.experiment.run_folder import read_embedding_rows, write_embeddings
    rng = np.random.default_rng(0)
    gallery, queries = rng.normal(size=(41, 6)), rng.normal(size=(13, 6))
    write_embeddings(tmp_path / "g.npz", gallery, np.arange(41) % 5, [f"g{i}" for i in range(41)])
    write_embeddings(tmp_path / "q.npz", queries, np.arange(13) % 5, [f"q{i}" for i in range(13)])
    np.testing.assert_array_equal(read_embedding_rows(tmp_path / "g.npz", 7, 20),
                                  gallery[7:20].astype(np.float32))  # memory-mapped rows
    done = subprocess.run(torchrun(2, "-m", "softtriple", "neighbours", str(tmp_path / "g.npz"),
                                   "--queries", str(tmp_path / "q.npz"), "-k", "4", "--out",
                                   str(tmp_path / "knn.npz")), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 process(es)" in done.stdout and "recall@4" in done.stdout
    sims, index = knn(queries.astype(np.float32), 4, gallery.astype(np.float32))
    with np.load(tmp_path / "knn.npz") as found:
        np.testing.assert_array_equal(found["indices"], index.numpy())
        np.testing.assert_allclose(found["similarities"], sims.numpy(), rtol=1e-5, atol=1e-6)


def test_each_process_decodes_and_embeds_only_its_shard_of_the_test_split(data_root):
    """Under N processes each rank's test loader holds its contiguous shard of the test split,
    decoded once for itself alone; the shards, in rank order, are the one-process test set."""
    from softtriple.experiment import load_config
    from softtriple.experiment.loaders import build_loaders
    config = load_config(None, ["data.image_size=16", "data.workers=0", "data.batch_size=30"])
    whole = build_loaders(config.data, 64, 0).test.dataset
    shards = [build_loaders(config.data, 64, 0, world=3, rank=r).test.dataset
              for r in range(3)]
    assert [len(s) for s in shards] == [len(p) for p in np.array_split(np.arange(len(whole)), 3)]
    assert sum(s.decoded.nbytes for s in shards) == whole.decoded.nbytes  # each its own only
    images = torch.cat([torch.stack([s[i][0] for i in range(len(s))]) for s in shards])
    assert torch.equal(images, torch.stack([whole[i][0] for i in range(len(whole))]))
    assert np.array_equal(np.concatenate([s.labels for s in shards]), whole.labels)
