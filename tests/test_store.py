"""The pattern store: round trips, FAISS search, atomic writes under injected crashes, bad files and names."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

import pattern_store.store as store_module
from pattern_store.pattern import PatternError, TaskPattern
from pattern_store.selection import Selection
from pattern_store.store import PatternStore

DIM = 8


def _unit(*rows: list[float]) -> torch.Tensor:
    tensor = torch.tensor(rows, dtype=torch.float32)
    return tensor / tensor.norm(dim=1, keepdim=True)


def _basis(i: int, noise: float = 0.0) -> list[float]:
    row = [noise] * DIM
    row[i] = 1.0
    return row


def make_pattern(name: str, axis: int, version: int = 1, fingerprint: str = "f" * 64) -> TaskPattern:
    return TaskPattern(
        name=name,
        selection=Selection("moe_experts", {0: [axis, axis + 1], 1: [0, version]}),
        scores={0: torch.arange(8, dtype=torch.float32) * version, 1: torch.ones(8)},
        method="tcess",
        parameters={"keep": 2, "threshold": 0.0, "version": version},
        model_fingerprint=fingerprint,
        created=1_700_000_000.0 + version,
        calibration_prompts=3,
        examples=[f"{name} example {i}" for i in range(3)],
        example_embeddings=_unit(_basis(axis), _basis(axis, 0.1), _basis(axis, 0.2)),
    )


def test_round_trip_and_listing(tmp_path) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("arith", 0))
    store.add(make_pattern("sort.v2", 3))
    again = PatternStore(tmp_path)
    assert again.names() == ["arith", "sort.v2"]
    pattern = again.get("arith")
    assert pattern.selection == make_pattern("arith", 0).selection
    assert torch.equal(pattern.scores[0], torch.arange(8, dtype=torch.float32))
    assert pattern.examples == ["arith example 0", "arith example 1", "arith example 2"]
    assert pattern.parameters["keep"] == 2 and pattern.calibration_prompts == 3
    assert again.summary("sort.v2")["kind"] == "moe_experts"
    assert again.problems == {}


def test_search_ranks_the_nearest_pattern_first(tmp_path) -> None:
    store = PatternStore(tmp_path)
    patterns = [make_pattern(name, axis * 2) for axis, name in enumerate(["a", "b", "c"])]
    for pattern in patterns:
        store.add(pattern)
    leaning_to_a = _basis(2, 0.05)
    leaning_to_a[0] = 0.1  # b's examples are nearest, then a's, then c's
    query = _unit(leaning_to_a)[0]
    best = {p.name: float((p.example_embeddings @ query).max()) for p in patterns}  # by brute force
    hits = store.search(query, k=4)
    assert hits[0].name == "b" and hits[0].score > 0.99
    assert [h.name for h in store.search(query, k=3)] == ["b"]  # b's three examples are the three nearest
    assert [h.name for h in hits] == ["b", "a"]  # the fourth nearest example is a's
    everything = store.search(query, k=9)
    assert [h.name for h in everything] == ["b", "a", "c"]
    assert all(h.score == pytest.approx(best[h.name], abs=1e-6) for h in everything)  # each pattern's best example
    with pytest.raises(PatternError, match="dimensions"):
        store.search(torch.ones(DIM + 1))
    assert PatternStore(tmp_path / "empty").search(torch.ones(DIM)) == []


def test_replace_needs_the_flag_and_leaves_one_tensor_file(tmp_path) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("arith", 0))
    with pytest.raises(PatternError, match="exists"):
        store.add(make_pattern("arith", 0, version=2))
    store.add(make_pattern("arith", 4, version=2), replace=True)
    assert store.get("arith").parameters["version"] == 2
    assert len(list((tmp_path / "patterns").glob("arith.*.safetensors"))) == 1
    assert store.search(_unit(_basis(4))[0])[0].name == "arith"


def test_remove_drops_the_pattern_and_its_vectors(tmp_path) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("a", 0))
    store.add(make_pattern("b", 4))
    store.remove("a")
    assert store.names() == ["b"]
    assert {h.name for h in store.search(_unit(_basis(0))[0], k=6)} == {"b"}
    assert not list((tmp_path / "patterns").glob("a.*"))
    with pytest.raises(KeyError, match="stored patterns: b"):
        store.remove("a")
    assert PatternStore(tmp_path).names() == ["b"]


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "model@task", ".hidden", "a" * 65, "x..y", "tab\t"])
def test_bad_names_are_refused(tmp_path, name) -> None:
    with pytest.raises(PatternError, match="invalid pattern name"):
        make_pattern(name, 0)


def test_corrupt_and_foreign_files_are_skipped_not_fatal(tmp_path) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("good", 0))
    store.add(make_pattern("broken", 2))
    (tmp_path / "patterns" / "broken.json").write_text('{"format": "taskmoe-pattern", "na')
    (tmp_path / "patterns" / "foreign.json").write_text(json.dumps({"hello": "world"}))
    reopened = PatternStore(tmp_path)
    assert reopened.names() == ["good"]
    assert set(reopened.problems) == {"broken.json", "foreign.json"}
    assert reopened.search(_unit(_basis(0))[0])[0].name == "good"
    with pytest.raises(KeyError):
        reopened.get("broken")
    assert list((tmp_path / "patterns").glob("broken.*.safetensors")), "a skipped pattern's tensors are kept"


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_a_corrupt_tensor_file_is_reported_at_open_and_not_listed(tmp_path, damage) -> None:
    """A pattern whose tensor file is damaged was listed and served, then silently dropped out of routing:
    it is now checked when the store is opened, reported, and neither listed nor routed."""
    store = PatternStore(tmp_path)
    store.add(make_pattern("a", 0))
    store.add(make_pattern("b", 1))
    tensor_file = next((tmp_path / "patterns").glob("a.*.safetensors"))
    data = tensor_file.read_bytes()
    tensor_file.write_bytes({"garbage": b"garbage", "empty": b"", "truncated": data[: len(data) // 2]}[damage])
    reopened = PatternStore(tmp_path)
    assert reopened.names() == ["b"]
    assert "cannot be read" in reopened.problems["a.json"]
    assert {owner for owner in reopened.examples().owners} == {"b"}
    with pytest.raises(KeyError):
        reopened.get("a")
    assert tensor_file.exists(), "the damaged file is kept for the operator to look at"


def test_fingerprint_mismatch_is_a_clear_error() -> None:
    pattern = make_pattern("a", 0, fingerprint="a" * 64)
    pattern.check_model("a" * 64)
    with pytest.raises(PatternError, match="calibrated on model"):
        pattern.check_model("b" * 64)


class Crash(BaseException):
    """Stands for the process dying: BaseException, so nothing on the way catches it."""


@pytest.mark.parametrize("step", ["save_file", "atomic_write_bytes", "replace", "unlink"])
def test_a_crash_at_any_step_reads_as_before_or_after(tmp_path, monkeypatch, step) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("arith", 0, version=1))
    store.add(make_pattern("other", 4))

    def crash(*args, **kwargs):
        raise Crash

    if step == "replace":
        real_replace = os.replace
        monkeypatch.setattr(
            store_module.os, "replace", lambda a, b: crash() if str(b).endswith(".json") else real_replace(a, b)
        )
    elif step == "unlink":
        monkeypatch.setattr(store_module.Path, "unlink", crash)
    else:
        monkeypatch.setattr(store_module, step, crash)
    with pytest.raises(Crash):
        store.add(make_pattern("arith", 2, version=2), replace=True)
    monkeypatch.undo()

    after = PatternStore(tmp_path)
    assert after.names() == ["arith", "other"] and after.problems == {}
    version = after.get("arith").parameters["version"]
    assert version == (2 if step == "unlink" else 1)
    assert after.search(_unit(_basis(2 if version == 2 else 0))[0])[0].name == "arith"


def test_leftovers_of_a_crash_are_removed_once_old(tmp_path) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("a", 0))
    orphan = tmp_path / "patterns" / "a.deadbeef0000.safetensors"
    orphan.write_bytes(b"half written")
    PatternStore(tmp_path)
    assert orphan.exists(), "a young file may be another process's write in progress"
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    PatternStore(tmp_path)
    assert not orphan.exists()
    assert PatternStore(tmp_path).get("a").name == "a"


def test_index_cache_is_used_and_rebuilt_when_stale(tmp_path) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("a", 0))
    assert (tmp_path / "index.faiss").is_file()
    (tmp_path / "index.faiss").write_bytes(b"not an index")
    rebuilt = PatternStore(tmp_path)
    assert rebuilt.search(_unit(_basis(0))[0])[0].name == "a"


def test_hostile_and_malformed_documents_are_skipped(tmp_path) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("good", 0))
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    document = json.loads((tmp_path / "patterns" / "good.json").read_text())
    (tmp_path / "patterns" / "evil.json").write_text(json.dumps({**document, "name": "evil", "tensors": str(victim)}))
    (tmp_path / "patterns" / "sparse.json").write_text(json.dumps({"format": "taskmoe-pattern", "version": 1}))
    (tmp_path / "patterns" / "binary.json").write_bytes(b"\xff\xfe\x00")
    reopened = PatternStore(tmp_path)
    assert reopened.names() == ["good"]
    assert set(reopened.problems) == {"evil.json", "sparse.json", "binary.json"}
    with pytest.raises(KeyError):
        reopened.remove("evil")
    assert victim.read_bytes() == b"precious"


def test_embeddings_of_another_size_are_refused_before_writing(tmp_path) -> None:
    store = PatternStore(tmp_path)
    store.add(make_pattern("a", 0))
    other = make_pattern("b", 0)
    other.example_embeddings = torch.nn.functional.normalize(torch.ones(3, DIM + 4), dim=1)
    with pytest.raises(PatternError, match="size 12"):
        store.add(other)
    assert PatternStore(tmp_path).names() == ["a"]
    with pytest.raises(PatternError, match="2-D"):
        TaskPattern(**{**make_pattern("c", 0).__dict__, "example_embeddings": torch.ones(3)})


def test_a_second_process_view_is_seen_before_writing(tmp_path) -> None:
    first, second = PatternStore(tmp_path), PatternStore(tmp_path)
    first.add(make_pattern("a", 0))
    with pytest.raises(PatternError, match="exists"):
        second.add(make_pattern("a", 2))
    assert PatternStore(tmp_path).get("a").selection == make_pattern("a", 0).selection


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_absurd_embeddings_are_refused_and_never_loaded(tmp_path, bad) -> None:
    """One pattern with NaN, infinite or unnormalised example embeddings once made every routed request a
    500, even after a restart: it is refused when made, and a file on disk that has them is skipped."""
    broken = make_pattern("broken", 2)
    with pytest.raises(PatternError, match="embeddings"):
        TaskPattern(**{**vars(broken), "example_embeddings": torch.full((3, DIM), bad)})
    with pytest.raises(PatternError, match="created"):
        TaskPattern(**{**vars(broken), "created": float("nan")})
    with pytest.raises(PatternError, match="scores"):
        TaskPattern(**{**vars(broken), "scores": {0: torch.tensor([float("nan")] * 8)}})
    store = PatternStore(tmp_path)
    store.add(make_pattern("good", 0))
    store.add(broken)
    from safetensors.torch import load_file, save_file

    tensor_file = next((tmp_path / "patterns").glob("broken.*.safetensors"))
    tensors = load_file(str(tensor_file))
    tensors["example_embeddings"] = torch.full_like(tensors["example_embeddings"], bad)
    save_file(tensors, str(tensor_file))
    (tmp_path / "index.faiss").unlink(missing_ok=True)
    for cached in tmp_path.glob("*.faiss*"):
        cached.unlink()
    reopened = PatternStore(tmp_path)
    assert reopened.names() == ["good"] and "embeddings" in reopened.problems["broken.json"]
    assert reopened.search(_unit(_basis(0))[0])[0].name == "good"
    examples = reopened.examples()
    assert "broken" not in examples.owners and bool(torch.isfinite(torch.as_tensor(examples.vectors)).all())
    assert len(examples.texts) == len(examples.owners)


def test_files_are_written_readable_and_crashed_index_writes_are_cleaned_up(tmp_path) -> None:
    """Files the server writes had 0600 (temporary files renamed into place) where the shipped ones have
    0644; a crashed write of the index cache left its temporary file behind for ever."""
    store = PatternStore(tmp_path)
    store.add(make_pattern("a", 0))
    written = [*(tmp_path / "patterns").iterdir(), tmp_path / "index.json", tmp_path / "index.faiss"]
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {"0o644"}
    stale = tmp_path / ".index.faiss.abc123.tmp"
    stale.write_bytes(b"half an index")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    young = tmp_path / ".index.json.def456.tmp"
    young.write_bytes(b"another process writing now")
    PatternStore(tmp_path)
    assert not stale.exists() and young.exists()


def test_a_tensor_file_damaged_in_place_is_seen_by_a_running_reader(tmp_path) -> None:
    """A server's store is open while a tensor file is truncated and its document stays as it was: the
    cheap change check (`disk_revision`, stats only) must see it, and the pattern is then a problem."""
    store = PatternStore(tmp_path)
    store.add(make_pattern("a", 0))
    store.add(make_pattern("b", 1))
    running = PatternStore(tmp_path)
    assert not running.refresh_if_changed()
    tensor_file = next((tmp_path / "patterns").glob("a.*.safetensors"))
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[: len(data) // 2])
    assert running.refresh_if_changed(), "a damaged tensor file under an unchanged document went unnoticed"
    assert running.names() == ["b"] and running.problem("a") is not None
    assert "cannot be read" in running.problem("a")
    assert running.problem("b") is None and running.problem("never-stored") is None
    tensor_file.write_bytes(data)
    assert running.refresh_if_changed() and running.names() == ["a", "b"] and running.problem("a") is None


def test_readers_never_wait_for_a_re_read(tmp_path, monkeypatch) -> None:
    """A server's requests read the store's view (names, documents, the index) on every request; a re-read
    after another process's write reads every file, and used to hold the view's lock meanwhile. Held in the
    middle of a re-read, the old view still answers at once; then the new one is swapped in."""
    store = PatternStore(tmp_path)
    store.add(make_pattern("a", 0))
    PatternStore(tmp_path).add(make_pattern("b", 1))
    reading, release = threading.Event(), threading.Event()
    read_document = store_module._read_document

    def held(path):
        reading.set()
        release.wait(30)
        return read_document(path)

    monkeypatch.setattr(store_module, "_read_document", held)
    rereading = threading.Thread(target=store.refresh_if_changed)
    rereading.start()
    try:
        assert reading.wait(10)
        began = time.perf_counter()
        assert store.names() == ["a"] and "a" in store and store.summary("a")["name"] == "a"
        assert store.search(_unit(_basis(0))[0])[0].name == "a" and store.version >= 1
        assert time.perf_counter() - began < 1.0, "a reader waited for the re-read"
    finally:
        release.set()
        rereading.join(30)
    assert store.names() == ["a", "b"]
