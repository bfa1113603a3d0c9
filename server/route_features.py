"""What the router sees of a query: its topic (the sentence embedding) and its form (character n-grams).

An embedding says what a text is about; two tasks on the same topics (a BoolQ passage and a WikiText
paragraph are both Wikipedia) look alike to it, although their requests differ in form ("Answer yes or
no." against "Continue the text:"). Hashed character n-grams see that form, in two blocks:

- content: 2-4-grams of the text's first and last `content_chars` characters (phrasing, markup, numbers);
- form: 2-4-grams of its first and last `edge_chars` characters only, where templates put their
  instructions and answer cues. It is also what out-of-store detection compares (`server.routing`).

Digits are folded to 0 (a number's form matters, not its value). Each block is L2-normalised and scaled
by the square root of its weight, so that with weights summing to 1 the whole vector has unit length
and an inner product is a weighted sum of the blocks' cosine similarities.
`scripts/eval_routing.py` measures the blocks' worth on real benchmark prompts (docs/benchmarks-routing.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.feature_extraction.text import HashingVectorizer

_DIGIT = re.compile(r"[0-9]")


@dataclass(frozen=True)
class FeatureWeights:
    """How much each block counts (they sum to 1) and how much text the n-gram blocks read."""

    topic: float = 0.4
    content: float = 0.3
    form: float = 0.3
    content_chars: int = 400
    edge_chars: int = 48
    content_buckets: int = 2**13
    form_buckets: int = 2**12

    def __post_init__(self) -> None:
        weights = (self.topic, self.content, self.form)
        if min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"feature weights must be >= 0 and sum to 1, got {weights}")

    @property
    def ngram_buckets(self) -> int:
        """The width of the n-gram blocks (content, then form) of a feature vector."""
        return self.content_buckets + self.form_buckets


def _ends(text: str, chars: int) -> str:
    """The first and last `chars` characters (the whole text when it is short), digits folded to 0."""
    text = _DIGIT.sub("0", text)
    return text if len(text) <= 2 * chars else f"{text[:chars]}\x00{text[-chars:]}"


class RouteFeatures:
    """Texts and their embeddings -> one feature vector each ([n, embedding + content + form buckets])."""

    def __init__(self, weights: FeatureWeights | None = None) -> None:
        self.weights = weights or FeatureWeights()
        w = self.weights
        self._content = self._vectorizer(w.content_buckets, lambda text: _ends(text, w.content_chars))
        self._form = self._vectorizer(w.form_buckets, lambda text: _ends(text, w.edge_chars))

    @staticmethod
    def _vectorizer(buckets: int, preprocessor) -> HashingVectorizer:
        return HashingVectorizer(
            analyzer="char",
            ngram_range=(2, 4),
            n_features=buckets,
            alternate_sign=False,
            norm="l2",
            lowercase=False,
            preprocessor=preprocessor,
            dtype=np.float32,
        )

    @property
    def ngram_weight(self) -> float:
        """The share of the n-gram blocks in a feature vector (0: topic only, no n-gram stage)."""
        return self.weights.content + self.weights.form

    def ngrams(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, content + form buckets]: the n-gram blocks of the texts' feature vectors, as `transform` weighs
        them: what routing reads of a text before (and whether) it is embedded."""
        w = self.weights
        if not texts:
            return torch.zeros(0, w.ngram_buckets)
        content = torch.from_numpy(self._content.transform(texts).toarray())
        form = torch.from_numpy(self._form.transform(texts).toarray())
        return torch.cat([content * w.content**0.5, form * w.form**0.5], dim=1)

    def transform(
        self, texts: Sequence[str], embeddings: torch.Tensor | np.ndarray, ngrams: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`ngrams`: the texts' `ngrams`, when already known."""
        embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32)).reshape(len(texts), -1)
        if not texts:
            return torch.zeros(0, embeddings.shape[1] + self.weights.ngram_buckets)
        ngrams = self.ngrams(texts) if ngrams is None else ngrams
        topic = torch.nn.functional.normalize(embeddings, dim=1)
        return torch.cat([topic * self.weights.topic**0.5, ngrams], dim=1)

    def form_block(self, features: torch.Tensor) -> torch.Tensor:
        """The form n-grams of feature (or `ngrams`) rows, unit length (zero rows stay zero)."""
        return torch.nn.functional.normalize(features[:, -self.weights.form_buckets :], dim=1)
