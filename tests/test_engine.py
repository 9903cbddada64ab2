"""Engine behaviour a user sees: sampling determinism, stop strings, n > 1, aborts, errors, streaming."""
from __future__ import annotations

import asyncio

import pytest

from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from tests.step_gate import StepGate


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", seed=0)


def texts(out):
    return [o.text for o in out.outputs]


def test_seeded_sampling_is_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate([[9, 9], [5, 6, 7], [11, 12, 13, 14]], [others, params, others])
    assert batch[1].outputs[0].token_ids == alone


def test_stop_string_spanning_tokens_is_cut(llm):
    # Whatever the random model writes, a stop string made of the text of tokens 3..5 of a greedy run
    # (several tokens, so it spans token boundaries) must end the same run right before it.
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for prompt in ("Hello", "The answer", "Grok", "abc", "x = 1", "Once upon"):
        base = llm.generate([prompt], greedy)[0].outputs[0]
        stop = llm.tokenizer.decode(base.token_ids[3:6])
        if len(stop) >= 2 and base.text.count(stop) == 1 and llm.tokenizer.decode(base.token_ids[3:4]):
            break
    else:
        pytest.fail("no greedy run with a usable stretch of text")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:base.text.find(stop)]
    assert len(out.token_ids) < len(base.token_ids)


def test_n_sequences_share_the_prompt(llm):
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=6,
                                                       ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 6 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert out.usage.completion_tokens == 18 and out.usage.prompt_tokens == 4


def test_bad_requests_are_refused_before_queueing():
    engine = LLMEngine(EngineConfig(model="tiny", max_model_len=64))
    with pytest.raises(ValueError, match="maximum context length is 64"):
        engine.add_request("a", list(range(1, 60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("b", [1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("c", [], SamplingParams())
    assert not engine.has_unfinished() and engine.scheduler.num_waiting == 0


def test_abort_frees_blocks():
    engine = LLMEngine(EngineConfig(model="tiny"))
    engine.add_request("a", list(range(1, 40)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request("a")
    outs = engine.step()
    assert outs and outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def test_async_engine_streams_and_cancels():
    async def main():
        engine = AsyncEngine(LLMEngine(EngineConfig(model="tiny")))
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        chunks = [o async for o in engine.generate([1, 2, 3], params, "full")]
        assert chunks[-1].finished and sum(len(c.outputs[0].token_ids) for c in chunks if c.outputs) == 8
        # Held to the steps handed out, the request is mid-decode when its client leaves on any machine.
        with StepGate(engine.engine) as gate:
            gate.allow(2)
            stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True), "gone")
            await stream.__anext__()
            await stream.aclose()  # the client went away
        deadline = asyncio.get_running_loop().time() + 60
        while engine.engine.has_unfinished() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        blocks = engine.engine.block_manager
        assert not engine.engine.has_unfinished() and blocks.num_free_blocks == blocks.num_blocks
        assert engine.engine.stats.aborts == 1
        with pytest.raises(ValueError):
            async for _ in engine.generate([], params, "empty"):
                pass
        assert engine.is_healthy
        await engine.shutdown()

    asyncio.run(main())
