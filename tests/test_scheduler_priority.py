"""Request priorities in the scheduler: lower values are admitted first, ties by arrival, preempted
sequences before everything, and the starvation bound: a waiting sequence is passed over by at most
`max_overtakes` later arrivals. Exact admission orders, no torch."""
from __future__ import annotations

import random

import pytest

from services.engine.kv_cache import BlockManager
from services.engine.scheduler import Scheduler, SchedulerConfig
from services.engine.sequence import SequenceStatus
from tests.test_scheduler import prompt, seq


def make(max_num_seqs=1, max_overtakes=32, num_blocks=64, block_size=4, budget=32, max_model_len=64):
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                          max_overtakes=max_overtakes)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, enable_prefix_caching=False))


def admitted(sch, token=7):
    """One step; the sequences it admitted (newly running), in admission order."""
    before = {s.seq_id for s in sch.running}
    out = sch.schedule()
    if not out.is_empty:
        sch.update(out, [token] * len(out.sampled))
    sch.check_invariants()
    return [s.seq_id for s in out.prefills if s.seq_id not in before]


def one_shot(seq_id, priority=0, arrival=None):
    """A request that is admitted, prefilled and finished in one step (max_tokens=1)."""
    return seq(seq_id, prompt(3, seq_id + 1), arrival=arrival, max_tokens=1, priority=priority)


@pytest.mark.parametrize("bad", [-1, True, 1.5, None])
def test_config_checks_max_overtakes(bad):
    with pytest.raises(ValueError, match="max_overtakes"):
        SchedulerConfig(max_overtakes=bad)


def test_lower_priority_values_first_ties_by_arrival():
    sch = make()
    for seq_id, priority in [(0, 5), (1, 0), (2, -3), (3, 0), (4, 5), (5, -3)]:
        sch.add(one_shot(seq_id, priority))
    order = [s for _ in range(6) for s in admitted(sch)]
    assert order == [2, 5, 1, 3, 0, 4]
    assert not sch.has_unfinished()


def test_equal_priorities_and_zero_overtakes_are_fifo():
    for priorities, max_overtakes in ([(7,) * 5, 32], [(4, 3, 2, 1, 0), 0]):
        sch = make(max_num_seqs=2, max_overtakes=max_overtakes)
        for seq_id, priority in enumerate(priorities):
            sch.add(one_shot(seq_id, priority))
        assert [admitted(sch) for _ in range(3)] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("max_overtakes", [0, 1, 3, 5])
def test_a_low_priority_request_waits_for_exactly_max_overtakes_later_ones(max_overtakes):
    # One slot; a high-priority request arrives before every step, forever.
    sch = make(max_overtakes=max_overtakes)
    low = one_shot(0, priority=10)
    sch.add(low)
    order = []
    for step in range(1, max_overtakes + 4):
        sch.add(one_shot(step, priority=-1))
        order += admitted(sch)
    assert order.index(0) == max_overtakes
    assert low.num_overtaken == max_overtakes
    # Once served, the high-priority ones follow in arrival order.
    assert [s for s in order if s != 0] == sorted(s for s in order if s != 0)


def test_overtakes_counted_within_one_step():
    sch = make(max_num_seqs=4, max_overtakes=2)
    sch.add(one_shot(0, priority=1))
    for seq_id in range(1, 5):
        sch.add(one_shot(seq_id, priority=0))
    assert admitted(sch) == [1, 2, 0, 3]
    assert admitted(sch) == [4]


def test_aged_requests_keep_arrival_order_among_themselves():
    sch = make(max_overtakes=1)
    sch.add(one_shot(0, priority=9))
    sch.add(one_shot(1, priority=5))
    sch.add(one_shot(2, priority=0))
    # 2 overtakes 0 and 1: both now rank by age, ahead of any fresh request whatever its priority.
    assert admitted(sch) == [2]
    sch.add(one_shot(3, priority=-100))
    assert [admitted(sch) for _ in range(3)] == [[0], [1], [3]]


def test_the_best_ranked_request_that_does_not_fit_blocks_admission():
    # 8 blocks of 4 tokens: a 20-token prompt (5 blocks) cannot join a running 12-token one (3 blocks + 1).
    sch = make(max_num_seqs=4, num_blocks=8, max_model_len=32)
    sch.add(seq(0, prompt(12, 1), max_tokens=3))
    assert admitted(sch) == [0]
    sch.add(seq(1, prompt(2, 2), max_tokens=1, priority=5))
    sch.add(seq(2, prompt(20, 3), max_tokens=1, priority=0))
    assert admitted(sch) == []  # seq 1 would fit, but seq 2 ranks first
    assert sch.get(1).status is SequenceStatus.WAITING
    while sch.get(0) is not None:
        assert admitted(sch) == []
    assert admitted(sch) == [2, 1]


def test_preempted_sequences_resume_before_higher_priority_arrivals():
    sch = make(max_num_seqs=4, num_blocks=6, block_size=2, max_model_len=12)
    a = seq(0, prompt(3, 1), max_tokens=3, priority=5)
    b = seq(1, prompt(3, 2), max_tokens=8, priority=5)
    c = seq(2, prompt(3, 3), max_tokens=8, priority=5)
    for s in (a, b, c):
        sch.add(s)
    admitted(sch)
    admitted(sch)
    out = sch.schedule()
    assert out.preempted_seq_ids == (2,)
    sch.update(out, [7] * len(out.sampled))
    sch.add(seq(3, [5], priority=-5))
    resumed = []
    while not resumed:
        resumed = admitted(sch)
    assert resumed[0] == 2


def test_random_workloads_respect_the_bound():
    rng = random.Random(1)
    at_the_bound = 0
    for trial in range(30):
        max_overtakes = rng.choice([0, 1, 2, 4, 8])
        sch = make(max_num_seqs=rng.choice([1, 2, 3]), max_overtakes=max_overtakes, num_blocks=24,
                   max_model_len=24, budget=24)
        arrivals, admissions, next_id, steps = {}, [], 0, 0
        while next_id < 60 or sch.has_unfinished():
            for _ in range(rng.choice([0, 0, 1, 2]) if next_id < 60 else 0):
                s = seq(next_id, prompt(rng.randint(1, 8), next_id + 1), arrival=float(next_id),
                        max_tokens=rng.randint(1, 6), priority=rng.randint(-2, 2))
                sch.add(s)
                arrivals[next_id] = s
                next_id += 1
            admissions += admitted(sch)
            steps += 1
            assert steps < 5000
        first = {}
        for position, seq_id in enumerate(admissions):
            first.setdefault(seq_id, position)
        for seq_id, position in first.items():
            later_first = sum(1 for other in admissions[:position] if other > seq_id)
            assert later_first <= max_overtakes, (trial, seq_id)
            at_the_bound += later_first == max_overtakes > 0
        assert sorted(first) == sorted(arrivals)
    assert at_the_bound > 0  # the workloads do push requests to the bound
