"""Checks that run inside a real torch.distributed job (gloo, CPU), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=3 tests/distributed_checks.py \
        losses sharded_loss sharded_knn

Every rank computes the single-process reference itself (same seeds, the whole global batch) and
compares its own distributed result with it; any mismatch raises, so torchrun exits non-zero and
names the check. tests/test_distributed.py launches it with 2, 3 and 4 processes.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from softtriple import distributed as dist
from softtriple.experiment.build import Objective
from softtriple.losses import LOSSES, build_loss

IN_DIM, DIM, CLASSES = 12, 8, 6
LOSS_ARGS = {  # small, fast settings of every loss
    "softtriple": {"num_classes": CLASSES, "embedding_dim": DIM, "centers_per_class": 3},
    "hardtriple": {"num_classes": CLASSES, "embedding_dim": DIM, "centers_per_class": 3},
    "softmax_norm": {"num_classes": CLASSES, "embedding_dim": DIM},
    "proxy_nca": {"num_classes": CLASSES, "embedding_dim": DIM},
    "proxy_anchor": {"num_classes": CLASSES, "embedding_dim": DIM},
    "npair": {}, "lifted": {}, "triplet": {}, "clustering": {},
    "contrastive": {}, "multi_similarity": {},
    "arcface": {"num_classes": CLASSES, "embedding_dim": DIM},
    "cosface": {"num_classes": CLASSES, "embedding_dim": DIM},
    "subcenter_arcface": {"num_classes": CLASSES, "embedding_dim": DIM},
}


def close(a: Tensor, b: Tensor, what: str, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"rank {dist.rank()} of {dist.world_size()}: {what} differs from "
                             f"one process by {float((a - b).abs().max()):.3g}")


def global_batch(world: int, per_rank: int = 8) -> tuple[Tensor, Tensor]:
    """A class-balanced global batch (2 images per class, classes in order) of inputs."""
    g = torch.Generator().manual_seed(7)
    n = per_rank * world
    labels = torch.randperm(CLASSES, generator=g).repeat_interleave(2).repeat(n // 12 + 1)[:n]
    return torch.randn(n, IN_DIM, generator=g), labels


def check_losses() -> None:
    """Each loss's value and every gradient under DDP (gathered where the loss needs it) equal
    the single-process ones on the same global batch; coupled losses differ without it."""
    world, me = dist.world_size(), dist.rank()
    x, y = global_batch(world)
    b = x.shape[0] // world
    mine = slice(me * b, (me + 1) * b)
    for name in LOSSES:
        torch.manual_seed(0)
        model = nn.Linear(IN_DIM, DIM)
        loss = build_loss(name, **LOSS_ARGS[name])
        reference = Objective(copy.deepcopy(model), copy.deepcopy(loss))
        ref_value = reference(x, y)
        ref_value.backward()
        expected = {n: p.grad for n, p in reference.named_parameters()}
        for gather in (True, False):
            objective = Objective(copy.deepcopy(model), copy.deepcopy(loss),
                                  gather=gather and loss.needs_global_batch)
            ddp = nn.parallel.DistributedDataParallel(objective)
            value = ddp(x[mine], y[mine])
            value.backward()
            got = {n: p.grad for n, p in objective.named_parameters()}
            exact = gather or not loss.needs_global_batch
            if not exact:  # the per-rank objective is another one: say that it differs
                if all(torch.allclose(got[n], expected[n], rtol=1e-3) for n in expected):
                    raise AssertionError(f"{name} without gather equals one process: the "
                                         f"check cannot tell the two apart")
                continue
            mean = value if loss.needs_global_batch else torch.tensor(dist.mean(value.item()))
            close(mean.detach(), ref_value.detach(), f"{name}'s loss")
            for n in expected:
                close(got[n], expected[n], f"{name}'s gradient of {n}")
    from softtriple.losses.sharded_softtriple import ShardedSoftTripleLoss
    uneven = torch.randn(4 + me, DIM)  # one line, not a failure deep inside an all-gather
    for gather in (lambda e, y: dist.gather_batch(e, y),
                   lambda e, y: ShardedSoftTripleLoss(CLASSES, DIM, centers_per_class=2)(e, y)):
        try:
            gather(uneven, torch.zeros(4 + me, dtype=torch.long))
        except ValueError as error:
            if "every process must pass a batch of the same size" not in str(error):
                raise
        else:
            raise AssertionError("batches of different sizes were gathered")
    print(f"rank {me}: every loss equals one process on {world} processes")


def check_pipeline() -> None:
    """The real pipeline ($SOFTTRIPLE_DATA's digits, augmentation on, the shuffled and the
    class-balanced sampler, a small CNN with frozen BatchNorm): each rank's batch is its block
    of the one-process batch, augmentation included, and every loss's gradients of the whole
    network equal one process's."""
    from softtriple.experiment import load_config
    from softtriple.experiment.build import build_config_loss, build_model
    from softtriple.experiment.loaders import build_loaders
    world, me = dist.world_size(), dist.rank()
    per_rank = 2 if world == 2 else 1  # classes per rank: 5 digits to train on
    for sampler in ("random", "class_balanced"):
        config = load_config(None, [
            "model.backbone=small_cnn", "model.embedding_dim=8", "model.freeze_bn=true",
            "data.image_size=16", "data.workers=0", "data.augment=true",
            f"data.sampler={sampler}", "data.images_per_class=4",
            f"data.batch_size={4 * per_rank * world}"])
        torch.manual_seed(0)
        model = build_model(config)
        batches = []
        for w, r in ((1, 0), (world, me)):
            loaders = build_loaders(config.data, 64, 0, w, r)
            loaders.train.batch_sampler.set_epoch(1)  # type: ignore[union-attr]
            loaders.train.dataset.set_epoch(1)  # type: ignore[attr-defined]
            batches.append(next(iter(loaders.train))[:2])
        (x_all, y_all), (x, y) = batches
        block = slice(me * x.shape[0], (me + 1) * x.shape[0])
        if not (torch.equal(x, x_all[block]) and torch.equal(y, y_all[block])):
            raise AssertionError(f"rank {me}: its {sampler} batch is not its block of the "
                                 f"one-process batch")
        for name in LOSSES:
            torch.manual_seed(1)  # loading reseeded this rank's generator per image
            loss = build_config_loss(load_config(None, [f"loss.name={name}",
                                                        "model.embedding_dim=8"]),
                                     loaders.num_classes)
            reference = Objective(copy.deepcopy(model), copy.deepcopy(loss))
            reference.train()
            reference(x_all, y_all).backward()
            objective = Objective(copy.deepcopy(model), copy.deepcopy(loss),
                                  gather=loss.needs_global_batch)
            objective.train()
            ddp = nn.parallel.DistributedDataParallel(objective)  # held: its reducer
            ddp(x, y).backward()  # averages the gradients during this backward
            for (n, p), (_, q) in zip(objective.named_parameters(),
                                      reference.named_parameters(), strict=True):
                if q.grad is not None:
                    close(p.grad, q.grad, f"{name}'s gradient of {n} ({sampler} sampler)",
                          rtol=1e-3, atol=1e-5)
    print(f"rank {me}: the pipeline's losses equal one process on {world} processes")


def check_sharded_loss() -> None:
    """ShardedSoftTripleLoss: loss, the model's gradients (DDP over the model only), every
    center's gradient and the embeddings' gradient equal the single-process SoftTripleLoss
    (and SoftMax-norm at K = 1) on the same global batch, with uneven class blocks."""
    from softtriple.losses import SoftMaxNormLoss, SoftTripleLoss
    from softtriple.losses.sharded_softtriple import ShardedSoftTripleLoss
    world, me = dist.world_size(), dist.rank()
    classes = 7  # blocks of 4/3 (2 ranks) or 2/2/2/1 (4 ranks)
    x, _ = global_batch(world)
    y = torch.arange(x.shape[0]) % classes
    b = x.shape[0] // world
    mine = slice(me * b, (me + 1) * b)
    settings = [("softtriple", {"centers_per_class": 3, "gamma": 0.1, "tau": 0.2}),
                ("hardtriple", {"centers_per_class": 3, "gamma": 0.0, "tau": 0.2}),
                ("softmax_norm", {"centers_per_class": 1, "tau": 0.0})]
    for name, args in settings:
        torch.manual_seed(0)
        model = nn.Linear(IN_DIM, DIM)
        single: nn.Module
        if name == "softmax_norm":
            single = SoftMaxNormLoss(classes, DIM)
        else:
            single = SoftTripleLoss(classes, DIM, **args)
        embeddings = copy.deepcopy(model)(x)
        embeddings.retain_grad()
        ref_value = single(embeddings, y)
        ref_value.backward()
        reference = Objective(copy.deepcopy(model), copy.deepcopy(single))
        reference(x, y).backward()
        sharded = ShardedSoftTripleLoss(classes, DIM, **args)
        full = single.centers.detach().view(classes, sharded.centers_per_class, DIM)
        with torch.no_grad():
            sharded.centers.copy_(full[sharded.start:sharded.stop])
        local_model = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        mine_embeddings = local_model(x[mine])
        mine_embeddings.retain_grad()
        value = sharded(mine_embeddings, y[mine])
        value.backward()
        close(value.detach(), ref_value.detach(), f"sharded {name}'s loss")
        for (n, p), (_, q) in zip(local_model.module.named_parameters(),
                                  reference.model.named_parameters(), strict=True):
            close(p.grad, q.grad, f"sharded {name}'s gradient of model {n}")
        ref_centers = reference.loss.centers.grad.view(classes, sharded.centers_per_class, DIM)
        close(sharded.centers.grad, ref_centers[sharded.start:sharded.stop],
              f"sharded {name}'s gradient of its centers")
        close(mine_embeddings.grad, world * embeddings.grad[mine],  # DDP's convention
              f"sharded {name}'s gradient of the embeddings")
    print(f"rank {me}: the sharded loss equals one process on {world} processes")


def check_sharded_knn() -> None:
    """sharded_knn equals the single-process knn (indices exactly, similarities to rounding) on
    data full of exact ties and duplicates, with uneven shards (one of them empty), in gallery
    and self-search mode, query blocks smaller than a shard; sharded_evaluate equals evaluate."""
    import numpy as np

    from softtriple.evaluation import evaluate, knn
    from softtriple.evaluation.sharded_search import sharded_evaluate, sharded_knn
    world, me = dist.world_size(), dist.rank()
    g = torch.Generator().manual_seed(3)

    def directions(n: int) -> Tensor:
        """Rows +-1 everywhere or +-e_i: unit after normalizing by 2 or 1 exactly, so every
        similarity is an exact multiple of 1/4 and ties are exact in any summation order."""
        signs = torch.randint(0, 2, (n, 4), generator=g).float() * 2 - 1
        one_hot = torch.eye(4)[torch.randint(0, 4, (n,), generator=g)] * signs
        return torch.where(torch.rand(n, 1, generator=g) < 0.5, signs, one_hot)

    gallery, queries = directions(61), directions(37)
    gallery[10:15] = gallery[3]  # duplicates
    cuts = np.linspace(0, 61, world + 1).astype(int)
    cuts[1] = 0  # rank 0's gallery shard is empty
    q_cuts = np.linspace(0, 37, world + 1).astype(int)
    my_q = slice(q_cuts[me], q_cuts[me + 1])
    for k in (1, 5, 20):
        sims, index = sharded_knn(queries[my_q], gallery[cuts[me]:cuts[me + 1]], k,
                                  query_block=4)
        ref_sims, ref_index = knn(queries, k, gallery)
        if not torch.equal(index, ref_index[my_q]):
            raise AssertionError(f"rank {me}: sharded gallery kNN (k={k}) picks other items")
        close(sims, ref_sims[my_q], f"sharded gallery kNN similarities (k={k})")
        my_g = slice(cuts[me], cuts[me + 1])
        sims, index = sharded_knn(gallery[my_g], None, k, query_block=3)
        ref_sims, ref_index = knn(gallery, k)
        if not torch.equal(index, ref_index[my_g]):
            raise AssertionError(f"rank {me}: sharded self-search kNN (k={k}) picks other items")
        close(sims, ref_sims[my_g], f"sharded self-search similarities (k={k})")
    labels = (torch.arange(61) % 7).numpy()
    metrics = ["recall", "map_at_r", "precision_at_1", "r_precision", "nmi"]
    got = sharded_evaluate(gallery[cuts[me]:cuts[me + 1]], labels, metrics=metrics)
    if me == 0:
        want = evaluate(gallery, labels, metrics=metrics)
        if got != want:
            raise AssertionError(f"sharded_evaluate {got} != evaluate {want}")
    print(f"rank {me}: the sharded kNN equals one process on {world} processes")


CHECKS = {"losses": check_losses, "pipeline": check_pipeline, "sharded_loss": check_sharded_loss,
          "sharded_knn": check_sharded_knn}

if __name__ == "__main__":
    dist.setup(torch.device("cpu"))
    torch.set_num_threads(1)
    for check in sys.argv[1:]:
        CHECKS[check]()
    tdist.barrier()
    dist.teardown()
