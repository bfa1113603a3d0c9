"""Batched decoding: concurrent requests of one variant share forward passes and get what they would get
alone (greedy), each with its own stop rules, choices and cancellation."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from demo.evaluate import EVAL_SEED, chat_prompt_ids
from demo.tasks import get_task
from server.batching import BatchedDecoder, batchable
from server.engine import Generation, SamplingParams
from server.model.variant import VariantBuilder
from server.patterns import load_tokenizer

from conftest import DEMO_MOE


@pytest.fixture(scope="module")
def demo():
    return VariantBuilder(DEMO_MOE).build(None), load_tokenizer(DEMO_MOE)


def prompts() -> list[str]:
    return [
        e.prompt
        for task in ("reverse", "arith", "spell", "sort", "translate")
        for e in get_task(task).examples(2, EVAL_SEED)
    ]


def make(demo, prompt: str, **params) -> Generation:
    model, tokenizer = demo
    params = {"max_tokens": 24, "temperature": 0, **params}
    return Generation(model, tokenizer, chat_prompt_ids(tokenizer, prompt), SamplingParams(**params), [2])


def run_concurrently(decoder: BatchedDecoder, generations: list[Generation], stagger: float = 0.0) -> list[list]:
    """Each generation on its own thread (joining the batch `stagger` seconds apart); their streamed deltas."""
    streamed: list[list] = [[] for _ in generations]
    threads = [
        threading.Thread(target=decoder.run, args=(generation, streamed[i].append))
        for i, generation in enumerate(generations)
    ]
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(60)
    return streamed


def count_batched_forwards(model) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return sizes, handle


def test_demo_model_is_batchable(demo) -> None:
    assert batchable(demo[0])


@pytest.mark.parametrize("stagger", [0.0, 0.01], ids=["together", "joining-mid-flight"])
def test_concurrent_greedy_requests_get_their_single_answers(demo, stagger: float) -> None:
    alone = [make(demo, prompt).run() for prompt in prompts()]
    batched = [make(demo, prompt) for prompt in prompts()]
    sizes, handle = count_batched_forwards(demo[0])
    try:
        streamed = run_concurrently(BatchedDecoder(demo[0]), batched, stagger)
    finally:
        handle.remove()
    for single, together, deltas in zip(alone, batched, streamed, strict=True):
        assert together.choices[0].ids == single.choices[0].ids
        assert together.choices[0].finish_reason == single.choices[0].finish_reason
        assert "".join(d.text for d in deltas) == together.choices[0].text
    assert max(sizes) > 1, "no forward pass decoded more than one sequence"


def test_stop_strings_and_lengths_are_per_request(demo) -> None:
    spell = "Put a dash between each letter of 'mehabi'."
    generations = [make(demo, spell, stop=("-h",)), make(demo, spell, max_tokens=3), make(demo, spell)]
    run_concurrently(BatchedDecoder(demo[0]), generations)
    assert [g.choices[0].text for g in generations] == ["m-e", "m-e", "m-e-h-a-b-i"]
    assert [g.choices[0].finish_reason for g in generations] == ["stop", "length", "stop"]


def test_several_choices_and_a_seed(demo) -> None:
    def sampled() -> list[list[int]]:
        generation = make(demo, prompts()[0], temperature=1.2, seed=11, n=3, max_tokens=12, ignore_eos=True)
        BatchedDecoder(demo[0]).run(generation)
        return [choice.ids for choice in generation.choices]

    first = sampled()
    assert first == sampled() and len(first) == 3 and all(len(ids) == 12 for ids in first)
    assert len({tuple(ids) for ids in first}) > 1


def test_a_cancelled_request_leaves_and_the_others_finish(demo) -> None:
    decoder = BatchedDecoder(demo[0])
    long = make(demo, prompts()[0], max_tokens=200, ignore_eos=True)
    short = make(demo, prompts()[1])
    reference = make(demo, prompts()[1]).run()

    def cancel_after_five(delta) -> None:
        if len(long.choices[0].ids) >= 5:
            long.cancel.set()

    threads = [
        threading.Thread(target=decoder.run, args=(long, cancel_after_five)),
        threading.Thread(target=decoder.run, args=(short,)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert long.cancelled and len(long.choices[0].ids) < 10
    assert short.choices[0].ids == reference.choices[0].ids


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(demo) -> None:
    """With `max_prefill_tokens`, a long prompt is prefilled a chunk at a time while the batch keeps
    decoding: every answer is still what the request gets alone, and the forward passes show chunks of
    the long prompt interleaved with one-token decode steps of the others."""
    model, _ = demo
    texts = prompts()
    alone = [make(demo, text, n=2 if i == 1 else 1).run() for i, text in enumerate(texts)]
    decoder = BatchedDecoder(model, max_batch=16, max_prefill_tokens=5)
    together = [make(demo, text, n=2 if i == 1 else 1) for i, text in enumerate(texts)]
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        run_concurrently(decoder, together, stagger=0.01)
    finally:
        handle.remove()
    for got, expected in zip(together, alone, strict=True):
        assert [c.ids for c in got.choices] == [c.ids for c in expected.choices]
    assert max(width for _, width in shapes) <= 5, "no pass prefills more than a chunk"
    chunk_passes = [i for i, (rows, width) in enumerate(shapes) if rows == 1 and width > 1]
    decode_passes = [i for i, (rows, width) in enumerate(shapes) if width == 1]
    assert chunk_passes and decode_passes
    assert any(a < d < b for a, b in itertools.pairwise(chunk_passes) for d in decode_passes), "interleaved"


def test_a_cancelled_request_leaves_the_prefill_queue(demo) -> None:
    model, _ = demo
    decoder = BatchedDecoder(model, max_batch=4, max_prefill_tokens=3)
    cancel = threading.Event()
    cancel.set()
    generation = make(demo, prompts()[0])
    generation.cancel = cancel
    decoder.run(generation)
    assert generation.cancelled and generation.completion_tokens == 0
