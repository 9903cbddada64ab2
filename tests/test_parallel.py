"""A model instance over a parallel group (services/engine/parallel.py): rank 0 here, rank 1 a Ray actor.

The float32 golden contract holds through the sharded model; a dead or stalled rank fails the engine in
bounded time; each rank loads (and holds) less than a single rank would.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.parallel import (
    Command,
    ParallelGroupError,
    Rendezvous,
    decode_step,
    encode_step,
    join,
    listen_socket,
    master_store,
)
from services.engine.runner import StepInputs
from services.engine.sampling_params import SamplingParams
from services.model.attention_metadata import AttentionMetadata, PrefillChunk
from tests.conftest import golden_prompts
from tests.serve_support import start_local_ray
from tests.step_gate import StepGate

ray = pytest.importorskip("ray")

TOL = 1e-3
TINY = Path(__file__).resolve().parents[1] / ".." / "shared" / "grok1-reference" / "tiny"
PLAN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "parallelism_plan.py"
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def tiny_dir() -> Path:
    if not (TINY / "ckpt-0").is_dir():
        pytest.skip(f"tiny reference checkpoint not found at {TINY.resolve()}; golden parallel tests skipped")
    return TINY.resolve()


# --- no Ray needed ------------------------------------------------------------------------------
def test_step_description_round_trips():
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([5, 17, 18, 19, 40]),
        decode_block_tables=torch.tensor([[0, 0], [1, 3]]),
        decode_context_lens=torch.tensor([6, 20]),
        prefills=(PrefillChunk(2, 2, 4, torch.tensor([2])), PrefillChunk(4, 1, 33, torch.tensor([7, 8, 9]))))
    inputs = StepInputs(torch.tensor([11, 12, 13, 14, 15]), torch.tensor([5, 19, 2, 3, 32]), meta,
                        torch.tensor([0, 1, 3, 4]))
    args, payload = encode_step(inputs)
    assert payload.dtype == torch.int64 and payload.dim() == 1
    got = decode_step(args, payload)
    for name in ("input_ids", "positions", "sample_indices"):
        assert torch.equal(getattr(got, name), getattr(inputs, name))
    for name in ("slot_mapping", "decode_block_tables", "decode_context_lens"):
        assert torch.equal(getattr(got.meta, name), getattr(meta, name))
    chunks = [(c.query_start, c.query_len, c.context_len, c.block_table.tolist()) for c in got.meta.prefills]
    assert chunks == [(2, 2, 4, [2]), (4, 1, 33, [7, 8, 9])]


def test_collectives_and_step_channel_between_two_ranks():
    # Two ranks as two threads of this process: TorchDistComm and the step channel without Ray.
    sock = listen_socket("127.0.0.1")
    rdv = Rendezvous("127.0.0.1", sock.getsockname()[1], 2, False, 10.0, connect_timeout_s=30.0)
    store = master_store(rdv, sock)
    meta = AttentionMetadata.for_single_sequence(0, 3, torch.tensor([4]), 16)
    step = StepInputs(torch.tensor([7, 8, 9]), torch.arange(3), meta, torch.tensor([2]))

    def rank(r: int):
        group = join(rdv, r, torch.device("cpu"), store if r == 0 else None)
        try:
            reduced = group.comm.all_reduce(torch.full((2, 3), float(r + 1)))
            gathered = group.comm.all_gather(torch.full((2, 1), float(r)), dim=-1)
            # Uneven splits: rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 3 to rank 0.
            rows = torch.arange(3, dtype=torch.float32)[:, None] + 10 * r
            moved = group.comm.all_to_all(rows, [1, 3] if r == 0 else [2, 0], [1, 2] if r == 0 else [3, 0])
            if r == 0:
                group.channel.send(Command.STEP, 5, *encode_step(step))
                received = None
            else:
                command, cache, args, payload = group.channel.receive()
                received = (command, cache, decode_step(args, payload))
            return reduced, gathered, moved, received, group.comm.timer.take()
        finally:
            group.close()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        (r0, g0, m0, _, t0), (r1, g1, m1, received, t1) = pool.map(rank, [0, 1])
    assert torch.equal(r0, torch.full((2, 3), 3.0)) and torch.equal(r1, r0)
    assert torch.equal(g0, torch.tensor([[0.0, 1.0], [0.0, 1.0]])) and torch.equal(g1, g0)
    assert m0[:, 0].tolist() == [0.0, 10.0, 11.0, 12.0] and m1[:, 0].tolist() == [1.0, 2.0]
    command, cache, got = received
    assert command is Command.STEP and cache == 5
    assert torch.equal(got.input_ids, step.input_ids)
    assert torch.equal(got.meta.slot_mapping, meta.slot_mapping)
    assert t0 > 0 and t1 > 0


@pytest.mark.parametrize("field, value", [("parallel_size", 0), ("parallel_size", 1.5),
                                          ("collective_timeout_s", 0),
                                          ("collective_timeout_s", float("inf"))])
def test_config_rejects_bad_parallel_fields(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_engine_refuses_a_given_model_with_a_group():
    with pytest.raises(ValueError, match="own shard"):
        LLMEngine(EngineConfig(parallel_size=2), model=object())


def _plan_module():
    spec = importlib.util.spec_from_file_location("parallelism_plan", PLAN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script executes
    spec.loader.exec_module(module)
    return module


def test_plan_is_derived_from_the_model():
    from services.model.config import PRESETS

    plan = _plan_module()
    config = PRESETS["grok-1"]
    assert plan.all_reduce_bytes_per_layer(config, "bfloat16") == 2 * 6144 * 2
    # The sharded model's buffers, summed over ranks, hold every parameter exactly once (norms and the
    # router are replicated and counted once).
    assert plan.parameters_over_ranks(config, 8) == config.num_parameters
    int8 = plan.rank_memory(config, 8, int8=True)
    assert 38.6e9 < int8["experts"] < 38.7e9  # one int8 expert per GPU (DESIGN.md data flow 4)
    assert plan.kv_bytes_per_token(config, 8, "bfloat16") == 2 * 64 * 1 * 128 * 2


# --- the group ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(tiny_dir() / "golden_float32.npz"))


@pytest.fixture(scope="module")
def engine2(ray_session, golden):
    # Small steps: prefills are chunked and decodes of earlier requests share steps with later prefills.
    engine = LLMEngine(EngineConfig(model=str(tiny_dir()), parallel_size=2, max_num_batched_tokens=16,
                                    max_num_seqs=4))
    yield engine
    engine.runner.shutdown()


@pytest.mark.parametrize("chunk", [None, 3])
def test_group_logits_match_reference(engine2, golden, chunk):
    for j in golden_prompts(golden):
        logits = engine2.runner.score(golden[f"prompt_{j}"], chunk_size=chunk)
        err = np.abs(logits - golden[f"logits_{j}"]).max()
        assert err <= TOL, f"prompt {j}: max |logit - golden| = {err}"


def test_group_greedy_tokens_through_the_engine(engine2, golden):
    pending = [(f"r{j}", golden[f"prompt_{j}"].tolist()) for j in golden_prompts(golden)]
    tokens = {rid: [] for rid, _ in pending}
    steps = 0
    while pending or engine2.has_unfinished():
        if pending and steps % 3 == 0:  # a new request joins the running batch every third step
            rid, ids = pending.pop(0)
            engine2.add_request(rid, ids, GREEDY)
        for out in engine2.step():
            tokens[out.request_id] += out.outputs[0].token_ids
        steps += 1
    for j in golden_prompts(golden):
        assert tokens[f"r{j}"] == golden[f"greedy_{j}"].tolist(), f"prompt {j}"
    assert engine2.block_manager.num_free_blocks == engine2.block_manager.num_blocks
    stats = engine2.stats
    assert stats.collective_s_total > 0 and stats.step_broadcast_s_total > 0
    assert stats.histograms["collective_s"].count == stats.steps
    # Each route (token, chosen expert) ran on exactly one rank.
    assert len(stats.rank_expert_tokens) == 2
    assert sum(stats.rank_expert_tokens) == sum(map(sum, stats.expert_tokens)) > 0
    # ... and Prometheus sees the same numbers.
    from services.gateway.metrics import GatewayMetrics
    from tests.test_gateway_support import metric

    metrics = GatewayMetrics("m")
    metrics.fold(engine2.metrics_snapshot("r0"))
    text = metrics.render().decode()
    for rank, routes in enumerate(stats.rank_expert_tokens):
        assert metric(text, "grok_serve:rank_expert_tokens_total", replica="r0", rank=str(rank)) == routes
    assert metric(text, "grok_serve:collective_seconds_total", replica="r0") == stats.collective_s_total


def test_each_rank_loads_less_than_one_rank(engine2):
    source = str(tiny_dir())
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # each measurement is its own fresh process
        single, *ranks = pool.map(lambda sr: _measure(source, *sr), [(1, 0), (2, 0), (2, 1)])
    for report in ranks:
        assert report.model_bytes < 0.6 * single.model_bytes  # experts and vocabulary split
        assert report.peak_rss_delta_bytes < single.peak_rss_delta_bytes, (report, single)
    # The group measured each of its ranks while loading too.
    assert [r.rank for r in engine2.group.load_reports] == [0, 1]
    assert all(r.model_bytes == ranks[0].model_bytes for r in engine2.group.load_reports)


def _measure(source, size, rank):
    from tests.load_probe import measure_load

    return measure_load(source, size, rank)


@pytest.mark.timeout(900)
def test_killed_worker_fails_in_flight_requests(ray_session):
    # A collective timeout far beyond the test's own deadline: failing in time proves the death was
    # noticed at once, not when a collective gave up waiting.
    engine = LLMEngine(EngineConfig(model="tiny", parallel_size=2, collective_timeout_s=600.0))
    try:
        asyncio.run(asyncio.wait_for(_generate_then_kill(engine), timeout=400))
    finally:
        engine.runner.shutdown()


async def _generate_then_kill(engine):
    from services.engine.async_engine import AsyncEngine, EngineDeadError

    async_engine = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    started = asyncio.Event()
    results: dict[str, object] = {}

    async def consume(rid: str, prompt: list[int]) -> None:
        try:
            async for _ in async_engine.generate(prompt, params, rid):
                started.set()
            results[rid] = "finished"
        except EngineDeadError as exc:
            results[rid] = exc

    # Held to one step until the kill, the requests are in flight when rank 1 dies on any machine.
    with StepGate(engine) as gate:
        gate.allow(1)
        tasks = [asyncio.create_task(consume(f"k{i}", [5 + i, 7, 11, 13])) for i in range(3)]
        await asyncio.wait_for(started.wait(), timeout=300)
        ray.kill(engine.group.workers[0])
    await asyncio.gather(*tasks)
    assert all(isinstance(r, EngineDeadError) for r in results.values()), results
    assert "rank 1" in str(async_engine.error)
    assert not async_engine.is_healthy
    await async_engine.shutdown()


@pytest.mark.timeout(900)
def test_a_worker_lost_while_idle_fails_the_health_check(ray_session):
    from services.engine.async_engine import AsyncEngine, EngineDeadError, LocalEngineClient

    engine = LLMEngine(EngineConfig(model="tiny", parallel_size=2, collective_timeout_s=600.0))
    client = LocalEngineClient(AsyncEngine(engine))

    async def unhealthy_after_the_kill() -> EngineDeadError:
        await client.check_health()  # a live, idle group is healthy
        ray.kill(engine.group.workers[0])
        deadline = time.monotonic() + 300
        while True:
            try:
                await client.check_health()
            except EngineDeadError as exc:
                return exc
            assert time.monotonic() < deadline, "the lost rank was never noticed"
            await asyncio.sleep(0.5)

    try:
        error = asyncio.run(unhealthy_after_the_kill())
        assert "rank 1" in str(error)
        with pytest.raises(EngineDeadError):  # and it stays so: Serve replaces the replica
            asyncio.run(client.check_health())
    finally:
        engine.runner.shutdown()


@pytest.mark.timeout(900)
def test_stalled_worker_becomes_an_engine_error(ray_session):
    # 30 s: far above a healthy step's collective even on a starved machine, so only the stop trips it.
    engine = LLMEngine(EngineConfig(model="tiny", parallel_size=2, collective_timeout_s=30.0))
    pid = ray.get(engine.group.workers[0].pid.remote(), timeout=600)
    try:
        time.sleep(31)  # idle longer than the timeout: waiting for the next step has no deadline
        engine.add_request("s", [5, 7, 11], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        engine.step()
        os.kill(pid, signal.SIGSTOP)
        # Rank 1 takes part in every step, so the request cannot finish while it is stopped; the
        # test's own timeout, far beyond the collective's, catches a hang.
        with pytest.raises(ParallelGroupError, match="rank 1"):
            while engine.has_unfinished():
                engine.step()
    finally:
        os.kill(pid, signal.SIGKILL)
        engine.runner.shutdown()


@pytest.mark.timeout(900)
def test_worker_error_reaches_rank0_at_once(ray_session):
    # A collective timeout beyond the test's own: the error must come from rank 1's report.
    engine = LLMEngine(EngineConfig(model="tiny", parallel_size=2, collective_timeout_s=600.0))
    try:
        runner = engine.runner
        meta = AttentionMetadata.for_single_sequence(0, 2, torch.tensor([0]), runner.block_size)
        inputs = StepInputs(torch.tensor([5, 7]), torch.arange(2), meta, torch.tensor([1]))
        # Cache 7 was never allocated: rank 1 raises before its first collective, rank 0 is inside one.
        with pytest.raises(ParallelGroupError, match="KeyError"):
            runner._run(7, inputs, count_experts=False)
        with pytest.raises(ParallelGroupError):
            engine.runner.score([5, 7])  # the group stays failed
    finally:
        engine.runner.shutdown()


@pytest.mark.timeout(900)
def test_group_uses_the_replicas_placement_group(ray_session):
    # A Serve replica that declared one bundle per rank runs in bundle 0; its worker takes bundle 1.
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 0.25}, {"CPU": 0.25}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=600)
    try:
        replica = ray.remote(_Replica).options(
            num_cpus=0.25, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote()
        owned, tokens, single = ray.get(replica.generate.remote(), timeout=600)
        assert owned is False
        assert tokens == single
    finally:
        remove_placement_group(pg)


class _Replica:
    def generate(self):
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        engine = LLMEngine(EngineConfig(model="tiny", parallel_size=2))
        try:
            owned = engine.group.placement.owned
            tokens = _run_one(engine, params)
        finally:
            engine.runner.shutdown()
        return owned, tokens, _run_one(LLMEngine(EngineConfig(model="tiny")), params)


def _run_one(engine, params):
    engine.add_request("x", [5, 7, 11, 13], params)
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
    return tokens
