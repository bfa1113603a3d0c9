"""The on-disk pattern store: task patterns, written so that no crash tears one, and their routing examples.

Layout of a store directory:

    patterns/NAME.json                  the pattern's JSON document (written last, atomically)
    patterns/NAME.<token>.safetensors   its tensors, a fresh file per write, named by the document
    index.faiss, index.json             a cache of the FAISS index of the example prompts (`example_index`)

Why it never tears: a write puts the tensors in a new file, fsyncs it, then renames a temporary JSON
over `NAME.json` (atomic on POSIX) and only then deletes the previous tensor file. After a crash at any
instant, `NAME.json` is the old document (whose tensor file still exists) or the new one (whose tensor
file is complete). Tensor files that no document names are leftovers of such a crash and are removed
when the store opens, once they are old enough not to be another process's write in progress. The
index is derived data: when its manifest does not match the patterns on disk it is rebuilt from the
embeddings the patterns carry (`pattern_store.example_index`).

A corrupt or foreign file is reported in `problems` and skipped; it never takes the store down.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pattern_store.example_index import ExampleIndex, Examples, SearchHit
from pattern_store.files import FILE_MODE, atomic_write_bytes, fsync_directory
from pattern_store.pattern import PatternError, PatternExistsError, TaskPattern, validate_name

__all__ = ["FILE_MODE", "Examples", "PatternStore", "SearchHit", "atomic_write_bytes"]

_TENSOR_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.[0-9a-f]{12}\.safetensors$")


def _read_document(path: Path) -> dict[str, Any]:
    """A pattern's JSON document, checked against the schema and against its file's name; its tensor file
    must exist (its content is checked by reading it)."""
    document = json.loads(path.read_text())
    TaskPattern.from_parts(document, {}, schema_only=True)  # the whole schema, tensors aside
    if document.get("name") != path.stem:
        raise PatternError(f"document names pattern {document.get('name')!r}, file is {path.name}")
    tensors = document.get("tensors")
    if not isinstance(tensors, str) or not _TENSOR_FILE.match(tensors) or not tensors.startswith(f"{path.stem}."):
        raise PatternError(f"its tensor file name {tensors!r} is not this pattern's")
    if not (path.parent / tensors).is_file():
        raise PatternError(f"its tensor file {tensors!r} is missing")
    return document


class PatternStore:
    """A directory of task patterns with a FAISS inner-product index over their example embeddings."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        self.root = Path(root)
        self.pattern_dir = self.root / "patterns"
        if not self.pattern_dir.is_dir():
            if not create:
                raise PatternError(f"{self.root}: not a pattern store (no patterns/ directory)")
            self.pattern_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # the in-memory view: held only to read it or to swap in a new one
        self._changing = threading.RLock()  # one refresh or write at a time; files are read outside `_lock`
        self.problems: dict[str, str] = {}
        self._documents: dict[str, dict[str, Any]] = {}
        self._embeddings: dict[str, torch.Tensor | None] = {}  # per pattern, as read (and checked) by refresh
        self._example_index = ExampleIndex()  # replaced, with the next version, whenever the patterns change
        self._disk_revision: tuple[tuple[str, int, int, int], ...] = ()
        self.refresh()

    # -- reading ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the pattern documents from disk (another process may have written) and the index. The
        files are read while the old view goes on answering (a server's requests never wait for a
        re-read); the new view replaces it in one step."""
        with self._changing:
            disk_revision = self.disk_revision()  # taken first: a write during the reading is seen next time
            documents: dict[str, dict[str, Any]] = {}
            embeddings: dict[str, torch.Tensor | None] = {}
            problems: dict[str, str] = {}
            for path in sorted(self.pattern_dir.glob("*.json")):
                try:
                    document = _read_document(path)
                    # a truncated, empty or non-finite tensor file is reported now; the index reuses what is read
                    embeddings[path.stem] = self._read(document).example_embeddings
                    documents[path.stem] = document
                except (OSError, ValueError, RecursionError) as error:  # JSON, Unicode and pattern errors
                    problems[path.name] = f"skipped: {error}"
            self._remove_leftovers(documents, problems)
            index, index_problems = ExampleIndex.load_or_build(
                self.root, self._example_index.version + 1, documents, embeddings
            )
            self._swap(documents, embeddings, problems | index_problems, index, disk_revision)

    def _swap(
        self,
        documents: dict[str, dict[str, Any]],
        embeddings: dict[str, torch.Tensor | None],
        problems: dict[str, str],
        index: ExampleIndex,
        disk_revision: tuple[tuple[str, int, int, int], ...],
    ) -> None:
        with self._lock:
            self._documents, self._embeddings, self.problems = documents, embeddings, problems
            self._example_index, self._disk_revision = index, disk_revision

    def disk_revision(self) -> tuple[tuple[str, int, int, int], ...]:
        """What any write by any process changes, read without opening a file: each pattern document's and
        tensor file's name, inode, size and modification time (a write renames a new document over the old
        one; a tensor file damaged in place changes its size or time while its document stays the same)."""
        entries = []
        paths = [*self.pattern_dir.glob("*.json"), *self.pattern_dir.glob("*.safetensors")]
        for path in sorted(paths):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed between the listing and the stat
                continue
            entries.append((path.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(entries)

    def refresh_if_changed(self) -> bool:
        """Re-read the store if another process wrote to it since the last read; True when it did."""
        with self._changing:
            if self.disk_revision() == self._disk_revision:
                return False
            self.refresh()
            return True

    def revisions(self) -> dict[str, str]:
        """Each pattern's revision: the name of its tensor file, fresh for every write of the pattern."""
        with self._lock:
            return {name: str(document["tensors"]) for name, document in self._documents.items()}

    def _remove_leftovers(
        self, documents: dict[str, dict[str, Any]], problems: dict[str, str], min_age_seconds: float = 600.0
    ) -> None:
        """Delete tensor files no document names and temporary files: a crashed write's. Young ones may be
        another process's write in progress, and files that a skipped (unreadable) document may name are kept."""
        named = {str(d.get("tensors")) for d in documents.values()}
        skipped = tuple(f"{Path(name).stem}." for name in problems)
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

    def problem(self, name: str) -> str | None:
        """Why pattern `name`'s document was skipped at the last read (None: it was not)."""
        with self._lock:
            return self.problems.get(f"{name}.json") if name not in self._documents else None

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
        """The whole pattern, tensors included (read from disk outside the view's lock)."""
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
        with self._changing, self._write_lock():
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
            fsync_directory(self.pattern_dir)  # the tensor file's entry is durable before the JSON names it
            document = pattern.document(tensor_file)
            atomic_write_bytes(self.pattern_dir / f"{pattern.name}.json", json.dumps(document, indent=1).encode())
            if old is not None:
                (self.pattern_dir / old["tensors"]).unlink(missing_ok=True)
            problems = {file: problem for file, problem in self.problems.items() if file != f"{pattern.name}.json"}
            documents = self._documents | {pattern.name: document}
            self._changed(documents, self._embeddings | {pattern.name: embeddings}, problems)

    def remove(self, name: str) -> None:
        with self._changing, self._write_lock():
            self.refresh()
            document = self._documents.get(name)
            if document is None:
                raise KeyError(self._unknown(name))
            (self.pattern_dir / f"{name}.json").unlink()
            fsync_directory(self.pattern_dir)
            (self.pattern_dir / document["tensors"]).unlink(missing_ok=True)
            documents = {other: d for other, d in self._documents.items() if other != name}
            embeddings = {other: e for other, e in self._embeddings.items() if other != name}
            self._changed(documents, embeddings, dict(self.problems))

    def _changed(
        self, documents: dict[str, dict[str, Any]], embeddings: dict[str, torch.Tensor | None], problems: dict[str, str]
    ) -> None:
        """After this process's own write (under `_changing`): the index rebuilt, the view swapped in, and the
        disk revision taken, so that the write needs no reload."""
        index, index_problems = ExampleIndex.build(self.root, self._example_index.version + 1, documents, embeddings)
        self._swap(documents, embeddings, problems | index_problems, index, self.disk_revision())

    # -- the routing examples ----------------------------------------------------------------------

    def examples(self) -> Examples:
        """Every routable example prompt, its embedding and its pattern: what a router learns from. The
        version changes whenever the index does, so a learnt router knows when to learn again."""
        with self._lock:
            return self._example_index.examples()

    @property
    def version(self) -> int:
        """Changes whenever the examples do (`examples().version`), read without copying them."""
        with self._lock:
            return self._example_index.version

    @property
    def dimension(self) -> int | None:
        with self._lock:
            return self._example_index.dimension

    def search(self, query: torch.Tensor | np.ndarray, k: int = 10) -> list[SearchHit]:
        """Patterns ranked by their best similarity among the query's `k` nearest example prompts."""
        with self._lock:  # the view as it is now (a re-read swaps in a new one); the search needs no lock
            example_index = self._example_index
        return example_index.search(query, k)
