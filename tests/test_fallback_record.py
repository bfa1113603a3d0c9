"""The record of traffic no pattern covers, and the patterns proposed from it (`pattern_store.fallback_record`,
`pattern_store.suggest`, `--record-fallback`, `/admin/suggestions`, `taskmoe patterns suggest`)."""

from __future__ import annotations

import shutil
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from demo.tasks import get_task
from pattern_store.fallback_record import FILE_NAME, FallbackRecord, read_record
from pattern_store.store import PatternStore
from pattern_store.suggest import cluster, features
from server.cli import main
from server.config import ServerConfig

from conftest import DEMO_MOE
from server_harness import running_server

SECRET = "my private prompt 7731"


def _vector(seed: int, dim: int = 8) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def test_the_record_is_bounded_persisted_private_and_keeps_text_only_when_asked(tmp_path) -> None:
    record = FallbackRecord(tmp_path, limit=3, keep_text=False)
    ngrams = torch.zeros(1, 16)
    ngrams[0, [2, 5]] = torch.tensor([0.6, 0.8])
    for i in range(5):
        record.add(f"{SECRET} {i}", _vector(i), ngrams, "out-of-store")
    assert len(record) == 3  # the oldest left
    record.close()
    path = tmp_path / FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SECRET.encode() not in path.read_bytes()  # no text without keep_text
    queries = read_record(path)
    assert [q.text for q in queries] == [None] * 3
    np.testing.assert_allclose(queries[-1].embedding, _vector(4).numpy())
    np.testing.assert_allclose(queries[0].ngrams(16), ngrams[0].numpy())
    with_text = FallbackRecord(tmp_path, limit=4, keep_text=True)
    with_text.add(SECRET, _vector(9), ngrams, "below-threshold")
    with_text.close()
    assert [q.text for q in read_record(path)] == [None, None, None, SECRET]
    assert FallbackRecord(tmp_path, limit=4, keep_text=False).queries()[-1].text is None  # text dropped on restart
    assert with_text.clear() == 4 and not path.exists() and len(with_text) == 0
    path.write_bytes(b"not a record")
    with pytest.raises(ValueError, match="not a readable fallback record"):
        FallbackRecord(tmp_path, limit=4)


def test_clusters_group_each_tasks_queries() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 32))
    rows = [centres[k] + 0.05 * rng.normal(size=32) for k in (0, 1) for _ in range(12)]
    rows += [rng.normal(size=32) for _ in range(3)]  # three strays, wherever they go
    labels = cluster(np.stack(rows), min_size=5)
    assert len(set(labels[:12])) == 1 and len(set(labels[12:24])) == 1 and labels[0] != labels[12]
    assert -1 not in labels[:24]
    assert (cluster(np.stack(rows), min_size=5, distance=2.0)[:24] == 0).all()  # cut higher: one cluster


def _held_out_store(tmp_path: Path, *left_out: str) -> Path:
    store_dir = Path(shutil.copytree(DEMO_MOE / "patterns", tmp_path / "patterns"))
    store = PatternStore(store_dir)
    for name in left_out:
        store.remove(name)
    return store_dir


@pytest.mark.slow
def test_fallback_traffic_is_recorded_suggested_and_calibrated_into_a_pattern(tmp_path, capsys) -> None:
    """The demo store without `upper`: its queries fall back, are recorded within the bound, form one pure
    suggestion, and the admin job and `patterns suggest --calibrate` make patterns that routing then sends
    them to."""
    store_dir = _held_out_store(tmp_path, "upper")
    assert main(["patterns", "suggest", "--store", str(store_dir)]) == 2
    assert "--record-fallback" in capsys.readouterr().err  # nothing recorded: how to turn it on
    config = ServerConfig(model=DEMO_MOE, store=store_dir, record_fallback=40, record_text=True, admin_key="k")
    headers = {"Authorization": "Bearer k"}
    with running_server(config) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [e.prompt for e in get_task("upper").examples(30, 91)] + [
            e.prompt for e in get_task("arith").examples(10, 91)
        ]

        def ask(prompt: str) -> str:
            reply = client.chat.completions.with_raw_response.create(
                model="demo-moe", messages=[{"role": "user", "content": prompt}], max_tokens=2
            )
            return reply.headers["x-taskmoe-pattern"]

        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(ask, prompts))
        assert served[:30] == ["full"] * 30 and served[30:] == ["arith"] * 10
        summary = httpx.get(f"{server.url}/admin/fallback-record", headers=headers).json()
        assert summary["queries"] == 30 and summary["text"] is True and sum(summary["reasons"].values()) == 30
        with ThreadPoolExecutor(8) as pool:  # 30 more: the record keeps its newest 40
            list(pool.map(ask, [e.prompt for e in get_task("upper").examples(30, 92)]))
        assert httpx.get(f"{server.url}/admin/fallback-record", headers=headers).json()["queries"] == 40
        suggestions = httpx.get(f"{server.url}/admin/suggestions", headers=headers).json()["data"]
        calibrate = f"{server.url}/admin/suggestions/{{}}/calibrate"
        missing = httpx.post(calibrate.format(99), headers=headers, json={"name": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "suggestion_not_found"
        job = httpx.post(calibrate.format(0), headers=headers, json={"name": "upper-job"}).json()
        for _ in range(600):  # the admin job: the full model answers the prompts, then the usual recipe
            job = httpx.get(f"{server.url}/admin/jobs/{job['id']}", headers=headers).json()
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
        assert job["status"] == "succeeded", job
        assert PatternStore(store_dir).get("upper-job").parameters["refine"] == "e2e"  # the suggestion's default
        assert httpx.delete(f"{server.url}/admin/patterns/upper-job", headers=headers, timeout=60).status_code == 200
        assert suggestions[0]["size"] >= 20 and suggestions[0]["covered_by"] is None
        assert all(
            "uppercase" in e.lower() or "capital" in e.lower() or "upper" in e.lower()
            for e in suggestions[0]["examples"]
        )
    assert (store_dir / FILE_NAME).is_file()  # written when the server stopped
    assert main(["patterns", "suggest", "--store", str(store_dir), "--json"]) == 0
    args = ["patterns", "suggest", "--store", str(store_dir), "--model", str(DEMO_MOE), "--quiet"]
    assert main([*args, "--calibrate", "upper-suggested"]) == 0
    assert PatternStore(store_dir).get("upper-suggested").parameters["refine"] == "e2e"
    assert not list(store_dir.glob(".suggestion-*"))  # the prompts' calibration file is gone
    from pattern_store.embedder import Embedder
    from server.routing import Router

    router = Router(PatternStore(store_dir), Embedder())
    router.learn()
    decisions = router.route_texts([e.prompt for e in get_task("upper").examples(20, 93)])
    router.close()
    assert sum(d.patterns == ("upper-suggested",) for d in decisions) >= 18


@pytest.mark.slow
def test_a_server_that_records_nothing_says_how_to_start(tmp_path) -> None:
    config = ServerConfig(model=DEMO_MOE, store=_held_out_store(tmp_path), admin_key="k")
    with running_server(config) as server:
        for method, path in (
            ("GET", "/admin/fallback-record"),
            ("DELETE", "/admin/fallback-record"),
            ("GET", "/admin/suggestions"),
        ):
            response = httpx.request(method, f"{server.url}{path}", headers={"Authorization": "Bearer k"})
            assert response.status_code == 409, path
            error = response.json()["error"]
            assert error["code"] == "recording_off" and "--record-fallback" in error["message"]
    assert not (tmp_path / "patterns" / FILE_NAME).exists()  # nothing recorded unless switched on


def test_features_place_queries_as_routing_does() -> None:
    from pattern_store.fallback_record import RecordedQuery

    query = RecordedQuery(
        np.array([3.0, 4.0], np.float32), np.array([1], np.int32), np.array([0.5], np.float32), "x", 0.0
    )
    vector = features([query], ngram_width=3, topic_weight=0.4)[0]
    np.testing.assert_allclose(vector, [0.6 * 0.4**0.5, 0.8 * 0.4**0.5, 0.0, 0.5, 0.0], rtol=1e-6)
