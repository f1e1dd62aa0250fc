"""Search embedded images: an inner-product index over unit embeddings, faiss's IndexFlatIP when
faiss is installed, else the exact kNN of softtriple.evaluation (the same neighbours); or, for
large galleries on one node, an approximate faiss index (IVF or HNSW) whose recall against the
exact search ``recall_against_exact`` measures. Galleries larger than one node's memory:
``softtriple.evaluation.sharded_search`` (exact, over processes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from softtriple.experiment.run_folder import (
    read_class_names,
    read_embedding_labels,
    read_embedding_rows,
    read_embeddings,
)

INDEX_KINDS = ("flat", "ivf", "hnsw")


class EmbeddingIndex:
    """An index over embeddings (N, d) with their labels and paths.

    Args:
        kind: ``flat`` (exact: faiss's IndexFlatIP, or the exact kNN without faiss), ``ivf``
            (faiss IndexIVFFlat: ``nlist`` k-means cells, ``probes`` of them searched) or
            ``hnsw`` (faiss IndexHNSWFlat, 32 links per node, search breadth ``probes``).
        probes: IVF's nprobe or HNSW's efSearch; larger is slower and closer to exact.
    """

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray, paths: list[str],
                 kind: str = "flat", probes: int = 0, names: list[str] | None = None) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index {kind!r}; valid: {', '.join(INDEX_KINDS)}")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
            raise ValueError(f"probes must be an integer >= 1 (or 0 for the index's default); "
                             f"got {probes!r}")
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        self.embeddings, self.labels, self.paths = x, labels, paths
        self.names = names  # each item's class name, when the file holds them
        self.kind = kind
        try:
            import faiss
        except ImportError:
            if kind != "flat":
                raise ValueError(f"--index {kind} needs faiss: pip install 'softtriple[faiss]'"
                                 ) from None
            self.index: Any = None
            self.backend = "exact kNN"
            return
        n, d = x.shape
        if kind == "flat":
            self.index = faiss.IndexFlatIP(d)
            self.backend = "faiss"
        elif kind == "ivf":  # about 4 sqrt(N) cells, at least 39 training points per cell
            nlist = max(1, min(int(4 * n ** 0.5), n // 39))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist,
                                            faiss.METRIC_INNER_PRODUCT)
            self.index.train(x)
            self.index.nprobe = min(nlist, probes or max(1, nlist // 8))
            self.backend = f"faiss IVF ({nlist} cells, nprobe {self.index.nprobe})"
        else:
            self.index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = probes or 64
            self.backend = f"faiss HNSW (32 links, efSearch {self.index.hnsw.efSearch})"
        self.index.add(x)

    @classmethod
    def load(cls, path: str | Path, kind: str = "flat", probes: int = 0) -> EmbeddingIndex:
        """The index over an embeddings file (softtriple embed's, or a run's)."""
        return cls(*read_embeddings(path), kind=kind, probes=probes,
                   names=read_class_names(path))

    def label_text(self, i: int) -> str:
        """Item i's class: its label, and its name when the file holds names."""
        label = int(self.labels[i])
        name = self.names[i] if self.names is not None else None
        return f"{label} {name}" if name is not None and name != str(label) else str(label)

    def recall_against_exact(self, k: int = 10, queries: int = 1000, seed: int = 0) -> float:
        """The fraction of the exact top-k (each query an item of the index, itself left out)
        that this index returns, over ``queries`` sampled items; 1.0 for ``flat``."""
        from softtriple.evaluation.knn import knn
        n = len(self.paths)
        k = min(k, n - 1)
        picked = np.random.default_rng(seed).choice(n, min(queries, n), replace=False)
        q = self.embeddings[picked]
        _, exact = knn(q, k + 1, self.embeddings)  # ranks 0..k: the query itself among them
        found = 0
        for row, item in enumerate(picked):
            truth = [int(i) for i in exact[row].tolist() if i != item][:k]
            got = {i for i, _ in self.search(q[row], k, exclude=int(item))}
            found += len(got & set(truth))
        return found / (k * len(picked))

    def search(self, query: np.ndarray, k: int,
               exclude: int | None = None) -> list[tuple[int, float]]:
        """Top-k (index, cosine similarity) of one query (d,), best first."""
        if query.shape != (self.embeddings.shape[1],):
            raise ValueError(f"query has shape {query.shape}; "
                             f"expected ({self.embeddings.shape[1]},)")
        if not np.isfinite(query).all():
            raise ValueError("the query embedding has NaN or inf values")
        if not 1 <= k <= len(self.paths):
            raise ValueError(f"k must be in [1, {len(self.paths)}]; got {k}")
        q = (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)[None, :]
        want = min(k + 1, len(self.paths))
        if self.index is not None:
            scores, ids = self.index.search(q, want)
        else:
            from softtriple.evaluation.knn import knn

            scores_t, ids_t = knn(q, want, self.embeddings)
            scores, ids = scores_t.numpy(), ids_t.numpy()
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True)
                if i != exclude and i >= 0]
        return hits[:k]

    def embed_image(self, checkpoint: str, image: str) -> np.ndarray:
        """Embed one image file with a checkpoint's model and test transform."""
        from softtriple.inference import embed_image, load_model

        model, config, _ = load_model(checkpoint)
        return embed_image(model, config, image)


@dataclass
class FileNeighbours:
    """The exact k nearest neighbours of every query of an embeddings file."""

    similarities: np.ndarray  # (N, k) float32, best first
    indices: np.ndarray  # (N, k) int64 into the gallery
    query_labels: np.ndarray  # (N,)
    gallery_labels: np.ndarray | None  # (M,), or None when the queries are the gallery
    processes: int


def file_neighbours(gallery_file: str | Path, k: int,
                    queries_file: str | Path | None = None,
                    device: str = "auto") -> FileNeighbours | None:
    """The exact k nearest neighbours (cosine) of each row of ``queries_file`` among
    ``gallery_file``'s rows (of each gallery row among the others without ``queries_file``).
    Under torchrun each process memory-maps only its block of the rows and the blocks go round
    (``evaluation.sharded_search.sharded_knn``, on the CPU); the result reaches rank 0, the
    others get None. One process searches on ``device``: ``auto`` (a GPU where one is visible),
    ``cpu`` or ``cuda`` (the rows copied there; the result comes back to the host)."""
    import torch

    from softtriple import distributed as dist
    from softtriple.distributed import block
    from softtriple.evaluation.sharded_search import sharded_knn

    world, rank = dist.world_size(), dist.rank()
    if device == "cuda" and (world > 1 or not torch.cuda.is_available()):
        raise ValueError("--device cuda: " + ("under torchrun the processes search on the CPU, "
                         "each its shard; run one process" if world > 1 else
                         "no GPU is visible; use auto or cpu"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
    gpu = world == 1 and device != "cpu" and torch.cuda.is_available()
    where = torch.device("cuda" if gpu else "cpu")
    query_file = queries_file or gallery_file
    query_labels = read_embedding_labels(query_file)
    gallery_labels = read_embedding_labels(gallery_file) if queries_file else None
    query_rows = len(query_labels)
    gallery_rows = query_rows if gallery_labels is None else len(gallery_labels)
    if query_rows < world or gallery_rows < world:
        raise ValueError(f"{min(query_rows, gallery_rows)} rows cannot be shared by {world} "
                         f"processes; use fewer")
    def rows(file: str | Path, count: int) -> np.ndarray | torch.Tensor:
        part = read_embedding_rows(file, *block(count, world, rank), count)
        if where.type == "cpu":
            return part  # memory-mapped: a process reads only its shard
        return torch.from_numpy(np.ascontiguousarray(part)).to(where)  # one copy there

    queries = rows(query_file, query_rows)
    gallery = rows(gallery_file, gallery_rows) if queries_file else None
    sims, index = sharded_knn(queries, gallery, k)
    sims, index = sims.cpu(), index.cpu()
    parts = list(dist.stream_to_main((sims.numpy(), index.numpy())))
    if not dist.is_main():
        return None
    return FileNeighbours(np.concatenate([p[0] for p in parts]),
                          np.concatenate([p[1] for p in parts]), query_labels, gallery_labels,
                          world)
