import dataclasses

import pytest

from services.engine.sampling_params import SamplingParams


def test_defaults_are_valid_and_sample():
    p = SamplingParams()
    assert p.n == 1 and p.temperature == 1.0 and p.max_tokens is None
    assert not p.greedy and not p.has_penalties and not p.uses_top_k
    assert p.stop == () and p.stop_token_ids == ()


def test_frozen():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 17), ("n", 1.0), ("n", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("min_p", -0.01), ("min_p", 1.5),
    ("seed", 1.0), ("seed", True), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", -3), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("max_tokens", 0), ("max_tokens", 1.0), ("max_tokens", False),
    ("min_tokens", -1), ("min_tokens", True),
    ("stop", [""]), ("stop", [1]), ("stop", 5), ("stop", ["ok", None]),
    ("stop_token_ids", [-1]), ("stop_token_ids", [True]), ("stop_token_ids", 3), ("stop_token_ids", [1.0]),
    ("ignore_eos", 1), ("ignore_eos", None),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", 1.0),
    ("skip_special_tokens", "yes"),
])
def test_out_of_range_or_wrong_type_is_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("n", 16), ("temperature", 0), ("temperature", 0.0), ("temperature", 5), ("top_p", 1), ("top_p", 1e-6),
    ("top_k", -1), ("top_k", 0), ("top_k", 1), ("min_p", 0), ("min_p", 1.0), ("seed", 0), ("seed", -5),
    ("seed", 2**64 - 1), ("presence_penalty", -2), ("frequency_penalty", 2.0),
    ("repetition_penalty", 1e-3), ("max_tokens", 1), ("min_tokens", 0), ("logprobs", 0), ("logprobs", 20),
])
def test_boundaries_are_accepted(field, value):
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_min_tokens_must_not_exceed_max_tokens():
    SamplingParams(max_tokens=4, min_tokens=4)
    SamplingParams(min_tokens=100)  # no max_tokens: only the context bounds it
    with pytest.raises(ValueError, match="min_tokens.*max_tokens=4"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_stop_normalised_to_tuples():
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop="end").stop == ("end",)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    # Normalised instances compare and hash by value.
    assert SamplingParams(stop=["x"]) == SamplingParams(stop=("x",))
    assert hash(SamplingParams(stop=["x"])) == hash(SamplingParams(stop=("x",)))


def test_greedy_and_flags():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties
    assert SamplingParams(top_k=5).uses_top_k and not SamplingParams(top_k=0).uses_top_k


def test_seed_for_siblings():
    assert SamplingParams(seed=7).seed_for(0) == 7
    assert SamplingParams(seed=7).seed_for(2) == 9
    assert SamplingParams().seed_for(3) is None
