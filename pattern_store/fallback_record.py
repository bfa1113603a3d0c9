"""The queries the router sent to the fallback (no pattern fit them), kept for proposing new patterns.

Opt-in and bounded: a server records only with `--record-fallback N`, keeps the newest N queries, and keeps
their text only with `--record-text` (prompts may be private). Always kept, per query: its embedding and its
n-gram features as routing computed them (so `taskmoe patterns suggest` clusters what routing saw), why it
went to the fallback, and when. The record lives in the store directory, in one file
(`fallback-record.safetensors`, readable by its owner only), written atomically: a reader sees the old
record or the new one. The server writes it in the background every `flush_seconds` when it changed, and
when it stops.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FILE_NAME = "fallback-record.safetensors"
FILE_MODE = 0o600  # the text of prompts may be private: only the store's owner reads the record
KEY = "taskmoe_fallback_record"


@dataclass(frozen=True)
class RecordedQuery:
    """One query the fallback served: its embedding [d], its n-grams (sparse: indices and values), why, when,
    and its text when text is recorded."""

    embedding: np.ndarray
    ngram_index: np.ndarray
    ngram_value: np.ndarray
    reason: str
    time: float
    text: str | None = None

    def ngrams(self, width: int) -> np.ndarray:
        """The n-gram block as a dense vector of `width` buckets."""
        dense = np.zeros(width, dtype=np.float32)
        dense[self.ngram_index] = self.ngram_value
        return dense


class FallbackRecord:
    """The newest `limit` fallback queries of a store, in memory and in `root / FILE_NAME`."""

    def __init__(self, root: Path, limit: int, keep_text: bool = False, flush_seconds: float = 10.0) -> None:
        if limit < 1:
            raise ValueError("a fallback record keeps at least one query")
        self.path = Path(root) / FILE_NAME
        self.limit, self.keep_text, self.flush_seconds = limit, keep_text, flush_seconds
        self._queries: deque[RecordedQuery] = deque(read_record(self.path), maxlen=limit)
        if not keep_text:  # text recorded by an earlier run with --record-text is dropped, not kept
            self._queries = deque((_without_text(q) for q in self._queries), maxlen=limit)
        self._lock = threading.Lock()  # the queries: `add` holds it only to append
        self._writing = threading.Lock()  # the file: one write (or clear) at a time
        self._changed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._queries)

    def add(self, text: str, embedding: torch.Tensor | np.ndarray, ngrams: torch.Tensor, reason: str) -> None:
        """Record one fallback query (the oldest leaves when the record is full). Nothing is written here:
        `start` writes in the background, so a request never waits on the disk."""
        row = ngrams.reshape(-1)
        index = torch.nonzero(row).reshape(-1)
        query = RecordedQuery(
            np.asarray(embedding, dtype=np.float32).reshape(-1).copy(),
            index.numpy().astype(np.int32),
            row[index].numpy().astype(np.float32),
            reason,
            time.time(),
            text if self.keep_text else None,
        )
        with self._lock:
            self._queries.append(query)
            self._changed = True

    def start(self) -> None:
        """Write the record every `flush_seconds` (when it changed) on a thread of its own, until `close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._flushing, name="taskmoe-fallback-record", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop writing in the background, and write what is not written yet."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()

    def _flushing(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def queries(self) -> list[RecordedQuery]:
        with self._lock:
            return list(self._queries)

    def clear(self) -> int:
        """Forget every recorded query, on disk too; how many there were."""
        with self._writing, self._lock:
            count = len(self._queries)
            self._queries.clear()
            self._changed = False
            self.path.unlink(missing_ok=True)
        return count

    def flush(self) -> None:
        """Write the record if it changed since the last write. Requests go on recording meanwhile: the
        write holds the file's lock, not the queries'."""
        with self._writing:
            with self._lock:
                if not self._changed:
                    return
                queries = list(self._queries)
                self._changed = False
            write_record(self.path, queries)

    def summary(self) -> dict[str, object]:
        queries = self.queries()
        reasons: dict[str, int] = {}
        for query in queries:
            reasons[query.reason] = reasons.get(query.reason, 0) + 1
        return {"queries": len(queries), "limit": self.limit, "text": self.keep_text, "reasons": reasons}


def _without_text(query: RecordedQuery) -> RecordedQuery:
    return RecordedQuery(query.embedding, query.ngram_index, query.ngram_value, query.reason, query.time)


def write_record(path: Path, queries: list[RecordedQuery]) -> None:
    """The record as one safetensors file: embeddings [n, d], the n-grams in CSR form, the rest in metadata."""
    from safetensors.numpy import save

    if not queries:
        path.unlink(missing_ok=True)
        return
    offsets = np.cumsum([0] + [len(q.ngram_index) for q in queries]).astype(np.int64)
    tensors = {
        "embeddings": np.stack([q.embedding for q in queries]),
        "ngram_index": np.concatenate([q.ngram_index for q in queries]).astype(np.int32),
        "ngram_value": np.concatenate([q.ngram_value for q in queries]).astype(np.float32),
        "ngram_offsets": offsets,
    }
    meta = [{"reason": q.reason, "time": q.time, **({"text": q.text} if q.text is not None else {})} for q in queries]
    data = save(tensors, metadata={KEY: json.dumps(meta)})
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, FILE_MODE)
    os.replace(tmp.name, path)


def read_record(path: Path) -> list[RecordedQuery]:
    """The queries of a record file ([] when there is none); a damaged file is an error that says so."""
    from safetensors import safe_open

    if not path.is_file():
        return []
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = json.loads(handle.metadata()[KEY])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own types for damaged files
        raise ValueError(f"{path}: not a readable fallback record ({error}); delete it to start again") from None
    offsets = tensors["ngram_offsets"]
    return [
        RecordedQuery(
            tensors["embeddings"][i],
            tensors["ngram_index"][offsets[i] : offsets[i + 1]],
            tensors["ngram_value"][offsets[i] : offsets[i + 1]],
            str(entry["reason"]),
            float(entry["time"]),
            entry.get("text"),
        )
        for i, entry in enumerate(meta)
    ]
