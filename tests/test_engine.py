"""The decoding engine against transformers' own `generate`, and its stop, stream, seed and cancel rules."""

from __future__ import annotations

import threading

import pytest
import torch

from demo.evaluate import EVAL_SEED, chat_prompt_ids
from demo.tasks import get_task
from server.engine import Generation, SamplingParams, _held_back
from server.model.variant import VariantBuilder
from server.patterns import load_tokenizer

from conftest import DEMO_MOE


@pytest.fixture(scope="module")
def demo():
    return VariantBuilder(DEMO_MOE).build(None), load_tokenizer(DEMO_MOE)


def prompts(count: int = 2) -> list[str]:
    return [e.prompt for task in ("reverse", "arith", "spell") for e in get_task(task).examples(count, EVAL_SEED)]


def test_greedy_decoding_equals_transformers_generate(demo) -> None:
    model, tokenizer = demo
    for prompt in prompts():
        ids = chat_prompt_ids(tokenizer, prompt)
        ours = Generation(model, tokenizer, ids, SamplingParams(max_tokens=24, temperature=0), [tokenizer.eos_token_id])
        ours.run()
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0
        )[0, len(ids) :].tolist()
        reference = out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        assert ours.choices[0].ids == reference
        assert ours.choices[0].finish_reason == ("stop" if tokenizer.eos_token_id in out else "length")


def test_streamed_deltas_add_up_to_the_final_text(demo) -> None:
    model, tokenizer = demo
    ids = chat_prompt_ids(tokenizer, prompts()[0])
    generation = Generation(model, tokenizer, ids, SamplingParams(max_tokens=30, temperature=0.9, seed=5, n=3), [2])
    streamed = ["", "", ""]
    finishes = {}
    for delta in generation:
        assert delta.index not in finishes, "a delta after the choice finished"
        streamed[delta.index] += delta.text
        if delta.finish_reason:
            finishes[delta.index] = delta.finish_reason
    assert streamed == [choice.text for choice in generation.choices]
    assert set(finishes) == {0, 1, 2}


def test_stop_strings_cut_the_text_and_are_never_streamed(demo) -> None:
    model, tokenizer = demo
    ids = chat_prompt_ids(tokenizer, "Put a dash between each letter of 'mehabi'.")
    full = Generation(model, tokenizer, ids, SamplingParams(max_tokens=30, temperature=0), [2]).run().choices[0].text
    assert full == "m-e-h-a-b-i"
    for stop, expected in (("-h", "m-e"), ("b-i", "m-e-h-a-"), ("zz", full)):
        generation = Generation(model, tokenizer, ids, SamplingParams(max_tokens=30, temperature=0, stop=(stop,)), [2])
        streamed = "".join(delta.text for delta in generation)
        assert generation.choices[0].text == streamed == expected
        assert generation.choices[0].finish_reason == "stop"


def test_held_back_tail_is_the_longest_stop_prefix() -> None:
    assert _held_back("abc-h", ("-he",)) == 2
    assert _held_back("abc", ("xyz",)) == 0
    assert _held_back("abc", ()) == 0


def test_seed_reproduces_and_differs(demo) -> None:
    model, tokenizer = demo
    ids = chat_prompt_ids(tokenizer, prompts()[0])

    def sample(seed: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=20, temperature=1.5, seed=seed, n=2, ignore_eos=True)
        return [choice.ids for choice in Generation(model, tokenizer, ids, params).run().choices]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_tiny_top_p_is_greedy(demo) -> None:
    model, tokenizer = demo
    ids = chat_prompt_ids(tokenizer, prompts()[2])
    greedy = Generation(model, tokenizer, ids, SamplingParams(max_tokens=20, temperature=0), [2]).run()
    nucleus = Generation(model, tokenizer, ids, SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6, seed=3), [2])
    assert nucleus.run().choices[0].ids == greedy.choices[0].ids


def test_max_tokens_and_ignore_eos(demo) -> None:
    model, tokenizer = demo
    ids = chat_prompt_ids(tokenizer, prompts()[0])
    generation = Generation(model, tokenizer, ids, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), [2])
    assert generation.run().completion_tokens == 7 and generation.choices[0].finish_reason == "length"


def test_cancel_stops_within_a_token(demo) -> None:
    model, tokenizer = demo
    cancel = threading.Event()
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    generation = Generation(model, tokenizer, chat_prompt_ids(tokenizer, prompts()[0]), params, cancel=cancel)
    for count, _ in enumerate(generation, start=1):
        if count == 3:
            cancel.set()
    assert generation.cancelled and generation.completion_tokens == 3


def _byte_level_tokenizer():
    """A byte-level BPE tokenizer (as GPT-2, Llama 3, Qwen use): tokens that split a UTF-8 character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    merges = []
    for first, second in [("Ġ", "t"), ("h", "e"), ("Ã", "©")]:
        vocab[first + second] = len(vocab)
        merges.append((first, second))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize("kind", ["demo", "wordpiece", "byte-level"])
def test_incremental_detokenization_equals_decoding_the_whole_sequence(demo, kind) -> None:
    """The decoder appends each token's text from a short window instead of re-decoding everything (that
    was quadratic in the length); the text must come out exactly as a whole decode, multi-byte characters
    and word-piece joins included, and streamed deltas must add up to it."""
    import random

    from transformers import AutoTokenizer

    from pattern_store.embedder import default_model_path

    tokenizer = {
        "demo": lambda: demo[1],
        "wordpiece": lambda: AutoTokenizer.from_pretrained(default_model_path()),
        "byte-level": _byte_level_tokenizer,
    }[kind]()
    text = "Sort these: 3, 1, 2. The café's naïve résumé — 東京 ☃ done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chooser = random.Random(7)
    for sample in range(6):
        sequence = ids if sample == 0 else [chooser.choice(ids) for _ in range(40)]
        generation = Generation(None, tokenizer, [1], SamplingParams(max_tokens=len(sequence)))
        streamed = "".join(
            delta.text for step, token in enumerate(sequence) for delta in generation.accept([token], step)
        )
        expected = tokenizer.decode(sequence, skip_special_tokens=True)
        assert generation.choices[0].text == expected
        assert streamed == expected
