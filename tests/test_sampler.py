import math

import pytest
import torch

from services.engine.sampler import Sampler, apply_penalties, step_seed
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence

N = 20_000
PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])
LOGITS = PROBS.log()


def frequencies(params, logits=LOGITS, n=N, seed=0):
    """Empirical token frequencies of n independent rows sampled with `params`."""
    sampler = Sampler(seed=seed)
    out = sampler(logits.expand(n, -1).clone(), [params] * n, [[] for _ in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[0]).double() / n


def assert_matches(freq, expected):
    expected = torch.tensor(expected, dtype=torch.float64)
    # 5 binomial standard deviations (and an exact zero where the probability is zero).
    tol = 5 * torch.sqrt(expected * (1 - expected) / N)
    assert torch.all((freq - expected).abs() <= tol), (freq.tolist(), expected.tolist())


def test_unfiltered_sampling_follows_the_distribution():
    assert_matches(frequencies(SamplingParams()), [0.4, 0.3, 0.2, 0.1])


def test_temperature_sharpens():
    expected = torch.softmax(LOGITS / 0.5, -1)
    assert_matches(frequencies(SamplingParams(temperature=0.5)), expected.tolist())


def test_top_k():
    assert_matches(frequencies(SamplingParams(top_k=2)), [4 / 7, 3 / 7, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert_matches(frequencies(SamplingParams(top_p=0.6)), [4 / 7, 3 / 7, 0, 0])
    assert_matches(frequencies(SamplingParams(top_p=0.75)), [4 / 9, 3 / 9, 2 / 9, 0])


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # After top-k=3 the mass before token 2 is 7/9 > 0.75: dropped (on the raw distribution it is not).
    assert_matches(frequencies(SamplingParams(top_k=3, top_p=0.75)), [4 / 7, 3 / 7, 0, 0])


def test_min_p():
    # Threshold 0.6 * 0.4 = 0.24.
    assert_matches(frequencies(SamplingParams(min_p=0.6)), [4 / 7, 3 / 7, 0, 0])
    assert_matches(frequencies(SamplingParams(min_p=0.6, top_k=3)), [4 / 7, 3 / 7, 0, 0])


def test_rows_with_different_filters_in_one_batch():
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(min_p=0.6)] * (N // 2)
    out = Sampler(seed=1)(LOGITS.expand(len(params), -1).clone(), params, [[]] * len(params))
    tokens = torch.tensor(out.token_ids).view(-1, 3)
    assert torch.all(tokens[:, 0] == 0)
    for col, expected in ((1, [0.4, 0.3, 0.2, 0.1]), (2, [4 / 7, 3 / 7, 0, 0])):
        freq = torch.bincount(tokens[:, col], minlength=4).double() / tokens.shape[0]
        tol = 5 * torch.sqrt(torch.tensor(expected) * (1 - torch.tensor(expected)) / tokens.shape[0])
        assert torch.all((freq - torch.tensor(expected)).abs() <= tol)


def test_greedy_takes_the_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    out = Sampler(seed=0)(logits, [SamplingParams(temperature=0)] * 2, [[], []])
    assert out.token_ids == [1, 0]


def test_greedy_rows_ignore_filters_and_randomness():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0, top_p=0.1, top_k=3, min_p=0.5)] * 8
    for seed in range(3):
        out = Sampler(seed=seed)(logits, params, [[]] * 8)
        assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(0)
    row = torch.randn(1000, generator=gen)
    params = SamplingParams(seed=1234, temperature=1.3, top_p=0.9)

    def run(batch_logits, index, history):
        batch = batch_logits.shape[0]
        plist = [SamplingParams(top_k=5)] * batch
        plist[index] = params
        hist = [[1, 2]] * batch
        hist[index] = history
        logits = batch_logits.clone()
        logits[index] = row
        return Sampler(seed=99 + batch)(logits, plist, hist).token_ids[index]

    for step in range(5):
        history = list(range(step))
        alone = run(torch.zeros(1, 1000), 0, history)
        crowded = run(torch.randn(7, 1000, generator=gen), 4, history)
        assert alone == crowded
    tokens = [run(torch.zeros(1, 1000), 0, list(range(s))) for s in range(20)]
    assert len(set(tokens)) > 5  # the step advances the stream


def seeded_stream(seed, steps=10):
    """Tokens of a seeded row generated step by step, each step in a fresh sampler."""
    logits, tokens = torch.zeros(1, 1000), []
    for _ in range(steps):
        tokens += Sampler()(logits, [SamplingParams(seed=seed)], [tokens]).token_ids
    return tokens


def sequence_stream(seq, steps=10):
    logits = torch.zeros(1, 1000)
    for _ in range(steps):
        seq.append_token(Sampler().sample_sequences(logits, [seq]).token_ids[0])
    return seq.output_token_ids


def test_seed_changes_the_stream_and_siblings_differ():
    assert seeded_stream(1) == seeded_stream(1)
    assert seeded_stream(1) != seeded_stream(2)
    # n > 1 siblings draw with seed + index: distinct, and each reproducible on its own.
    siblings = [Sequence(i, "r", [5, 6], SamplingParams(seed=7, n=2), index=i) for i in range(2)]
    assert [s.seed for s in siblings] == [7, 8]
    assert sequence_stream(siblings[0]) == seeded_stream(7)
    assert sequence_stream(siblings[1]) == seeded_stream(8) != seeded_stream(7)
    assert len({step_seed(7, 0), step_seed(8, 0), step_seed(7, 1), step_seed(8, 1)}) == 4


def test_unseeded_rows_follow_the_sampler_generator():
    logits = torch.zeros(4, 1000)
    p = [SamplingParams()] * 4
    h = [[]] * 4
    assert Sampler(seed=5)(logits, p, h).token_ids == Sampler(seed=5)(logits, p, h).token_ids
    assert Sampler(seed=5)(logits, p, h).token_ids != Sampler(seed=6)(logits, p, h).token_ids


def test_penalties_exact_values():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    out = apply_penalties(logits, [[0, 0, 3]], [[2]], presence=torch.tensor([0.1]),
                          frequency=torch.tensor([0.5]), repetition=torch.tensor([2.0]))
    # token 0: 2/2 - 0.5*2 - 0.1; token 1 unseen; token 2 (prompt, negative): -1*2; token 3: 0.5/2 - 0.5 - 0.1
    assert torch.allclose(out, torch.tensor([[-0.1, 1.0, -2.0, -0.35]]))
    assert torch.equal(logits, torch.tensor([[2.0, 1.0, -1.0, 0.5]]))  # input untouched


def test_penalties_in_the_sampler_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=1.1),
              SamplingParams(temperature=0, presence_penalty=0.2),
              SamplingParams(temperature=0, frequency_penalty=0.05),
              SamplingParams(temperature=0)]
    out = Sampler()(logits, params, [[], [0], [0, 0, 0], [0]], prompt_token_ids=[[0], [], [], [0]])
    # repetition over the prompt; presence/frequency over outputs; no penalties: unchanged.
    assert out.token_ids == [1, 1, 1, 0]
    # Presence and frequency ignore the prompt.
    out = Sampler()(logits[:2], params[1:3], [[], []], prompt_token_ids=[[0], [0]])
    assert out.token_ids == [0, 0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 0.0, 10.0, 9.0, 1.0]] * 4)
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])] * 3 + [
        SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)]
    out = Sampler()(logits, params, [[], [4], [4, 4], []], eos_token_ids=[2] * 4)
    assert out.token_ids == [4, 4, 2, 2]
    seq = Sequence(0, "r", [1], SamplingParams(temperature=0, min_tokens=1), eos_token_id=2)
    assert Sampler().sample_sequences(logits[:1], [seq]).token_ids == [3]


def test_logprobs_are_raw_and_topn_sorted():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    raw = torch.log_softmax(logits[0], -1)
    params = [SamplingParams(temperature=0, logprobs=2, repetition_penalty=1.9),
              SamplingParams(temperature=0.1, logprobs=0, top_k=1),
              SamplingParams(temperature=0)]
    out = Sampler()(logits, params, [[1], [], []], prompt_token_ids=[[1], [], []])
    assert out.token_ids == [2, 1, 1]  # the penalty moved row 0's argmax
    assert out.logprobs[0] == pytest.approx(raw[2].item())  # raw: before the penalty
    assert out.top_logprobs[0] == [(1, pytest.approx(raw[1].item())), (2, pytest.approx(raw[2].item()))]
    assert out.logprobs[1] == pytest.approx(raw[1].item()) and out.top_logprobs[1] == []
    assert out.logprobs[2] is None and out.top_logprobs[2] is None
    assert math.isclose(sum(math.exp(v) for v in raw.tolist()), 1.0, rel_tol=1e-6)


def test_input_logits_are_not_modified():
    logits = torch.randn(3, 20)
    before = logits.clone()
    params = [SamplingParams(min_tokens=3, stop_token_ids=[1], repetition_penalty=1.5, top_p=0.5),
              SamplingParams(temperature=0.3, min_p=0.2), SamplingParams(temperature=0)]
    Sampler()(logits, params, [[1, 2], [3], []], eos_token_ids=[0, 0, 0])
    assert torch.equal(logits, before)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must be"):
        Sampler()(torch.zeros(2, 5), [SamplingParams()], [[]])
