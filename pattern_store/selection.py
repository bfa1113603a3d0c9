"""What a variant keeps: routed experts per MoE layer, or MLP channels per dense layer.

A selection is the part of a task pattern that the variant builder needs. It lives here, beside the
pattern, because both the store (which writes it) and the server (which builds from it) use it, and
`pattern_store` must not import `server`. On disk it is a small JSON document:

    {"kind": "moe_experts", "layers": {"0": [3, 7, 1], "1": [0, 2]}}
    {"kind": "dense_channels", "layers": {"1": [0, 5, 9]}, "bias": {"1": [0.1, ...]}}

Kept indices are stored sorted and without duplicates, so that the variant's expert (or channel) order
is the checkpoint's order and two selections that keep the same things compare equal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SelectionKind = Literal["moe_experts", "dense_channels"]
KINDS: tuple[str, ...] = ("moe_experts", "dense_channels")


class SelectionError(ValueError):
    """A selection document that cannot be used; the message says what is wrong with it."""


def _indices(layer: int, values: Any) -> tuple[int, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str | bytes):
        raise SelectionError(f"layer {layer}: kept indices must be a list of integers, got {type(values).__name__}")
    out: set[int] = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SelectionError(f"layer {layer}: kept index {value!r} is not a non-negative integer")
        out.add(value)
    if not out:
        raise SelectionError(f"layer {layer}: a layer must keep at least one index")
    return tuple(sorted(out))


def _layer_number(key: Any) -> int:
    try:
        layer = int(key)
    except (TypeError, ValueError):
        raise SelectionError(f"layer key {key!r} is not an integer") from None
    if layer < 0:
        raise SelectionError(f"layer key {key!r} is negative")
    return layer


@dataclass(frozen=True)
class Selection:
    """Kept indices per layer; layers not named keep everything.

    `bias` (dense only) holds, per layer, the SEAP compensation added to `down_proj`'s output: the
    mean contribution of the removed channels, `W_down[:, pruned] @ mean(a_pruned)`.
    """

    kind: SelectionKind
    layers: Mapping[int, tuple[int, ...]]
    bias: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    #: MoE: per pruned layer, what stands in for each pruned expert the full router still chooses: its novice,
    #: a row of `novices[layer]` ([pruned experts, hidden], rows in ascending expert id), weighted by its gate.
    #: The tensors live in the pattern's tensor file, not in this document
    novices: Mapping[int, Any] = field(default_factory=dict, compare=False, repr=False)
    #: per layer with novices, when they are low-rank: the pruned experts' `substitutes.LowRankMaps` (same rows)
    low_rank: Mapping[int, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def substitute(self) -> str:
        """What a pruned expert's choice gets: "novice", "low-rank" (a novice and a low-rank map of the token),
        or "none" (the router cannot choose it)."""
        return "low-rank" if self.low_rank else "novice" if self.novices else "none"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SelectionError(f"unknown selection kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        layers = {}
        for key, values in self.layers.items():
            layer = _layer_number(key)
            layers[layer] = _indices(layer, values)
        bias = {}
        for key, values in self.bias.items():
            layer = _layer_number(key)
            try:
                bias[layer] = tuple(float(x) for x in values)
            except (TypeError, ValueError):
                raise SelectionError(f"layer {layer}: bias must be a list of numbers") from None
        if bias and self.kind != "dense_channels":
            raise SelectionError("only dense_channels selections carry a bias compensation")
        if self.novices and self.kind != "moe_experts":
            raise SelectionError("only moe_experts selections carry novices")
        novices = {_layer_number(key): value for key, value in self.novices.items()}
        if novices and set(novices) != set(layers):
            raise SelectionError(
                f"novices must stand in for every pruned layer: layers {sorted(layers)} are pruned, novices "
                f"given for {sorted(novices)}"
            )
        for layer, value in novices.items():
            shape = tuple(getattr(value, "shape", ()))
            if len(shape) != 2:
                raise SelectionError(f"layer {layer}: novices must be a 2-D tensor [pruned experts, hidden]")
        low_rank = {_layer_number(key): value for key, value in self.low_rank.items()}
        if low_rank and set(low_rank) != set(novices):
            raise SelectionError("low-rank maps go with the novices of the same layers")
        for layer, maps in low_rank.items():
            if tuple(maps.means.shape) != tuple(novices[layer].shape) or maps.inputs.shape[:2] != maps.means.shape:
                raise SelectionError(f"layer {layer}: low-rank maps do not match its novices' rows and hidden size")
        object.__setattr__(self, "layers", dict(sorted(layers.items())))
        object.__setattr__(self, "bias", dict(sorted(bias.items())))
        object.__setattr__(self, "novices", dict(sorted(novices.items())))
        object.__setattr__(self, "low_rank", dict(sorted(low_rank.items())))

    def kept(self, layer: int) -> tuple[int, ...] | None:
        """Kept indices of `layer`, or None when the layer keeps everything."""
        return self.layers.get(layer)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "kind": self.kind,
            "layers": {str(k): list(v) for k, v in self.layers.items()},
        }
        if self.bias:
            document["bias"] = {str(k): list(v) for k, v in self.bias.items()}
        if self.novices:
            document["substitute"] = self.substitute
        return document

    @classmethod
    def from_json(
        cls,
        document: Any,
        novices: Mapping[int, Any] | None = None,
        schema_only: bool = False,
        low_rank: Mapping[int, Any] | None = None,
    ) -> Selection:
        """The selection of a JSON document; one whose pruned experts have novices needs them (`novices`, and
        `low_rank` for low-rank ones: from the pattern's tensor file), unless only the document's schema is
        checked (`schema_only`: the result then lacks them)."""
        if not isinstance(document, Mapping):
            raise SelectionError("a selection is a JSON object with 'kind' and 'layers'")
        missing = {"kind", "layers"} - set(document)
        if missing:
            raise SelectionError(f"selection lacks {', '.join(sorted(missing))}")
        if not isinstance(document["layers"], Mapping):
            raise SelectionError("'layers' must map layer numbers to lists of kept indices")
        bias = document.get("bias") or {}
        if not isinstance(bias, Mapping):
            raise SelectionError("'bias' must map layer numbers to lists of floats")
        substitute = document.get("substitute", "none")
        if substitute not in ("none", "novice", "low-rank"):
            raise SelectionError(
                f"unknown substitute {substitute!r} for pruned experts; expected none, novice or low-rank"
            )
        missing = not novices or (substitute == "low-rank" and not low_rank)
        if substitute != "none" and missing and not schema_only:
            raise SelectionError(
                "the selection's pruned experts have novices, which live in its pattern's tensor file, not in this "
                "document: use the stored pattern"
            )
        novices = (novices or {}) if substitute != "none" and not missing else {}
        low_rank = (low_rank or {}) if substitute == "low-rank" and novices else {}
        return cls(
            kind=document["kind"], layers=dict(document["layers"]), bias=dict(bias), novices=novices, low_rank=low_rank
        )

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read a selection file; every problem is a `SelectionError` that names the file."""
        try:
            document = json.loads(Path(path).read_text())
        except OSError as error:
            raise SelectionError(f"{path}: cannot read selection file ({error.strerror})") from None
        except json.JSONDecodeError as error:
            raise SelectionError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
        try:
            return cls.from_json(document)
        except SelectionError as error:
            raise SelectionError(f"{path}: {error}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def union(selections: Sequence[Selection]) -> Selection:
    """What a union of patterns keeps: per layer, every index any of them keeps (a layer one of them leaves
    whole stays whole). A dense union carries no bias compensation: each pattern's bias stands for the
    channels *it* removed, and the union keeps some of those, so neither bias is right for it; for the same
    reason a MoE union carries no novices."""
    if not selections:
        raise SelectionError("a union needs at least one selection")
    kinds = {selection.kind for selection in selections}
    if len(kinds) > 1:
        raise SelectionError(f"cannot unite selections of different kinds ({', '.join(sorted(kinds))})")
    if len(selections) == 1:
        return selections[0]
    pruned = set.intersection(*(set(selection.layers) for selection in selections))
    layers = {
        layer: tuple(sorted(set().union(*(selection.layers[layer] for selection in selections)))) for layer in pruned
    }
    return Selection(kind=selections[0].kind, layers=layers)
