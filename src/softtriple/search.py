"""Search embedded images: an inner-product index over unit embeddings, faiss's IndexFlatIP when
faiss is installed, else the exact kNN of softtriple.evaluation (the same neighbours)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from softtriple.run import read_embeddings


class EmbeddingIndex:
    """An index over embeddings (N, d) with their labels and paths (faiss, or the exact kNN)."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray, paths: list[str]) -> None:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        self.embeddings, self.labels, self.paths = x, labels, paths
        try:
            import faiss
        except ImportError:
            self.index: Any = None
            self.backend = "exact kNN"
        else:
            self.index = faiss.IndexFlatIP(x.shape[1])
            self.index.add(x)
            self.backend = "faiss"

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingIndex:
        """The index over an embeddings file (softtriple embed's, or a run's)."""
        return cls(*read_embeddings(path))

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
