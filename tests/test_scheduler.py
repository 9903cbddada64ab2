import random

import pytest

from services.engine.kv_cache import BlockManager
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig
from services.engine.sequence import Sequence, SequenceStatus

EOS = 2


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        self.t += 1.0
        return self.t


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=64, caching=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          max_model_len=max_model_len)
    return Scheduler(cfg, bm, clock=Clock())


def seq(seq_id, prompt, arrival=None, request_id=None, index=0, **params):
    return Sequence(seq_id, request_id or f"r{seq_id}", prompt, SamplingParams(**params), index=index,
                    eos_token_id=EOS, arrival_time=float(seq_id if arrival is None else arrival))


def step(sch, token=7):
    """One engine step with a fake runner that samples `token` (or token(seq))."""
    out = sch.schedule()
    finished = []
    if not out.is_empty:
        tokens = [token(s.seq) if callable(token) else token for s in out.sampled]
        finished = sch.update(out, tokens)
    sch.check_invariants()
    return out, finished


def summary(out):
    return [(s.seq_id, s.start, s.num_tokens, s.needs_sample) for s in out.scheduled]


def prompt(n, base=10):
    # Distinct prompts per base, never containing EOS.
    return [base * 1000 + i for i in range(n)]


# --- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
    ({"max_model_len": True}, "max_model_len"),
    ({"max_num_seqs": 16, "max_num_batched_tokens": 8}, "max_num_batched_tokens"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kw)


def test_cache_must_hold_one_full_length_sequence():
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=65),
                  BlockManager(16, 4))


def test_add_rejects_bad_sequences():
    sch = make(max_model_len=16)
    with pytest.raises(ValueError, match="no room to generate"):
        sch.add(seq(0, prompt(16)))
    sch.add(seq(1, prompt(3)))
    with pytest.raises(ValueError, match="already scheduled"):
        sch.add(seq(1, prompt(3)))
    used = seq(2, prompt(3))
    used.status = SequenceStatus.RUNNING
    with pytest.raises(ValueError, match="fresh"):
        sch.add(used)


# --- admission and chunked prefill ---------------------------------------------------------------
def test_admission_fills_the_token_budget_then_chunks():
    sch = make(budget=16)
    for i in range(3):
        sch.add(seq(i, prompt(6, base=i + 1)))
    out, _ = step(sch)
    assert summary(out) == [(0, 0, 6, True), (1, 0, 6, True), (2, 0, 4, False)]
    assert out.num_decode == 0 and out.num_batched_tokens == 16
    out, _ = step(sch)
    # Decodes first, one token each, then the rest of the chunked prompt.
    assert summary(out) == [(0, 6, 1, True), (1, 6, 1, True), (2, 4, 2, True)]
    assert out.num_decode == 2 and out.num_prefill_tokens == 2


def test_max_num_seqs_caps_admission():
    sch = make(max_num_seqs=2, budget=32)
    for i in range(3):
        sch.add(seq(i, prompt(3, base=i + 1)))
    out, _ = step(sch)
    assert [s.seq_id for s in out.scheduled] == [0, 1]
    assert sch.num_running == 2 and sch.num_waiting == 1


def test_long_prompt_prefilled_over_several_steps():
    sch = make(budget=8)
    p = prompt(20)
    sch.add(seq(0, p))
    chunks = []
    for _ in range(3):
        out, _ = step(sch)
        (s,) = out.scheduled
        chunks.append((s.start, s.num_tokens, s.needs_sample))
        assert list(s.token_ids) == p[s.start:s.start + s.num_tokens]
        assert list(s.positions) == list(range(s.start, s.start + s.num_tokens))
        assert len(s.block_table) * 4 >= s.context_len
        assert out.sample_indices() == ([s.num_tokens - 1] if s.needs_sample else [])
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert sch.get(0).num_output_tokens == 1


def test_flat_step_inputs_concatenate_in_order():
    sch = make(budget=16)
    sch.add(seq(0, prompt(3)))
    step(sch, token=5)
    sch.add(seq(1, prompt(4, base=2)))
    out = sch.schedule()
    assert out.token_ids() == [5] + prompt(4, base=2)
    assert out.positions() == [3, 0, 1, 2, 3]
    assert out.sample_indices() == [0, 4]
    assert [s.seq_id for s in out.sampled] == [0, 1]
    sch.update(out, [1, 1])


def test_fifo_head_is_never_overtaken():
    sch = make(num_blocks=16, block_size=4, max_model_len=64, budget=64)
    sch.add(seq(0, prompt(40)))  # 10 blocks
    step(sch)
    sch.add(seq(1, prompt(40, base=2)))  # does not fit next to seq 0
    sch.add(seq(2, prompt(3, base=3)))  # would fit, but arrived later
    for _ in range(3):
        out, _ = step(sch)
        assert [s.seq_id for s in out.scheduled] == [0]
    sch.finish(0, "stop")
    out, _ = step(sch)
    assert [s.seq_id for s in out.scheduled] == [1, 2]


# --- preemption ----------------------------------------------------------------------------------
def test_preempts_youngest_and_resumes_with_prompt_plus_outputs():
    # 6 blocks of 2 tokens; three 3-token prompts take all of them.
    sch = make(num_blocks=6, block_size=2, max_model_len=12, budget=32, caching=False)
    a = seq(0, prompt(3, 1), max_tokens=3)
    b = seq(1, prompt(3, 2), max_tokens=8)
    c = seq(2, prompt(3, 3), max_tokens=8)
    late = seq(3, prompt(2, 4))
    for s in (a, b, c, late):
        sch.add(s)
    counter = iter(range(500, 600))

    def tok(_seq):
        return next(counter)

    step(sch, tok)  # prefill all: 4 tokens each; `late` finds no block
    step(sch, tok)  # decode: 5 tokens each, the 5th needs a third block
    out, _ = step(sch, tok)
    assert out.preempted_seq_ids == (2,)
    assert [s.seq_id for s in out.scheduled] == [0, 1]
    assert c.status is SequenceStatus.PREEMPTED
    assert list(sch.waiting) == [c, late]  # back at the front, ahead of later arrivals
    assert c.num_computed_tokens == 0 and not c.block_table and c.num_preemptions == 1
    kept = list(c.output_token_ids)
    assert len(kept) == 2
    # a finishes (max_tokens=3), freeing room for c, which goes before `late`.
    while not c.block_table:
        assert late.first_scheduled_time is None
        out, _ = step(sch, tok)
    (resumed,) = [s for s in out.scheduled if s.seq_id == 2]
    assert resumed.start == 0 and resumed.needs_sample
    assert list(resumed.token_ids) == list(c.prompt_token_ids) + kept
    assert c.output_token_ids[:2] == kept and c.num_output_tokens == 3
    assert a.finish_reason == "length" and sch.num_preemptions == 1


def test_resumed_sequence_reuses_its_cached_blocks():
    # One block more than the three prefills need: the preemption frees two cached blocks and the
    # second decode then evicts one of them, the tail (evicted first); the head survives.
    sch = make(num_blocks=7, block_size=2, max_model_len=12, budget=32, caching=True)
    seqs = [seq(i, prompt(3, i + 1), max_tokens=3 if i == 0 else 8) for i in range(3)]
    for s in seqs:
        sch.add(s)
    for _ in range(3):
        out, _ = step(sch)
    assert out.preempted_seq_ids == (2,)
    c = seqs[2]
    while not c.block_table:
        out, _ = step(sch)
    (resumed,) = [s for s in out.scheduled if s.seq_id == 2]
    assert resumed.start == 2 and resumed.needs_sample
    assert c.num_cached_tokens == 0  # reported cached prompt tokens come from the first admission
    assert list(resumed.token_ids) == c.token_ids[2:5]


def test_decode_preempts_itself_when_it_is_the_youngest():
    sch = make(num_blocks=4, block_size=2, max_model_len=8, budget=32, caching=False)
    a = seq(0, prompt(4, 1), max_tokens=2)  # 2 blocks, then a third after its first output
    b = seq(1, prompt(3, 2))  # 2 blocks
    sch.add(a)
    sch.add(b)
    step(sch)  # a: 5 tokens, b: 4 tokens; all 4 blocks used
    out, _ = step(sch)  # a needs a block: b (youngest) goes
    assert out.preempted_seq_ids == (1,)
    assert a.is_finished  # a got its second token: max_tokens
    out, _ = step(sch)
    assert [s.seq_id for s in out.scheduled] == [1] and out.scheduled[0].start == 0


def test_later_arrival_waits_behind_a_preempted_sequence_even_when_it_fits():
    sch = make(num_blocks=6, block_size=2, max_model_len=12, budget=32, caching=False)
    sch.add(seq(0, prompt(3, 1)))  # 2 blocks
    sch.add(seq(1, prompt(7, 2)))  # 4 blocks
    step(sch)
    step(sch)
    sch.add(seq(9, [5]))
    out, _ = step(sch)  # seq 0 needs a third block: seq 1 goes, freeing 4
    assert out.preempted_seq_ids == (1,)
    assert sch.block_manager.num_free_blocks == 3  # seq 9 would fit; seq 1 (5 blocks) does not
    assert [s.seq_id for s in out.scheduled] == [0]
    assert [s.seq_id for s in sch.waiting] == [1, 9]
    out, _ = step(sch)
    assert [s.seq_id for s in out.scheduled] == [0]


# --- finishing and aborting ----------------------------------------------------------------------
def test_stop_conditions():
    sch = make()
    eos = seq(0, prompt(3, 1))
    ignore = seq(1, prompt(3, 2), ignore_eos=True, max_tokens=2)
    stop_id = seq(2, prompt(3, 3), stop_token_ids=[9])
    min_tok = seq(3, prompt(3, 4), min_tokens=2, max_tokens=5)
    for s in (eos, ignore, stop_id, min_tok):
        sch.add(s)
    _, finished = step(sch, token=lambda s: {0: EOS, 1: EOS, 2: 9, 3: EOS}[s.seq_id])
    assert {s.seq_id for s in finished} == {0, 2}
    assert (eos.finish_reason, eos.stop_reason, eos.status) == ("stop", None, SequenceStatus.FINISHED_STOPPED)
    assert (stop_id.finish_reason, stop_id.stop_reason) == ("stop", 9)
    _, finished = step(sch, token=EOS)
    # ignore_eos runs into max_tokens; min_tokens=2 now reached: eos stops it.
    assert (ignore.finish_reason, ignore.status) == ("length", SequenceStatus.FINISHED_LENGTH)
    assert (min_tok.finish_reason, min_tok.num_output_tokens) == ("stop", 2)
    out, _ = step(sch)
    assert sorted(out.finished_seq_ids) == [1, 3] and out.is_empty
    assert sch.block_manager.num_free_blocks == sch.block_manager.num_blocks


def test_context_length_stops_with_length():
    sch = make(num_blocks=4, block_size=4, max_model_len=8, budget=8)
    s = seq(0, prompt(6))
    sch.add(s)
    step(sch)
    _, finished = step(sch)
    assert finished == [s] and s.num_tokens == 8 and s.finish_reason == "length"


def test_finish_from_caller_and_bad_reason():
    sch = make()
    s = seq(0, prompt(3))
    sch.add(s)
    step(sch)
    with pytest.raises(ValueError, match="finish reason"):
        sch.finish(0, "done")
    assert s.status is SequenceStatus.RUNNING
    assert sch.finish(0, "stop", stop_reason="###")
    assert (s.finish_reason, s.stop_reason) == ("stop", "###")
    assert not sch.finish(0, "stop") and not sch.finish(123, "abort")
    assert sch.schedule().finished_seq_ids == (0,)


@pytest.mark.parametrize("when", ["waiting", "mid_prefill", "decode", "in_flight"])
def test_abort_frees_everything(when):
    sch = make(budget=8)
    s = seq(0, prompt(20))
    other = seq(1, prompt(5, 2))
    sch.add(s)
    sch.add(other)
    pending = None
    if when == "mid_prefill":
        step(sch)
        assert 0 < s.num_computed_tokens < s.num_prompt_tokens
    elif when == "decode":
        for _ in range(5):
            step(sch)
        assert s.num_output_tokens > 0
    elif when == "in_flight":
        step(sch)
        pending = sch.schedule()
        assert 0 in [x.seq_id for x in pending.scheduled]
    assert [x.seq_id for x in sch.abort_request("r0")] == [0]
    assert s.status is SequenceStatus.FINISHED_ABORTED and s.finish_reason == "abort"
    assert not s.block_table
    if pending is not None:
        sch.update(pending, [7] * len(pending.sampled))  # the aborted sequence's token is dropped
        assert s.num_output_tokens == 0
    sch.check_invariants()
    assert sch.abort_request("r0") == []
    out, _ = step(sch)
    assert out.finished_seq_ids == (0,) and 0 not in [x.seq_id for x in out.scheduled]
    sch.abort_request("r1")
    step(sch)
    bm = sch.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not sch.has_unfinished()


def test_siblings_share_prompt_blocks_and_abort_together():
    sch = make(block_size=4)
    sibs = [seq(i, prompt(9), request_id="req", index=i, n=3) for i in range(3)]
    for s in sibs:
        sch.add(s)
    out, _ = step(sch)
    # The first computes the prompt; the others reuse its two full blocks within the same step.
    assert summary(out) == [(0, 0, 9, True), (1, 8, 1, True), (2, 8, 1, True)]
    bm = sch.block_manager
    assert all(bm.blocks[b].ref_count == 3 for b in sibs[0].block_table[:2])
    assert sch.request_seq_ids("req") == {0, 1, 2}
    assert len(sch.abort_request("req")) == 3
    assert sch.request_seq_ids("req") == frozenset()
    step(sch)
    assert bm.num_free_blocks == bm.num_blocks


# --- protocol misuse -----------------------------------------------------------------------------
def test_update_must_match_schedule():
    sch = make()
    sch.add(seq(0, prompt(3)))
    out = sch.schedule()
    with pytest.raises(RuntimeError, match="before update"):
        sch.schedule()
    with pytest.raises(ValueError, match="expected 1 sampled"):
        sch.update(out, [])
    sch.update(out, [4])
    with pytest.raises(RuntimeError, match="latest schedule"):
        sch.update(out, [4])


def test_timestamps_follow_the_clock():
    sch = make()
    s = seq(0, prompt(3))
    sch.add(s)
    step(sch)
    step(sch)
    assert s.arrival_time < s.first_scheduled_time < s.first_token_time < s.last_token_time


# --- randomized ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(25))
def test_random_workload_keeps_invariants_and_finishes_everything(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    max_model_len = rng.choice([16, 48])
    num_blocks = -(-max_model_len // block_size) + rng.randrange(0, 12)
    max_num_seqs = rng.randint(1, 6)
    sch = make(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
               budget=rng.randint(max_num_seqs, 24), max_model_len=max_model_len,
               caching=rng.random() < 0.8)
    shared = [rng.randrange(3, 50) for _ in range(max_model_len)]  # common prefixes
    next_id, all_seqs = 0, []
    # Arrivals for 150 steps, then a drain long enough for the slowest configuration (1 token/step).
    for t in range(5000):
        if t < 150 and rng.random() < 0.3:
            n = rng.choice([1, 1, 1, 2, 3])
            length = rng.randint(1, max_model_len - 1)
            cut = rng.randint(0, length)
            p = shared[:cut] + [rng.randrange(3, 50) for _ in range(length - cut)]
            params = {"max_tokens": rng.choice([None, 1, 5, 20]), "ignore_eos": rng.random() < 0.3, "n": n}
            for i in range(n):
                s = seq(next_id, p, arrival=t, request_id=f"req{next_id - i}", index=i, **params)
                sch.add(s)
                all_seqs.append(s)
                next_id += 1
        if rng.random() < 0.05 and all_seqs:
            sch.abort_request(rng.choice(all_seqs).request_id)
        if rng.random() < 0.05 and sch.running:
            sch.finish(rng.choice(sch.running).seq_id, "stop", "str")
        out = sch.schedule()
        assert out.num_batched_tokens <= sch.config.max_num_batched_tokens
        assert len(out.scheduled) <= max_num_seqs
        assert len({s.seq_id for s in out.scheduled}) == len(out.scheduled)
        for s in out.scheduled:
            assert s.token_ids == tuple(s.seq.token_ids[s.start:s.start + s.num_tokens])
            assert len(s.block_table) * block_size >= s.context_len
        sch.check_invariants()
        if not out.is_empty:
            if rng.random() < 0.03:
                victim = rng.choice(out.scheduled).seq
                sch.abort_request(victim.request_id)  # while the step runs
            sch.update(out, [rng.choice([EOS, 3, 4, 5]) if rng.random() < 0.1 else rng.randrange(3, 50)
                             for _ in out.sampled])
        sch.check_invariants()
        if t >= 150 and not sch.has_unfinished():
            break
    assert not sch.has_unfinished(), "a request starved"
    assert all(s.is_finished for s in all_seqs)
    bm = sch.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm.holder_seq_ids
    for s in all_seqs:
        assert s.num_tokens <= max_model_len
        limit = s.sampling_params.max_tokens
        assert limit is None or s.num_output_tokens <= limit
