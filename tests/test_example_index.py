"""The index of routing examples on its own: its cache is used only for the pattern revisions it was built
from, mixed embedding sizes are reported rather than fatal, and every row keeps its pattern and text."""

from __future__ import annotations

import numpy as np
import torch

from pattern_store.example_index import ExampleIndex

DIM = 6


def _rows(axis: int, count: int = 2, dim: int = DIM) -> torch.Tensor:
    rows = torch.full((count, dim), 0.05)
    rows[:, axis] = 1.0
    return torch.nn.functional.normalize(rows, dim=1)


def _document(name: str, revision: str, examples: int = 2) -> dict[str, object]:
    return {
        "name": name,
        "tensors": f"{name}.{revision}.safetensors",
        "examples": [f"{name} {i}" for i in range(examples)],
    }


def test_the_cache_serves_only_the_revisions_it_was_built_from(tmp_path) -> None:
    documents = {"a": _document("a", "000000000001"), "b": _document("b", "000000000002")}
    built, problems = ExampleIndex.build(tmp_path, 1, documents, {"a": _rows(0), "b": _rows(3)})
    assert problems == {} and (tmp_path / "index.faiss").is_file() and built.version == 1

    cached, _ = ExampleIndex.load_or_build(tmp_path, 2, documents, {})  # no embeddings: they come from the cache
    assert cached.version == 2 and cached.search(_rows(3)[0])[0].name == "b"
    assert np.array_equal(cached.examples().vectors, built.examples().vectors)

    replaced = {**documents, "b": _document("b", "000000000003")}  # another process rewrote b
    rebuilt, _ = ExampleIndex.load_or_build(tmp_path, 3, replaced, {"a": _rows(0), "b": _rows(5)})
    assert rebuilt.search(_rows(5)[0])[0].name == "b"
    assert rebuilt.search(_rows(3)[0])[0].score < 0.5, "b's old embeddings are gone"


def test_rows_keep_their_pattern_and_text(tmp_path) -> None:
    documents = {"a": _document("a", "000000000001", examples=1), "b": _document("b", "000000000002")}
    index, _ = ExampleIndex.build(tmp_path, 7, documents, {"a": _rows(0, count=2), "b": _rows(1), "c": None})
    examples = index.examples()
    assert examples.version == 7 and examples.vectors.shape == (4, DIM)
    assert examples.owners == ["a", "a", "b", "b"]
    assert examples.texts == ["a 0", "", "b 0", "b 1"]  # a has one text for two embeddings


def test_embeddings_of_a_minority_size_are_left_out_and_reported(tmp_path) -> None:
    documents = {name: _document(name, f"00000000000{i}") for i, name in enumerate("abc")}
    embeddings = {"a": _rows(0), "b": _rows(1), "c": _rows(2, dim=DIM + 2)}
    index, problems = ExampleIndex.build(tmp_path, 1, documents, embeddings)
    assert index.dimension == DIM and set(index.examples().owners) == {"a", "b"}
    assert problems == {"c.json": f"not routable: embeddings of size {DIM + 2}, not {DIM}"}


def test_no_embeddings_no_index_and_no_cache(tmp_path) -> None:
    documents = {"a": _document("a", "000000000001")}
    ExampleIndex.build(tmp_path, 1, documents, {"a": _rows(0)})
    empty, problems = ExampleIndex.build(tmp_path, 2, documents, {"a": None})
    assert problems == {} and empty.dimension is None and empty.search(_rows(0)[0]) == []
    assert empty.examples().vectors.shape == (0, 0)
    assert not (tmp_path / "index.faiss").exists() and not (tmp_path / "index.json").exists()
