"""`taskmoe calibrate`, `patterns` and `route` on the demo MoE, with the real embedder and FAISS."""

from __future__ import annotations

import json
import shutil

import pytest

from demo.tasks import get_task
from pattern_store.store import PatternStore
from server.cli import main
from server.model.checkpoint import model_fingerprint

from conftest import DEMO_DENSE, DEMO_MOE


def _write_prompts(path, task: str, n: int, seed: int) -> str:
    path.write_text(
        "".join(json.dumps({"prompt": e.prompt, "task": task}) + "\n" for e in get_task(task).examples(n, seed))
    )
    return str(path)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-store")
    store = root / "store"
    for task in ("arith", "upper", "translate"):
        prompts = _write_prompts(root / f"{task}.jsonl", task, 24, seed=11)
        args = ["calibrate", "--model", str(DEMO_MOE), "--store", str(store), "--name", task, "--prompts", prompts]
        assert main([*args, "--keep-experts", "6", "--quiet"]) == 0
    return store


def test_calibrated_patterns_are_stored_with_their_model_fingerprint(store_dir) -> None:
    store = PatternStore(store_dir)
    assert store.names() == ["arith", "translate", "upper"]
    pattern = store.get("upper")
    assert pattern.method == "reap" and pattern.calibration_prompts == 24 and len(pattern.examples) == 24
    assert pattern.parameters["refine"] == "none" and pattern.parameters["budget"] == "uniform"
    assert all(len(kept) == 6 for kept in pattern.selection.layers.values())
    assert len(pattern.selection.layers) == 4
    assert pattern.model_fingerprint == model_fingerprint(DEMO_MOE)
    assert pattern.example_embeddings is not None and pattern.example_embeddings.shape == (24, 384)
    assert store.get("arith").selection != pattern.selection, "different tasks keep different experts"


def test_patterns_list_show_remove(store_dir, capsys, tmp_path) -> None:
    assert main(["patterns", "list", "--store", str(store_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in listed] == ["arith", "translate", "upper"]
    assert main(["patterns", "show", "arith", "--store", str(store_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "moe_experts"
    assert main(["patterns", "show", "poetry", "--store", str(store_dir)]) == 2
    assert "stored patterns: arith, translate, upper" in capsys.readouterr().err
    assert main(["patterns", "list", "--store", str(tmp_path / "nothing")]) == 2
    assert "not a pattern store" in capsys.readouterr().err


def test_route_text_and_file(store_dir, capsys, tmp_path) -> None:
    assert main(["route", "--store", str(store_dir), "What is 4 + 3?"]) == 0
    out = capsys.readouterr().out
    assert "-> arith (classifier, p=" in out and out.splitlines()[0].split() == [
        "pattern",
        "probability",
        "typicality",
        "similarity",
    ]
    queries = tmp_path / "queries.jsonl"
    expected = []
    lines = []
    for task in ("arith", "upper", "translate"):
        for example in get_task(task).examples(5, seed=99):
            lines.append(json.dumps({"prompt": example.prompt}))
            expected.append(task)
    queries.write_text("\n".join(lines) + "\n")
    assert main(["route", "--store", str(store_dir), "--file", str(queries)]) == 0
    routed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["pattern"] for r in routed] == expected
    assert all(0.9 <= r["probability"] <= 1.0001 and r["reason"] == "classifier" for r in routed)
    # 24 examples a pattern: the least typical of them has typicality 1/25, so the check needs novelty > 0.04
    assert main(["route", "--store", str(store_dir), "--novelty", "0.05", "Tell me a joke about ships"]) == 0
    out = capsys.readouterr().out
    assert "-> full model (out-of-store" in out or "-> full model (below-threshold" in out, out
    assert main(["route", "--store", str(store_dir), "--threshold", "1.5", "What is 4 + 3?"]) == 2
    assert "probability" in capsys.readouterr().err


def test_calibrate_errors_are_one_line(store_dir, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    base = ["calibrate", "--model", str(DEMO_MOE), "--store", str(store_dir), "--quiet"]
    dense = ["calibrate", "--model", str(DEMO_DENSE), "--store", str(store_dir), "--quiet"]
    cases = [
        ([*base, "--name", "x", "--prompts", str(bad)], "needs a non-empty string field 'prompt'"),
        ([*base, "--name", "../evil", "--prompts", str(bad)], "invalid pattern name"),
        ([*base, "--name", "arith", "--prompts", _write_prompts(tmp_path / "a.jsonl", "arith", 3, 1)], "--replace"),
        ([*base, "--name", "y", "--prompts", str(tmp_path / "a.jsonl"), "--keep-experts", "1"], "top-k"),
        ([*base, "--name", "y", "--prompts", str(tmp_path / "a.jsonl"), "--method", "magic"], "unknown"),
        ([*dense, "--name", "y", "--prompts", str(tmp_path / "a.jsonl"), "--budget", "adaptive"], "has none"),
        ([*base, "--name", "y", "--prompts", str(tmp_path / "a.jsonl"), "--budget", "loss"], "needs refine 'e2e'"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert PatternStore(store_dir).names() == ["arith", "translate", "upper"], "no stored pattern was lost"


def test_dense_calibration_stores_a_channel_pattern(tmp_path) -> None:
    prompts = _write_prompts(tmp_path / "sort.jsonl", "sort", 16, seed=3)
    args = ["calibrate", "--model", str(DEMO_DENSE), "--store", str(tmp_path / "s"), "--name", "sort"]
    assert main([*args, "--prompts", prompts, "--sparsity", "0.3", "--quiet"]) == 0
    pattern = PatternStore(tmp_path / "s").get("sort")
    assert pattern.kind == "dense_channels" and pattern.method == "seap"
    assert 0 not in pattern.selection.layers, "the first layer is never pruned"
    assert pattern.selection.bias and set(pattern.selection.bias) == set(pattern.selection.layers)
    width = json.loads((DEMO_DENSE / "config.json").read_text())["intermediate_size"]
    kept = sum(len(v) for v in pattern.selection.layers.values()) + width * (4 - len(pattern.selection.layers))
    assert kept / (4 * width) == pytest.approx(0.7, abs=0.01)


def test_responses_are_calibrated_as_the_assistant_turn(tmp_path) -> None:
    from transformers import AutoTokenizer

    from server.patterns import CalibrationText, calibration_set, read_calibration

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MOE)
    calibration = calibration_set(
        tokenizer, [CalibrationText("What is 1 + 2?", "3"), CalibrationText("What is 1 + 2?")], 256
    )
    with_response, prompt_only = calibration.token_ids
    assert tokenizer.decode(with_response) == "<|user|>What is 1 + 2?<|end|><|assistant|>3<|end|>"
    assert tokenizer.decode(prompt_only) == "<|user|>What is 1 + 2?<|end|><|assistant|>"
    # the answer (what refinement by answer loss scores) begins after the assistant's tag; none without one
    answer_start, no_answer = calibration.answer_starts
    assert tokenizer.decode(with_response[answer_start:]) == "3<|end|>"
    assert no_answer == len(prompt_only)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "task": "x"}\n{"prompt": "c"}\n')
    assert read_calibration(path) == [CalibrationText("a", "b"), CalibrationText("c", None)]
    path.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(ValueError, match="'response' must be a string"):
        read_calibration(path)


@pytest.mark.slow
def test_refined_calibration_records_what_it_did(tmp_path, capsys) -> None:
    """Prompts without responses, refined by answer loss: the full model answers them first, the adaptive
    budget spends the same total, and the pattern's document says what was done."""
    prompts = _write_prompts(tmp_path / "sort.jsonl", "sort", 12, seed=5)
    args = ["calibrate", "--model", str(DEMO_MOE), "--store", str(tmp_path / "s"), "--name", "sort", "--quiet"]
    assert main([*args, "--prompts", prompts, "--refine", "e2e", "--budget", "adaptive"]) == 0
    assert "refined (e2e)" in capsys.readouterr().out
    pattern = PatternStore(tmp_path / "s").get("sort")
    assert pattern.parameters["refine"] == "e2e" and pattern.parameters["budget"] == "adaptive"
    assert sum(len(kept) for kept in pattern.selection.layers.values()) == 8 * 4
    assert all(len(kept) >= 2 for kept in pattern.selection.layers.values())
    record = pattern.parameters["selection"]
    assert record["e2e"]["answers_generated"] == 12
    assert record["e2e"]["loss"] <= record["e2e"]["start_loss"] == min(record["e2e"]["candidate_losses"].values())
    assert set(record["e2e"]["candidate_losses"]) == {
        "tcess",
        "tcess-logit",
        "frequency",
        "reap",
        "ean",
        "easy-ep",
        "local",
    }
    assert set(record["local"]) == {"0", "1", "2", "3"}
    assert all(layer["error"] <= layer["start_error"] for layer in record["local"].values())


def test_calibration_records_coverage_and_patterns_coverage_measures_it_again(store_dir, tmp_path, capsys) -> None:
    """The figure `calibrate` records is what `patterns coverage` measures on the same prompts; measured on
    another task's prompts it is lower; without --model the command says what it needs."""
    recorded = PatternStore(store_dir).get("upper").parameters["coverage"]
    assert 0 < recorded["top1"] <= 1 and 0 < recorded["mass"] < 1 and recorded["tokens"] > 24
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    prompts = _write_prompts(tmp_path / "upper.jsonl", "upper", 24, seed=11)  # the calibration prompts again
    args = ["patterns", "coverage", "upper", "--store", str(copy), "--model", str(DEMO_MOE)]
    assert main([*args, "--prompts", prompts]) == 0
    again = PatternStore(copy).get("upper").parameters["coverage"]
    assert again["mass"] == pytest.approx(recorded["mass"], abs=1e-5) and again["tokens"] == recorded["tokens"]
    other = _write_prompts(tmp_path / "arith.jsonl", "arith", 24, seed=11)
    assert main([*args, "--prompts", other]) == 0
    assert PatternStore(copy).get("upper").parameters["coverage"]["mass"] < recorded["mass"]
    assert main(["patterns", "coverage", "--store", str(copy)]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_calibration_with_novices_stores_them_and_export_refuses_the_pattern(tmp_path, capsys) -> None:
    prompts = _write_prompts(tmp_path / "upper.jsonl", "upper", 12, seed=6)
    store = tmp_path / "s"
    args = ["calibrate", "--model", str(DEMO_MOE), "--store", str(store), "--name", "upper", "--quiet"]
    assert main([*args, "--prompts", prompts, "--keep-experts", "3", "--substitute", "novice"]) == 0
    assert "novices for the pruned experts" in capsys.readouterr().out
    pattern = PatternStore(store).get("upper")
    assert pattern.parameters["substitute"] == "novice"
    assert {layer: rows.shape for layer, rows in pattern.selection.novices.items()} == dict.fromkeys(
        range(4), (13, 128)
    )
    assert main(["patterns", "show", "upper", "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["selection"]["substitute"] == "novice"
    out = tmp_path / "out"
    assert (
        main(["export", "--model", str(DEMO_MOE), "--pattern", "upper", "--store", str(store), "--out", str(out)]) == 2
    )
    error = capsys.readouterr().err
    assert "novices" in error and "--substitute none" in error and len(error.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(SystemExit) as usage:
        main([*args, "--prompts", prompts, "--substitute", "mean", "--replace"])
    assert usage.value.code == 2 and "invalid choice: 'mean'" in capsys.readouterr().err


def test_calibration_with_low_rank_novices_stores_their_maps(tmp_path, capsys) -> None:
    prompts = _write_prompts(tmp_path / "sort.jsonl", "sort", 12, seed=7)
    store = tmp_path / "s"
    args = ["calibrate", "--model", str(DEMO_MOE), "--store", str(store), "--name", "sort", "--quiet"]
    assert main([*args, "--prompts", prompts, "--keep-experts", "4", "--substitute", "low-rank",
                 "--substitute-rank", "4"]) == 0  # fmt: skip
    pattern = PatternStore(store).get("sort")
    assert pattern.parameters["substitute"] == "low-rank" and pattern.parameters["substitute_rank"] == 4
    for layer, maps in pattern.selection.low_rank.items():
        assert maps.inputs.shape == maps.outputs.shape == (12, 128, 4)
        assert maps.means.shape == pattern.selection.novices[layer].shape == (12, 128)
    capsys.readouterr()
    assert main([*args, "--prompts", prompts, "--substitute", "low-rank", "--substitute-rank", "0", "--replace"]) == 2
    error = capsys.readouterr().err
    assert "rank is 1 to 1024" in error and len(error.strip().splitlines()) == 1
    assert main([*args, "--prompts", prompts, "--substitute", "novice", "--substitute-rank", "4", "--replace"]) == 2
    error = capsys.readouterr().err
    assert "give substitute 'low-rank' too" in error and len(error.strip().splitlines()) == 1
