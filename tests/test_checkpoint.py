"""The safetensors reader: sharded and single-file checkpoints, slices, byte counts and errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from server.model.checkpoint import CheckpointError, CheckpointReader, contiguous_runs, model_fingerprint

from tiny_models import moe_configs, save_random_model


@pytest.fixture()
def sharded(tmp_path):
    a = torch.arange(6 * 4 * 3, dtype=torch.float32).reshape(6, 4, 3)
    b = torch.arange(5 * 7, dtype=torch.bfloat16).reshape(5, 7)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path, a, b


def test_contiguous_runs() -> None:
    assert contiguous_runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    assert contiguous_runs([3, 1, 2]) == [(3, 4), (1, 3)]


def test_reads_whole_tensors_and_counts_bytes(sharded) -> None:
    directory, a, b = sharded
    reader = CheckpointReader(directory)
    assert set(reader.names) == {"a", "b"}
    assert reader.total_bytes == a.numel() * 4 + b.numel() * 2
    assert reader.bytes_read == 0, "opening reads nothing"
    assert torch.equal(reader.read("b"), b)
    assert reader.bytes_read == b.numel() * 2


def test_reads_only_the_selected_experts_and_channels(sharded) -> None:
    directory, a, b = sharded
    reader = CheckpointReader(directory)
    picked = reader.read_indices("a", [4, 1, 2])
    assert torch.equal(picked, a[[4, 1, 2]])
    assert reader.bytes_read == 3 * 4 * 3 * 4
    assert torch.equal(reader.read_index("a", 5), a[5])
    columns = reader.read_indices("b", [0, 3, 4, 6], dim=1)
    assert torch.equal(columns, b[:, [0, 3, 4, 6]])
    assert reader.bytes_read == 3 * 4 * 3 * 4 + 4 * 3 * 4 + 5 * 4 * 2


def test_errors_are_clear(sharded, tmp_path_factory) -> None:
    directory, _, _ = sharded
    reader = CheckpointReader(directory)
    with pytest.raises(CheckpointError, match="no tensor 'c'"):
        reader.read("c")
    with pytest.raises(CheckpointError, match="out of range"):
        reader.read_indices("a", [0, 6])
    with pytest.raises(CheckpointError, match="dimension"):
        reader.read_indices("a", [0], dim=2)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CheckpointError, match="only safetensors"):
        CheckpointReader(empty)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        CheckpointReader(empty / "missing")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointReader(directory)


def test_row_views_point_into_the_file_and_count_their_bytes(sharded) -> None:
    """The expert pool copies experts from these views straight into its slots: they must be the rows,
    without a copy of their own, and counted like reads."""
    directory, a, b = sharded
    reader = CheckpointReader(directory)
    rows = reader.rows_view("a", 2, 5)
    assert torch.equal(rows, a[2:5])
    assert torch.equal(reader.rows_view("b", 1, 2), b[1:2])
    assert reader.bytes_read == 3 * 4 * 3 * 4 + 7 * 2
    assert reader.rows_view("a", 3, 4).data_ptr() == rows.data_ptr() + 4 * 3 * 4, "views of one map, no copies"
    with pytest.raises(CheckpointError, match="out of range"):
        reader.rows_view("a", 4, 7)


def test_model_fingerprint_tells_checkpoints_apart(tmp_path) -> None:
    """A pattern belongs to one model: the same weights and config give the same fingerprint, whatever version
    of transformers wrote them; a retrained model of the same shapes, or another config, gives another."""
    config = moe_configs()["qwen3_moe"]
    first = save_random_model(config, tmp_path / "first")
    again = save_random_model(config, tmp_path / "again")
    retrained = save_random_model(config, tmp_path / "retrained", seed=1)
    assert model_fingerprint(first) == model_fingerprint(again)
    assert len(model_fingerprint(first)) == 64
    assert model_fingerprint(retrained) != model_fingerprint(first), "same shapes, other weights"
    document = json.loads((again / "config.json").read_text())
    document["transformers_version"] = "0.0.1"
    (again / "config.json").write_text(json.dumps(document))
    assert model_fingerprint(again) == model_fingerprint(first), "the writer's version is not the model"
    document["num_experts_per_tok"] = 3
    (again / "config.json").write_text(json.dumps(document))
    assert model_fingerprint(again) != model_fingerprint(first)
