"""The on-disk pattern store and its FAISS index of example-prompt embeddings.

Layout of a store directory:

    patterns/NAME.json                  the pattern's JSON document (written last, atomically)
    patterns/NAME.<token>.safetensors   its tensors, a fresh file per write, named by the document
    index.faiss, index.json             a cache of the FAISS index and the pattern files it was built from

Why it never tears: a write puts the tensors in a new file, fsyncs it, then renames a temporary JSON
over `NAME.json` (atomic on POSIX) and only then deletes the previous tensor file. After a crash at any
instant, `NAME.json` is the old document (whose tensor file still exists) or the new one (whose tensor
file is complete). Tensor files that no document names are leftovers of such a crash and are removed
when the store opens, once they are old enough not to be another process's write in progress. The
index is derived data: when its manifest does not match the patterns on disk it is rebuilt from the
embeddings the patterns carry.

A corrupt or foreign file is reported in `problems` and skipped; it never takes the store down.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pattern_store.pattern import PatternError, PatternExistsError, TaskPattern, validate_name

_TENSOR_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.[0-9a-f]{12}\.safetensors$")


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


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FILE_MODE = 0o644
"""Permissions of every file the store writes: those of the files it ships with (readable by all)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new one, never a mix."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, FILE_MODE)  # temporary files are private (0600); the store's files are not
    os.replace(tmp.name, path)
    _fsync_directory(path.parent)


class PatternStore:
    """A directory of task patterns with a FAISS inner-product index over their example embeddings."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        self.root = Path(root)
        self.pattern_dir = self.root / "patterns"
        if not self.pattern_dir.is_dir():
            if not create:
                raise PatternError(f"{self.root}: not a pattern store (no patterns/ directory)")
            self.pattern_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.problems: dict[str, str] = {}
        self._documents: dict[str, dict[str, Any]] = {}
        self._embeddings: dict[str, torch.Tensor | None] = {}  # per pattern, as read (and checked) by refresh
        self._index: faiss.Index | None = None
        self._owners: list[str] = []
        self._version = 0
        self._disk_revision: tuple[tuple[str, int, int, int], ...] = ()
        self.refresh()

    # -- reading ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the pattern documents from disk (another process may have written) and the index."""
        with self._lock:
            disk_revision = self.disk_revision()  # taken first: a write during the reading is seen next time
            documents: dict[str, dict[str, Any]] = {}
            embeddings: dict[str, torch.Tensor | None] = {}
            problems: dict[str, str] = {}
            for path in sorted(self.pattern_dir.glob("*.json")):
                try:
                    document = json.loads(path.read_text())
                    TaskPattern.from_parts(document, {})  # the whole schema, tensors aside
                    if document.get("name") != path.stem:
                        raise PatternError(f"document names pattern {document.get('name')!r}, file is {path.name}")
                    tensors = document.get("tensors")
                    if (
                        not isinstance(tensors, str)
                        or not _TENSOR_FILE.match(tensors)
                        or not tensors.startswith(f"{path.stem}.")
                    ):
                        raise PatternError(f"its tensor file name {tensors!r} is not this pattern's")
                    if not (self.pattern_dir / tensors).is_file():
                        raise PatternError(f"its tensor file {tensors!r} is missing")
                    # a truncated, empty or non-finite tensor file is reported now; the index reuses what is read
                    embeddings[path.stem] = self._read(document).example_embeddings
                    documents[path.stem] = document
                except (OSError, ValueError, RecursionError) as error:  # JSON, Unicode and pattern errors
                    problems[path.name] = f"skipped: {error}"
            self._documents, self._embeddings = documents, embeddings
            self.problems = problems
            self._disk_revision = disk_revision
            self._remove_leftovers()
            self._load_or_rebuild_index()

    def disk_revision(self) -> tuple[tuple[str, int, int, int], ...]:
        """What any write by any process changes, read without opening a file: each pattern document's name,
        inode, size and modification time (a write renames a new document over the old one)."""
        entries = []
        for path in sorted(self.pattern_dir.glob("*.json")):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed between the listing and the stat
                continue
            entries.append((path.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(entries)

    def refresh_if_changed(self) -> bool:
        """Re-read the store if another process wrote to it since the last read; True when it did."""
        with self._lock:
            if self.disk_revision() == self._disk_revision:
                return False
            self.refresh()
            return True

    def revisions(self) -> dict[str, str]:
        """Each pattern's revision: the name of its tensor file, fresh for every write of the pattern."""
        with self._lock:
            return {name: str(document["tensors"]) for name, document in self._documents.items()}

    def _remove_leftovers(self, min_age_seconds: float = 600.0) -> None:
        """Delete tensor files no document names and temporary files: a crashed write's. Young ones may be
        another process's write in progress, and files that a skipped (unreadable) document may name are kept."""
        named = {str(d.get("tensors")) for d in self._documents.values()}
        skipped = tuple(f"{Path(name).stem}." for name in self.problems)
        now = time.time()
        leftovers = [*self.pattern_dir.glob("*.safetensors"), *self.pattern_dir.glob(".*.tmp")]
        leftovers += self.root.glob(".index.*.tmp")  # a crashed write of the index cache
        for path in leftovers:
            if path.name in named or (skipped and path.name.startswith(skipped)):
                continue
            try:
                if now - path.stat().st_mtime >= min_age_seconds:
                    path.unlink()
            except OSError:
                pass  # gone already, or a read-only store: leftovers are harmless

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._documents)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._documents

    def summary(self, name: str) -> dict[str, Any]:
        """The pattern's JSON document (no tensors): cheap, for listings."""
        with self._lock:
            if name not in self._documents:
                raise KeyError(self._unknown(name))
            return dict(self._documents[name])

    def get(self, name: str) -> TaskPattern:
        """The whole pattern, tensors included."""
        with self._lock:
            document = self._documents.get(name)
            if document is None:
                raise KeyError(self._unknown(name))
            return self._read(document)

    def _read(self, document: dict[str, Any]) -> TaskPattern:
        try:
            tensors = load_file(str(self.pattern_dir / document["tensors"]))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise PatternError(f"pattern {document['name']!r}: its tensor file cannot be read ({error})") from None
        return TaskPattern.from_parts(document, tensors)

    def _unknown(self, name: str) -> str:
        known = ", ".join(self.names()) or "none"
        return f"no pattern named {name!r}; stored patterns: {known}"

    # -- writing ---------------------------------------------------------------------------------

    def _write_lock(self):
        """An exclusive lock across processes for one write; the view is refreshed under it first."""
        handle = open(self.root / ".lock", "a+")  # noqa: SIM115 (closed by the caller's context)
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def add(self, pattern: TaskPattern, replace: bool = False) -> None:
        """Store `pattern` (atomically); an existing one of the same name needs `replace=True`."""
        validate_name(pattern.name)
        embeddings = pattern.example_embeddings
        with self._lock, self._write_lock():
            self.refresh()
            if embeddings is not None and self.dimension is not None and embeddings.shape[1] != self.dimension:
                raise PatternError(
                    f"pattern {pattern.name!r} has example embeddings of size {embeddings.shape[1]}, the store's "
                    f"are {self.dimension}: use the embedder the store was built with"
                )
            old = self._documents.get(pattern.name)
            if old is not None and not replace:
                raise PatternExistsError(f"a pattern named {pattern.name!r} exists; remove it or replace it")
            tensor_file = f"{pattern.name}.{secrets.token_hex(6)}.safetensors"
            tensor_path = self.pattern_dir / tensor_file
            save_file(pattern.tensors(), str(tensor_path))
            os.chmod(tensor_path, FILE_MODE)
            with open(tensor_path, "rb") as handle:
                os.fsync(handle.fileno())
            _fsync_directory(self.pattern_dir)  # the tensor file's entry is durable before the JSON names it
            document = pattern.document(tensor_file)
            atomic_write_bytes(self.pattern_dir / f"{pattern.name}.json", json.dumps(document, indent=1).encode())
            if old is not None:
                (self.pattern_dir / old["tensors"]).unlink(missing_ok=True)
            self._documents[pattern.name] = document
            self._embeddings[pattern.name] = embeddings
            self.problems.pop(f"{pattern.name}.json", None)
            self._rebuild_index()
            self._disk_revision = self.disk_revision()  # this process's own write needs no reload

    def remove(self, name: str) -> None:
        with self._lock, self._write_lock():
            self.refresh()
            document = self._documents.get(name)
            if document is None:
                raise KeyError(self._unknown(name))
            (self.pattern_dir / f"{name}.json").unlink()
            _fsync_directory(self.pattern_dir)
            (self.pattern_dir / document["tensors"]).unlink(missing_ok=True)
            del self._documents[name]
            self._embeddings.pop(name, None)
            self._rebuild_index()
            self._disk_revision = self.disk_revision()

    # -- the index -------------------------------------------------------------------------------

    def _manifest(self) -> list[list[str]]:
        return [[name, str(self._documents[name]["tensors"])] for name in sorted(self._documents)]

    def _load_or_rebuild_index(self) -> None:
        manifest_path, index_path = self.root / "index.json", self.root / "index.faiss"
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("patterns") == self._manifest():
                self._index = faiss.read_index(str(index_path))
                self._owners = list(manifest["owners"])
                if self._index.ntotal == len(self._owners):
                    self._version += 1
                    return
        except (OSError, ValueError, KeyError, RuntimeError, AttributeError):
            pass  # a missing or stale cache is rebuilt below
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        vectors: list[np.ndarray] = []
        owners: list[str] = []
        for name in sorted(self._documents):
            embeddings = self._embeddings.get(name)
            if embeddings is None or embeddings.numel() == 0:
                continue
            vectors.append(embeddings.float().numpy())
            owners.extend([name] * embeddings.shape[0])
        dims = {v.shape[1] for v in vectors}
        if len(dims) > 1:  # keep the size most patterns use; the others are reported, not fatal
            common = max(dims, key=lambda d: sum(v.shape[1] == d for v in vectors))
            kept_vectors, kept_owners = [], []
            position = 0
            for v in vectors:
                names_of_v = owners[position : position + v.shape[0]]
                position += v.shape[0]
                if v.shape[1] == common:
                    kept_vectors.append(v)
                    kept_owners.extend(names_of_v)
                else:
                    self.problems[f"{names_of_v[0]}.json"] = (
                        f"not routable: embeddings of size {v.shape[1]}, not {common}"
                    )
            vectors, owners, dims = kept_vectors, kept_owners, {common}
        index = faiss.IndexFlatIP(dims.pop()) if dims else None
        if index is not None:
            index.add(np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32))
        self._index, self._owners = index, owners
        self._version += 1
        self._write_index_cache()

    def _write_index_cache(self) -> None:
        """Best effort: the cache only saves a rebuild, and a read-only store must still open."""
        try:
            self._write_index_cache_files()
        except OSError as error:
            self.problems["index.faiss"] = f"index cache not written: {error}"

    def _write_index_cache_files(self) -> None:
        manifest_path, index_path = self.root / "index.json", self.root / "index.faiss"
        if self._index is None:
            manifest_path.unlink(missing_ok=True)
            index_path.unlink(missing_ok=True)
            return
        atomic_write_bytes(index_path, faiss.serialize_index(self._index).tobytes())
        manifest = {"patterns": self._manifest(), "owners": self._owners}
        atomic_write_bytes(manifest_path, json.dumps(manifest).encode())

    def examples(self) -> Examples:
        """Every routable example prompt, its embedding and its pattern: what a router learns from. The
        version changes whenever the index does, so a learnt router knows when to learn again."""
        with self._lock:
            if self._index is None:
                return Examples(self._version, np.zeros((0, 0), dtype=np.float32), [], [])
            texts: list[str] = []
            for name, rows in itertools.groupby(self._owners):  # grouped by pattern, in index order
                stored = [str(text) for text in self._documents[name].get("examples") or []]
                count = len(list(rows))
                texts.extend(stored[:count] + [""] * (count - len(stored)))
            return Examples(self._version, self._index.reconstruct_n(0, self._index.ntotal), list(self._owners), texts)

    @property
    def version(self) -> int:
        """Changes whenever the examples do (`examples().version`), read without copying them."""
        with self._lock:
            return self._version

    @property
    def dimension(self) -> int | None:
        with self._lock:
            return None if self._index is None else int(self._index.d)

    def search(self, query: torch.Tensor | np.ndarray, k: int = 10) -> list[SearchHit]:
        """Patterns ranked by their best similarity among the query's `k` nearest example prompts."""
        with self._lock:
            index, owners = self._index, self._owners
        if index is None or index.ntotal == 0:
            return []
        vector = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != index.d:
            raise PatternError(f"query embedding has {vector.shape[1]} dimensions, the index {index.d}")
        similarities, ids = index.search(np.ascontiguousarray(vector), min(k, index.ntotal))
        best: dict[str, float] = {}
        for similarity, vector_id in zip(similarities[0], ids[0], strict=True):
            if vector_id >= 0:
                name = owners[vector_id]
                best[name] = max(best.get(name, -1.0), float(similarity))
        hits = (SearchHit(name, score) for name, score in best.items())
        return sorted(hits, key=lambda hit: (-hit.score, hit.name))
