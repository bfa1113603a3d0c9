"""The routing examples of a pattern store: a FAISS inner-product index over every pattern's example-prompt
embeddings, with each row's pattern and text.

The index is derived data. It is cached in the store's directory as `index.faiss` beside `index.json`, the
manifest of the pattern revisions it was built from and of each row's pattern; when the manifest does not
match the patterns on disk, the index is rebuilt from the embeddings the patterns carry. An `ExampleIndex`
never changes once built: the store swaps in a new one, with the next version, whenever its patterns
change, so a reader that holds one searches a consistent index without a lock.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from pattern_store.files import atomic_write_bytes
from pattern_store.pattern import PatternError

Documents = Mapping[str, Mapping[str, Any]]
"""Each pattern's JSON document, by name (the revision is its tensor file name, `tensors`)."""

Embeddings = Mapping[str, torch.Tensor | None]
"""Each pattern's example-prompt embeddings [examples, d], by name (None: it has none)."""

INDEX_FILE, MANIFEST_FILE = "index.faiss", "index.json"


@dataclass(frozen=True)
class SearchHit:
    """A pattern and how close the query came to its nearest example prompt (cosine similarity)."""

    name: str
    score: float


@dataclass(frozen=True)
class Examples:
    """The store's routing examples at one version: embeddings [N, d], and per row its pattern and text."""

    version: int
    vectors: np.ndarray
    owners: list[str]
    texts: list[str]


class ExampleIndex:
    """One version of a store's routing examples, searchable by similarity. Build it with `build` or
    `load_or_build`; the empty one (no patterns with embeddings) has version 0."""

    def __init__(
        self,
        version: int = 0,
        index: faiss.Index | None = None,
        owners: list[str] | None = None,
        texts: list[str] | None = None,
    ) -> None:
        self.version = version  # changes whenever the examples do, so a learnt router knows when to learn again
        self._index = index
        self._owners = owners or []  # per row of the index, its pattern
        self._texts = texts or []  # per row, its example prompt ("" where the document lists fewer)

    @classmethod
    def load_or_build(
        cls, root: Path, version: int, documents: Documents, embeddings: Embeddings
    ) -> tuple[ExampleIndex, dict[str, str]]:
        """The cached index in `root` when it was built from these patterns, else `build`."""
        cached = _read_cache(root, documents)
        if cached is None:
            return cls.build(root, version, documents, embeddings)
        index, owners = cached
        return cls(version, index, owners, _texts(owners, documents)), {}

    @classmethod
    def build(
        cls, root: Path, version: int, documents: Documents, embeddings: Embeddings
    ) -> tuple[ExampleIndex, dict[str, str]]:
        """The index of the patterns' embeddings, written to the cache in `root` (best effort: the cache only
        saves a rebuild, and a read-only store must still open). Returns it and the problems to report, by
        file name: patterns left out for an embedding size other than most patterns', an unwritten cache."""
        vectors, owners, problems = _routable(documents, embeddings)
        index = None
        if vectors:
            index = faiss.IndexFlatIP(vectors[0].shape[1])
            index.add(np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32))
        try:
            _write_cache(root, index, owners, documents)
        except OSError as error:
            problems[INDEX_FILE] = f"index cache not written: {error}"
        return cls(version, index, owners, _texts(owners, documents)), problems

    @property
    def dimension(self) -> int | None:
        """The size of the embeddings (None while no pattern has any)."""
        return None if self._index is None else int(self._index.d)

    def examples(self) -> Examples:
        """Every routable example prompt, its embedding and its pattern: what a router learns from."""
        if self._index is None:
            return Examples(self.version, np.zeros((0, 0), dtype=np.float32), [], [])
        vectors = self._index.reconstruct_n(0, self._index.ntotal)
        return Examples(self.version, vectors, list(self._owners), list(self._texts))

    def search(self, query: torch.Tensor | np.ndarray, k: int = 10) -> list[SearchHit]:
        """Patterns ranked by their best similarity among the query's `k` nearest example prompts."""
        index = self._index
        if index is None or index.ntotal == 0:
            return []
        vector = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != index.d:
            raise PatternError(f"query embedding has {vector.shape[1]} dimensions, the index {index.d}")
        similarities, ids = index.search(np.ascontiguousarray(vector), min(k, index.ntotal))
        best: dict[str, float] = {}
        for similarity, vector_id in zip(similarities[0], ids[0], strict=True):
            if vector_id >= 0:
                name = self._owners[vector_id]
                best[name] = max(best.get(name, -1.0), float(similarity))
        hits = (SearchHit(name, score) for name, score in best.items())
        return sorted(hits, key=lambda hit: (-hit.score, hit.name))


def _routable(documents: Documents, embeddings: Embeddings) -> tuple[list[np.ndarray], list[str], dict[str, str]]:
    """Per pattern in name order, its embeddings [examples, d] and per row its name; patterns whose size d is
    not the one most patterns use are left out and reported (not fatal)."""
    vectors: list[np.ndarray] = []
    names: list[str] = []
    for name in sorted(documents):
        tensor = embeddings.get(name)
        if tensor is not None and tensor.numel() > 0:
            vectors.append(tensor.float().numpy())
            names.append(name)
    dims = {v.shape[1] for v in vectors}
    common = max(dims, key=lambda d: sum(v.shape[1] == d for v in vectors)) if dims else None
    kept: list[np.ndarray] = []
    owners: list[str] = []
    problems: dict[str, str] = {}
    for name, v in zip(names, vectors, strict=True):
        if v.shape[1] == common:
            kept.append(v)
            owners.extend([name] * v.shape[0])
        else:
            problems[f"{name}.json"] = f"not routable: embeddings of size {v.shape[1]}, not {common}"
    return kept, owners, problems


def _texts(owners: list[str], documents: Documents) -> list[str]:
    """Per row of the index, its example prompt as the pattern's document lists it."""
    texts: list[str] = []
    for name, rows in itertools.groupby(owners):  # grouped by pattern, in index order
        stored = [str(text) for text in documents[name].get("examples") or []]
        count = len(list(rows))
        texts.extend(stored[:count] + [""] * (count - len(stored)))
    return texts


def _manifest(documents: Documents) -> list[list[str]]:
    """The pattern revisions an index is built from: [name, tensor file] in name order."""
    return [[name, str(documents[name]["tensors"])] for name in sorted(documents)]


def _read_cache(root: Path, documents: Documents) -> tuple[faiss.Index, list[str]] | None:
    """The cached index and its rows' patterns, when built from exactly these patterns; None when missing,
    unreadable or stale."""
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        if manifest.get("patterns") != _manifest(documents):
            return None
        index = faiss.read_index(str(root / INDEX_FILE))
        owners = [str(owner) for owner in manifest["owners"]]
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError):
        return None  # a missing or damaged cache is rebuilt
    if index.ntotal != len(owners) or not set(owners) <= set(documents):
        return None
    return index, owners


def _write_cache(root: Path, index: faiss.Index | None, owners: list[str], documents: Documents) -> None:
    """Write (or, without an index, remove) the cache files, each atomically."""
    index_path, manifest_path = root / INDEX_FILE, root / MANIFEST_FILE
    if index is None:
        manifest_path.unlink(missing_ok=True)
        index_path.unlink(missing_ok=True)
        return
    atomic_write_bytes(index_path, faiss.serialize_index(index).tobytes())
    manifest = {"patterns": _manifest(documents), "owners": owners}
    atomic_write_bytes(manifest_path, json.dumps(manifest).encode())
