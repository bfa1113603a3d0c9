"""The demo task generators are deterministic and their scorers are right, checked independently."""

from __future__ import annotations

import itertools
import re

import pytest

from demo.tasks import TASK_NAMES, TASKS, ZORBISH, Example, generate, get_task


def test_at_least_six_distinct_tasks() -> None:
    assert len(TASKS) >= 6
    assert len(set(TASK_NAMES)) == len(TASK_NAMES)


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_generator_is_deterministic_for_a_seed(task) -> None:
    assert task.examples(50, seed=7) == task.examples(50, seed=7)
    assert task.examples(50, seed=7) != task.examples(50, seed=8)


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_examples_vary(task) -> None:
    prompts = {e.prompt for e in task.examples(200, seed=0)}
    assert len(prompts) > 100, "a task's generator should not repeat itself"


def _independent_answer(example: Example) -> str:
    """Recompute the answer from the prompt text alone, without the generator's code path."""
    p = example.prompt
    if example.task == "arith":
        numbers = [int(n) for n in re.findall(r"\d+", p)]
        if "+" in p or "plus" in p or p.startswith(("Add", "Sum")) or " add " in p:
            return str(numbers[0] + numbers[1])
        if p.startswith(("Subtract", "Take")) or " take " in p:
            return str(numbers[1] - numbers[0])
        return str(numbers[0] - numbers[1])
    quoted = re.findall(r"'([^']*)'", p)
    if example.task == "reverse":
        return "".join(reversed(quoted[0]))
    if example.task == "sort":
        return ", ".join(str(n) for n in sorted(int(n) for n in re.findall(r"\d", p.split(":")[1])))
    if example.task == "upper":
        return p.split(": ", 1)[1].upper()
    if example.task == "spell":
        return "-".join(quoted[0])
    if example.task == "translate":
        return " ".join(ZORBISH[w] for w in quoted[0].split())
    raise AssertionError(f"no independent check for {example.task}")


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_answers_are_right(task) -> None:
    for example in task.examples(300, seed=1):
        assert example.answer == _independent_answer(example), example


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_scorer_accepts_right_and_rejects_wrong(task) -> None:
    examples = task.examples(40, seed=2)
    for example, other in itertools.pairwise(examples):
        assert task.score(example, example.answer)
        assert task.score(example, f"  {example.answer}\n"), "surrounding whitespace is not an error"
        assert not task.score(example, example.answer + "x")
        assert not task.score(example, "")
        if other.answer != example.answer:
            assert not task.score(example, other.answer)


def test_arith_covers_sums_and_differences() -> None:
    answers = {int(e.answer) for e in get_task("arith").examples(400, seed=3)}
    assert 0 in answers and 18 in answers and len(answers) == 19


def test_arith_answers_never_negative() -> None:
    assert all(int(e.answer) >= 0 for e in get_task("arith").examples(400, seed=5))


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="arith"):
        get_task("poetry")


def test_generate_yields_every_task() -> None:
    examples = list(generate(3, seed=0))
    assert [e.task for e in examples] == [name for name in TASK_NAMES for _ in range(3)]


def test_tasks_are_lexically_distinct() -> None:
    """No prompt of one task appears as a prompt of another: a router has something to tell apart."""
    by_task = {name: {e.prompt for e in get_task(name).examples(200, seed=4)} for name in TASK_NAMES}
    for a in TASK_NAMES:
        for b in TASK_NAMES:
            if a != b:
                assert not by_task[a] & by_task[b]
