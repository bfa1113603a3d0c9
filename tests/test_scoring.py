"""Expert scores (TCESS, REAP, EAN, EASY-EP), keep rules and SEAP on small hand-made tensors: every number
here is worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pattern_store.expert_scores import ExpertStatistics, keep_top, layer_budget, output_sums
from pattern_store.seap import (
    ChannelStatistics,
    bias_compensation,
    channel_scores,
    logistic_schedule,
    prune_layer,
    standardise,
)
from pattern_store.tcess import frequency_sums, logit_sums, tcess_sums

# Three tokens, four experts, top-2 routing.
GATES = torch.tensor(
    [
        [0.5, 0.3, 0.1, 0.1],  # selects 0 and 1: relative weights 0.625, 0.375
        [0.1, 0.2, 0.6, 0.1],  # selects 2 and 1: 0.75, 0.25
        [0.4, 0.1, 0.1, 0.4],  # selects 0 and 3: 0.5, 0.5
    ]
)
TOP = torch.tensor([[0, 1], [2, 1], [0, 3]])


def test_tcess_without_threshold_sums_selected_gates() -> None:
    assert torch.allclose(tcess_sums(GATES, TOP), torch.tensor([0.9, 0.5, 0.6, 0.4]))


def test_tcess_threshold_drops_low_confidence_selections() -> None:
    # r = 0.4 drops expert 1 of token 0 (0.375) and of token 1 (0.25); 0.5 passes.
    assert torch.allclose(tcess_sums(GATES, TOP, threshold=0.4), torch.tensor([0.9, 0.0, 0.6, 0.4]))
    # r = 0.6 keeps only 0 in token 0 (0.625) and 2 in token 1 (0.75).
    assert torch.allclose(tcess_sums(GATES, TOP, threshold=0.6), torch.tensor([0.5, 0.0, 0.6, 0.0]))


def test_frequency_and_logit_scores() -> None:
    assert torch.equal(frequency_sums(TOP, 4), torch.tensor([2.0, 2.0, 1.0, 1.0]))
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.5, 3.0, 0.0], [1.0, 0.0, 0.0, 1.5]])
    assert torch.allclose(logit_sums(logits), torch.tensor([2.0, 0.0, 3.0, 1.5]))


def test_router_statistics_average_over_batches_and_merge() -> None:
    stats = ExpertStatistics(4)
    stats.update(torch.log(GATES[:2]), GATES[:2], TOP[:2])
    stats.update(torch.log(GATES[2:]), GATES[2:], TOP[2:])
    assert stats.tokens == 3
    assert torch.allclose(stats.scores("tcess"), torch.tensor([0.9, 0.5, 0.6, 0.4]) / 3)
    assert torch.allclose(stats.scores("frequency"), torch.tensor([2.0, 2.0, 1.0, 1.0]) / 3)
    pooled = stats.merge(stats)
    assert pooled.tokens == 6 and torch.allclose(pooled.scores("tcess"), stats.scores("tcess"))
    assert torch.equal(stats.scores("random", seed=1), stats.scores("random", seed=1))
    assert not torch.equal(stats.scores("random", seed=1), stats.scores("random", seed=2))
    with pytest.raises(ValueError, match="unknown scoring method"):
        stats.scores("magic")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ExpertStatistics(4, threshold=1.5)


def test_keep_top_is_sorted_and_breaks_ties_by_id() -> None:
    assert keep_top(torch.tensor([0.9, 0.5, 0.6, 0.4]), 2) == [0, 2]
    assert keep_top(torch.tensor([0.1, 0.3, 0.3, 0.3]), 2) == [1, 2]
    with pytest.raises(ValueError):
        keep_top(torch.tensor([1.0, 2.0]), 3)


# The same three tokens as routed: gate weights of the two selected experts, and those experts' output norms.
WEIGHTS = torch.tensor([[0.625, 0.375], [0.75, 0.25], [0.5, 0.5]])
NORMS = torch.tensor([[1.0, 4.0], [2.0, 8.0], [3.0, 2.0]])
CHANGE = torch.tensor([0.5, -0.25, 0.1])  # 1 - cos(h_in, h_out); a negative change counts as 0


def test_output_sums_by_hand() -> None:
    reap, ean, easy_ep = output_sums(WEIGHTS, TOP, NORMS, CHANGE, 4)
    # expert 0: token 0 (0.625 * 1), token 2 (0.5 * 3); expert 1: token 0 (0.375 * 4), token 1 (0.25 * 8);
    # expert 2: token 1 (0.75 * 2); expert 3: token 2 (0.5 * 2)
    assert torch.allclose(reap, torch.tensor([2.125, 3.5, 1.5, 1.0]))
    assert torch.allclose(ean, torch.tensor([4.0, 12.0, 2.0, 2.0]))
    # times each token's change: token 0 x 0.5, token 1 x 0, token 2 x 0.1
    assert torch.allclose(easy_ep, torch.tensor([0.3125 + 0.15, 0.75, 0.0, 0.1]))


def test_output_aware_scores_reward_rare_experts_with_large_outputs() -> None:
    stats = ExpertStatistics(4)
    stats.update(torch.log(GATES), GATES, TOP)
    with pytest.raises(ValueError, match="needs expert outputs"):
        stats.scores("reap")
    stats.update_outputs(WEIGHTS, TOP, NORMS, CHANGE)
    # REAP is a mean over the tokens routed to each expert (counts 2, 2, 1, 1); EAN and EASY-EP per token (3)
    assert torch.allclose(stats.scores("reap"), torch.tensor([2.125 / 2, 3.5 / 2, 1.5, 1.0]))
    assert torch.allclose(stats.scores("ean"), torch.tensor([4.0, 12.0, 2.0, 2.0]) / 3)
    assert torch.allclose(stats.scores("easy-ep"), torch.tensor([0.4625, 0.75, 0.0, 0.1]) / 3)
    # expert 2 is chosen once, with a larger output than expert 0's: REAP keeps it, TCESS does not
    assert keep_top(stats.scores("reap"), 2) == [1, 2]
    assert keep_top(stats.scores("tcess"), 2) == [0, 2]
    merged = stats.merge(stats)
    assert merged.has_outputs and torch.allclose(merged.scores("reap"), stats.scores("reap"))
    assert not stats.merge(ExpertStatistics(4)).has_outputs


def test_group_balanced_keep() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.05, 0.01])  # two groups of four
    assert keep_top(scores, 4) == [0, 1, 2, 5]
    assert keep_top(scores, 4, groups=2) == [0, 1, 4, 5]  # two per group, whatever the global order
    with pytest.raises(ValueError, match="evenly"):
        keep_top(scores, 3, groups=2)


def test_layer_budget_follows_where_each_layer_puts_its_importance() -> None:
    concentrated = torch.tensor([0.97, 0.01, 0.01, 0.01])  # one expert does the work
    spread = torch.tensor([0.25, 0.25, 0.25, 0.25])
    counts = layer_budget({0: concentrated, 1: spread}, total=4, minimum=1)
    assert counts == {0: 1, 1: 3}  # shares: 0.97 first, then 0.25, 0.25 beat 0.01
    assert sum(layer_budget({0: spread, 1: spread, 2: concentrated}, total=6, minimum=1).values()) == 6
    assert layer_budget({0: spread, 1: spread}, total=4, minimum=1) == {0: 2, 1: 2}
    assert layer_budget({0: concentrated, 1: spread}, total=4, minimum=2, step=2) == {0: 2, 1: 2}
    assert layer_budget({0: concentrated, 1: spread}, total=6, minimum=2, step=2) == {0: 2, 1: 4}
    with pytest.raises(ValueError, match="cannot be spread"):
        layer_budget({0: spread, 1: spread}, total=9, minimum=1)
    with pytest.raises(ValueError, match="cannot be spread"):
        layer_budget({0: spread, 1: spread}, total=1, minimum=1)


def _channel_stats() -> ChannelStatistics:
    stats = ChannelStatistics(3)
    stats.update(torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]]))
    stats.update(torch.tensor([[2.0, 1.0, 2.0]]))
    return stats


def test_channel_statistics() -> None:
    stats = _channel_stats()
    assert stats.tokens == 3
    assert torch.allclose(stats.mean, torch.tensor([2.0, 1 / 3, 2.0]))
    assert torch.allclose(stats.variance, torch.tensor([2 / 3, 2 / 9, 0.0]))
    assert torch.allclose(stats.mean_square, torch.tensor([14 / 3, 1 / 3, 4.0]))


def test_wifv_and_wifn() -> None:
    down = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 0.0]])  # column norms^2: 2, 9, 4
    stats = _channel_stats()
    assert torch.allclose(channel_scores(stats, down, "wifv"), torch.tensor([4 / 3, 2.0, 0.0]))
    wifn = torch.tensor([math.sqrt(14 / 3) * math.sqrt(2), math.sqrt(1 / 3) * 3, 2.0 * 2.0])
    assert torch.allclose(channel_scores(stats, down, "wifn"), wifn)
    with pytest.raises(ValueError):
        channel_scores(stats, down, "flap")


def test_standardise_uses_median_and_iqr_and_clips() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])
    # median 3.5, quartiles 2.25 and 4.75: IQR 2.5
    out = standardise(scores, clip=3.0)
    assert torch.allclose(out[:5], (scores[:5] - 3.5) / 2.5)
    assert out[5] == 3.0


def test_logistic_schedule_mean_is_the_global_sparsity() -> None:
    rho = logistic_schedule(12, 0.3)
    assert rho[:2] == [0.0, 0.0] and rho[-2:] == [0.0, 0.0]
    assert sum(rho) / 12 == pytest.approx(0.3, abs=1e-6)
    middle = rho[2:-2]
    assert middle == sorted(middle), "later layers are pruned more (the logistic rises)"
    # Lambda / (1 + exp(-k (x - x0))) with the same Lambda for every layer:
    lam = middle[0] * (1 + math.exp(-(2 / 11 - 0.3)))
    assert middle[-1] == pytest.approx(lam / (1 + math.exp(-(9 / 11 - 0.3))), rel=1e-6)
    assert logistic_schedule(6, 0.0) == [0.0] * 6
    with pytest.raises(ValueError, match="prunable"):
        logistic_schedule(6, 0.8)
    with pytest.raises(ValueError, match="no layer can be pruned"):
        logistic_schedule(4, 0.2)


def test_prune_layer_and_bias_compensation() -> None:
    kept, pruned = prune_layer(torch.tensor([0.5, 0.1, 0.9, 0.2]), 0.5)
    assert kept == [0, 2] and pruned == [1, 3]
    down = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]])
    mean = torch.tensor([10.0, 1.0, 10.0, 0.5])
    assert torch.allclose(bias_compensation(down, mean, pruned), torch.tensor([2.0 + 2.0, 1.0 - 0.5]))
    assert torch.equal(bias_compensation(down, mean, []), torch.zeros(2))
