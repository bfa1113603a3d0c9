"""A task pattern: what a task keeps (experts or channels per layer), why (scores), and of which model.

On disk a pattern is two files: `NAME.json`, a versioned JSON document, and the safetensors file it
names, which holds the tensors (per-layer scores and the embeddings of the example prompts that
routing matches queries against). The JSON is written last and atomically, so a reader sees either the
old pattern or the new one (see `store.py`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from pattern_store.selection import Selection, SelectionError
from pattern_store.substitutes import LowRankMaps

FORMAT_VERSION = 1
EMBEDDING_NORM_TOLERANCE = 0.01
"""How far from 1 an example embedding's L2 norm may be (they are stored normalised)."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PatternError(ValueError):
    """A pattern that is invalid, unreadable, or used with a model it was not calibrated on."""


class PatternExistsError(PatternError):
    """A pattern of that name is stored, and the write did not ask to replace it."""


def validate_name(name: str) -> str:
    """Pattern names become file names and appear in `MODEL@PATTERN`: letters, digits, `_ . -`, no path tricks."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise PatternError(
            f"invalid pattern name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit (no '/', '@' or '..')"
        )
    return name


@dataclass
class TaskPattern:
    """One task's pattern. `scores[layer]` holds one score per expert (or channel) of that layer."""

    name: str
    selection: Selection
    scores: dict[int, torch.Tensor]
    method: str
    parameters: dict[str, Any]
    model_fingerprint: str
    created: float
    calibration_prompts: int
    examples: list[str] = field(default_factory=list)
    example_embeddings: torch.Tensor | None = None  # [len(examples), dim], L2-normalised
    model: dict[str, str] = field(default_factory=dict)  # the model's name, architecture hash and precision

    def __post_init__(self) -> None:
        validate_name(self.name)
        embeddings = self.example_embeddings
        if embeddings is not None and (embeddings.dim() != 2 or not embeddings.is_floating_point()):
            raise PatternError(f"pattern {self.name}: example embeddings must be a 2-D float tensor [examples, dim]")
        if embeddings is not None and embeddings.shape[0] != len(self.examples):
            raise PatternError(
                f"pattern {self.name}: {len(self.examples)} examples but {self.example_embeddings.shape[0]} embeddings"
            )
        if embeddings is not None and embeddings.numel():
            # routing fits a classifier on every pattern's embeddings together: one bad row would fail them all
            if not bool(torch.isfinite(embeddings).all()):
                raise PatternError(f"pattern {self.name}: example embeddings contain NaN or infinite values")
            norms = embeddings.float().norm(dim=1)
            if bool(((norms - 1).abs() > EMBEDDING_NORM_TOLERANCE).any()):
                raise PatternError(
                    f"pattern {self.name}: example embeddings must be L2-normalised (row norms "
                    f"{float(norms.min()):.3g} to {float(norms.max()):.3g})"
                )
        if not math.isfinite(self.created):
            raise PatternError(f"pattern {self.name}: 'created' must be a finite timestamp")
        for layer, values in self.scores.items():
            if not isinstance(values, torch.Tensor) or bool(torch.isnan(values).any()):
                raise PatternError(f"pattern {self.name}: scores of layer {layer} must be a tensor without NaN")

    @property
    def kind(self) -> str:
        return self.selection.kind

    def check_model(self, fingerprint: str, model: dict[str, str] | None = None) -> None:
        """A pattern belongs to one model; anything else is a clear error, not a silently wrong variant."""
        if fingerprint != self.model_fingerprint:
            raise PatternError(model_mismatch(self.name, self.model_fingerprint, self.model, fingerprint, model))

    # -- serialisation ---------------------------------------------------------------------------

    def document(self, tensor_file: str) -> dict[str, Any]:
        return {
            "format": "taskmoe-pattern",
            "version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "selection": self.selection.to_json(),
            "method": self.method,
            "parameters": self.parameters,
            "model_fingerprint": self.model_fingerprint,
            "created": self.created,
            "calibration_prompts": self.calibration_prompts,
            "examples": self.examples,
            "tensors": tensor_file,
        } | ({"model": self.model} if self.model else {})

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"scores.{layer}": scores.detach().float().cpu().contiguous() for layer, scores in self.scores.items()}
        for layer, novices in self.selection.novices.items():
            out[f"novices.{layer}"] = novices.detach().float().cpu().contiguous()
        for layer, maps in self.selection.low_rank.items():
            for part in LOW_RANK_PARTS:
                out[f"low_rank.{layer}.{part}"] = getattr(maps, part).detach().float().cpu().contiguous()
        if self.example_embeddings is not None:
            out["example_embeddings"] = self.example_embeddings.detach().float().cpu().contiguous()
        return out

    @classmethod
    def from_parts(cls, document: Any, tensors: dict[str, torch.Tensor], schema_only: bool = False) -> TaskPattern:
        """Rebuild a pattern from its JSON document and tensors; every defect is a `PatternError`. `schema_only`:
        the document is checked without its tensors (what the result lacks of them, it lacks)."""
        if not isinstance(document, dict) or document.get("format") != "taskmoe-pattern":
            raise PatternError("not a taskmoe pattern document")
        if document.get("version") != FORMAT_VERSION:
            raise PatternError(
                f"pattern format version {document.get('version')!r}; this taskmoe reads {FORMAT_VERSION}"
            )
        try:
            novices = {int(key.split(".", 1)[1]): value for key, value in tensors.items() if key.startswith("novices.")}
            selection = Selection.from_json(document["selection"], novices, schema_only, _low_rank(tensors))
            scores = {int(key.split(".", 1)[1]): value for key, value in tensors.items() if key.startswith("scores.")}
            return cls(
                name=document["name"],
                selection=selection,
                scores=scores,
                method=str(document["method"]),
                parameters=dict(document.get("parameters") or {}),
                model_fingerprint=str(document["model_fingerprint"]),
                created=float(document["created"]),
                calibration_prompts=int(document["calibration_prompts"]),
                examples=[str(e) for e in document.get("examples") or []],
                example_embeddings=tensors.get("example_embeddings"),
                model={str(k): str(v) for k, v in (document.get("model") or {}).items()},
            )
        except KeyError as error:
            raise PatternError(f"pattern document lacks {error.args[0]!r}") from None
        except (SelectionError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise PatternError(f"invalid pattern document: {error}") from None


LOW_RANK_PARTS = ("means", "inputs", "outputs")


def _low_rank(tensors: dict[str, torch.Tensor]) -> dict[int, LowRankMaps]:
    """The low-rank maps in a pattern's tensors (`low_rank.LAYER.PART`), per layer."""
    layers = {int(key.split(".")[1]) for key in tensors if key.startswith("low_rank.")}
    return {layer: LowRankMaps(*(tensors[f"low_rank.{layer}.{part}"] for part in LOW_RANK_PARTS)) for layer in layers}


def model_mismatch(
    name: str, fingerprint: str, model: dict[str, str] | None, this_fingerprint: str, this_model: dict[str, str] | None
) -> str:
    """Why pattern `name`, calibrated on the model of `fingerprint` (described by `model`, when the pattern
    recorded it), does not serve this one: which model it belongs to, and whether the two are the same
    architecture in another precision (the bf16 and FP8 releases of one model) or other weights altogether."""
    model, this_model = model or {}, this_model or {}
    theirs = f"{model['name']} ({model.get('precision', '?')}, {fingerprint[:12]})" if model else fingerprint[:12]
    ours = (
        f"{this_model['name']} ({this_model.get('precision', '?')}, {this_fingerprint[:12]})"
        if this_model
        else this_fingerprint[:12]
    )
    start = f"pattern {name!r} was calibrated on model {theirs}, not on this model {ours}"
    if not model or not this_model:
        return f"{start}; calibrate it again for this model"
    if model.get("architecture") != this_model.get("architecture"):
        return f"{start}: a different architecture; calibrate it again for this model"
    if model.get("precision") != this_model.get("precision"):
        return (
            f"{start}: the same architecture and tensor names in another precision ({model.get('precision')} "
            f"there, {this_model.get('precision')} here), so not the same weights; re-calibrate it on this "
            "checkpoint"
        )
    return f"{start}: the same architecture and precision but other weights; calibrate it again for this model"


BUNDLE_KEY = "taskmoe_pattern"


def pattern_to_bundle(pattern: TaskPattern) -> bytes:
    """One self-contained file for moving a pattern between stores or servers: a safetensors file of its
    tensors whose metadata holds its JSON document."""
    from safetensors.torch import save

    return save(pattern.tensors(), metadata={BUNDLE_KEY: json.dumps(pattern.document(tensor_file=""))})


def pattern_from_bundle(data: bytes) -> TaskPattern:
    """The inverse of `pattern_to_bundle`; anything else is a `PatternError`."""
    from safetensors.torch import load

    try:
        header_size = int.from_bytes(data[:8], "little")
        if not 2 <= header_size <= len(data) - 8:
            raise ValueError("truncated header")
        header = json.loads(data[8 : 8 + header_size])
        document = json.loads(header["__metadata__"][BUNDLE_KEY])
        tensors = load(bytes(data))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise PatternError(f"not a taskmoe pattern bundle ({type(error).__name__}: {error})") from None
    except Exception as error:  # safetensors raises its own types for corrupt data
        raise PatternError(f"not a taskmoe pattern bundle ({error})") from None
    return TaskPattern.from_parts(document, tensors)
