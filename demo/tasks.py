"""The synthetic demo tasks the demo models are trained and judged on.

Each task is a seeded generator of natural-language requests with one exact answer, plus a scorer.
The tasks are deliberately distinct (numbers, spelling, lists, case, dashes, a made-up language)
so that both the router and the experts of the demo MoE can tell them apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

CHOICE_SEED = 8_100
"""The choice split: prompts on which the project decides its defaults and rules (recipes, substitutes, the keep
search), never the calibration's (`demo.calibration.CALIBRATION_SEED`) nor the reported evaluation's
(`demo.evaluate.EVAL_SEED`)."""

__all__ = [
    "TASKS",
    "TASK_NAMES",
    "DemoTask",
    "Example",
    "generate",
    "get_task",
    "normalise_answer",
]

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"

#: English words and their made-up "Zorbish" translations (the translate task's lexicon).
ZORBISH: dict[str, str] = {
    "red": "vel",
    "blue": "oska",
    "green": "tum",
    "big": "raka",
    "small": "pim",
    "cat": "mip",
    "dog": "gorn",
    "bird": "sweli",
    "fish": "blo",
    "tree": "durak",
    "house": "kemo",
    "water": "lusa",
    "fire": "brak",
    "sun": "zila",
    "moon": "nuri",
    "happy": "jolo",
    "sad": "vemm",
    "old": "trek",
    "new": "fani",
    "fast": "zipo",
    "slow": "mulo",
    "eats": "nom",
    "sees": "vik",
    "likes": "hapa",
    "the": "da",
    "a": "o",
    "runs": "krit",
    "sleeps": "dozu",
    "and": "ke",
    "stone": "garu",
}
_ADJECTIVES = ["red", "blue", "green", "big", "small", "happy", "sad", "old", "new", "fast", "slow"]
_NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "water", "fire", "sun", "moon", "stone"]
_VERBS = ["eats", "sees", "likes", "runs", "sleeps"]

_PHRASE_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "good",
    "morning",
    "open",
    "door",
    "please",
    "send",
    "report",
    "today",
    "green",
    "tea",
    "data",
    "server",
    "model",
    "river",
    "stone",
    "light",
    "night",
    "happy",
    "birthday",
    "city",
    "map",
]


@dataclass(frozen=True)
class Example:
    """One request of a task and its exact expected answer."""

    task: str
    prompt: str
    answer: str


def normalise_answer(text: str) -> str:
    """Collapse whitespace and strip, so that "85 " and "85" score the same."""
    return " ".join(text.split())


@dataclass(frozen=True)
class DemoTask:
    """A task: a name, a one-line description, and a generator of examples from a `random.Random`."""

    name: str
    description: str
    make: Callable[[random.Random], Example]

    def examples(self, n: int, seed: int) -> list[Example]:
        """`n` examples, the same ones for the same seed."""
        rng = random.Random(f"{self.name}:{seed}")
        return [self.make(rng) for _ in range(n)]

    def score(self, example: Example, output: str) -> bool:
        """Exact match after whitespace normalisation."""
        return normalise_answer(output) == normalise_answer(example.answer)


def _pseudo_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up word such as 'kelbo' or 'tanumi'."""
    parts = []
    for _ in range(rng.randint(*syllables)):
        parts.append(rng.choice(_CONSONANTS) + rng.choice(_VOWELS))
    word = "".join(parts)
    if rng.random() < 0.4:
        word += rng.choice(_CONSONANTS)
    return word


def _make_arith(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        template = rng.choice(
            [
                "What is {a} + {b}?",
                "Compute {a} + {b}.",
                "What's {a} plus {b}?",
                "Add {a} and {b}.",
                "How much is {a} plus {b}?",
                "Calculate {a} + {b}.",
                "What do you get when you add {a} and {b}?",
                "Sum {a} and {b}.",
            ]
        )
        return Example("arith", template.format(a=a, b=b), str(a + b))
    a, b = max(a, b), min(a, b)
    template = rng.choice(
        [
            "What is {a} - {b}?",
            "Compute {a} - {b}.",
            "What's {a} minus {b}?",
            "Subtract {b} from {a}.",
            "How much is {a} minus {b}?",
            "Calculate {a} - {b}.",
            "What do you get when you take {b} from {a}?",
            "Take {b} away from {a}.",
        ]
    )
    return Example("arith", template.format(a=a, b=b), str(a - b))


def _make_reverse(rng: random.Random) -> Example:
    word = _pseudo_word(rng)
    template = rng.choice(
        ["Reverse the word '{w}'.", "Spell '{w}' backwards.", "Write '{w}' in reverse.", "What is '{w}' reversed?"]
    )
    return Example("reverse", template.format(w=word), word[::-1])


def _make_sort(rng: random.Random) -> Example:
    numbers = rng.sample(range(10), rng.randint(3, 6))
    listed = ", ".join(str(n) for n in numbers)
    template = rng.choice(
        [
            "Sort these numbers in ascending order: {l}",
            "Put these numbers from smallest to largest: {l}",
            "Please sort: {l}",
            "Order these from low to high: {l}",
        ]
    )
    return Example("sort", template.format(l=listed), ", ".join(str(n) for n in sorted(numbers)))


def _make_upper(rng: random.Random) -> Example:
    phrase = " ".join(rng.choice(_PHRASE_WORDS) for _ in range(rng.randint(2, 4)))
    template = rng.choice(
        [
            "Convert to upper case: {p}",
            "Make this uppercase: {p}",
            "Write this in capital letters: {p}",
            "Shout this: {p}",
        ]
    )
    return Example("upper", template.format(p=phrase), phrase.upper())


def _make_spell(rng: random.Random) -> Example:
    word = _pseudo_word(rng, (2, 4))
    template = rng.choice(
        [
            "Write '{w}' with dashes between the letters.",
            "Put a dash between each letter of '{w}'.",
            "Split '{w}' into letters joined by dashes.",
            "Hyphenate every letter of '{w}'.",
        ]
    )
    return Example("spell", template.format(w=word), "-".join(word))


def _make_translate(rng: random.Random) -> Example:
    shape = rng.randint(0, 3)
    if shape == 0:
        words = [rng.choice(_NOUNS)]
    elif shape == 1:
        words = [rng.choice(_ADJECTIVES), rng.choice(_NOUNS)]
    elif shape == 2:
        words = ["the", rng.choice(_NOUNS), rng.choice(_VERBS)]
    else:
        words = ["a", rng.choice(_ADJECTIVES), rng.choice(_NOUNS)]
    english = " ".join(words)
    template = rng.choice(
        [
            "Translate '{e}' into Zorbish.",
            "How do you say '{e}' in Zorbish?",
            "What is '{e}' in Zorbish?",
            "Zorbish for '{e}', please.",
        ]
    )
    return Example("translate", template.format(e=english), " ".join(ZORBISH[w] for w in words))


TASKS: tuple[DemoTask, ...] = (
    DemoTask("arith", "add or subtract two one-digit numbers", _make_arith),
    DemoTask("reverse", "spell a made-up word backwards", _make_reverse),
    DemoTask("sort", "sort three to six distinct digits", _make_sort),
    DemoTask("upper", "upper-case a short phrase", _make_upper),
    DemoTask("spell", "write a made-up word with dashes between its letters", _make_spell),
    DemoTask("translate", "translate a short phrase into the made-up Zorbish language", _make_translate),
)
TASK_NAMES: tuple[str, ...] = tuple(task.name for task in TASKS)


def get_task(name: str) -> DemoTask:
    """The task called `name`; a clear error lists the known ones."""
    for task in TASKS:
        if task.name == name:
            return task
    raise KeyError(f"unknown demo task {name!r}; known tasks: {', '.join(TASK_NAMES)}")


def generate(n_per_task: int, seed: int, tasks: tuple[str, ...] = TASK_NAMES) -> Iterator[Example]:
    """`n_per_task` examples of each named task, task by task."""
    for name in tasks:
        yield from get_task(name).examples(n_per_task, seed)
