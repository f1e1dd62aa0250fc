"""Search embedded images with faiss: an inner-product index over unit embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softtriple.data.table import DataError


class EmbeddingIndex:
    """A faiss IndexFlatIP over embeddings (N, d) with their labels and paths."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray, paths: list[str]) -> None:
        try:
            import faiss
        except ImportError as error:
            raise ValueError("search needs faiss: pip install 'softtriple[faiss]'") from error
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        self.embeddings, self.labels, self.paths = x, labels, paths
        self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(x)

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingIndex:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"embeddings file {file} not found; write one with softtriple embed")
        try:
            data = np.load(file)
            return cls(data["embeddings"], data["labels"], [str(p) for p in data["paths"]])
        except (KeyError, IndexError, TypeError, ValueError, OSError) as error:
            raise DataError(f"{file} is not an embeddings file from softtriple embed ({error})"
                            ) from error

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
        scores, ids = self.index.search(q, min(k + 1, len(self.paths)))
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True)
                if i != exclude and i >= 0]
        return hits[:k]

    def embed_image(self, checkpoint: str, image: str) -> np.ndarray:
        """Embed one image file with a checkpoint's model and test transform."""
        from softtriple.inference import embed_image, load_model

        model, config, _ = load_model(checkpoint)
        return embed_image(model, config, image)
