"""Structured outputs over gRPC: the SamplingParams.structured_output message constrains the output on
the random-weight tiny model; a constraint that cannot compile is INVALID_ARGUMENT naming the field."""
from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest

from services.engine.async_engine import AsyncEngine, LocalEngineClient
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.gateway.proto import grok_serve_pb2 as pb
from tests.test_grpc import AUTH, KEY, RPC_TIMEOUT, Served, code_of
from tests.test_structured_output import SCHEMAS


@pytest.fixture(scope="module")
def served():
    s = Served(LocalEngineClient(AsyncEngine(LLMEngine(EngineConfig(model="tiny")))), frozenset({KEY}))
    yield s
    s.close()


def _generate(served, so: pb.StructuredOutput, seed: int = 1, max_tokens: int = 400) -> pb.SequenceOutput:
    request = pb.GenerateRequest(text="Data:", sampling_params=pb.SamplingParams(
        max_tokens=max_tokens, seed=seed, structured_output=so))
    [out] = served.stub.Generate(request, metadata=AUTH, timeout=RPC_TIMEOUT).outputs
    assert out.finish_reason == pb.FINISH_REASON_STOP
    return out


def test_each_kind_constrains_the_output(served):
    for i, schema in enumerate(SCHEMAS):
        out = _generate(served, pb.StructuredOutput(json_schema=json.dumps(schema)), seed=i)
        jsonschema.validate(json.loads(out.text), schema)
    # Free-form strings make a random model's object long: room up to the context's end.
    obj = _generate(served, pb.StructuredOutput(json_object=True), max_tokens=2000)
    assert isinstance(json.loads(obj.text), dict)
    assert re.fullmatch(r"[a-c]{2}[0-9]", _generate(served, pb.StructuredOutput(regex="[a-c]{2}[0-9]")).text)
    choices = ["red", "green"]
    assert _generate(served, pb.StructuredOutput(choice=pb.Choices(choices=choices))).text in choices
    assert re.fullmatch(r"x+y", _generate(served, pb.StructuredOutput(grammar='start: /x+/ "y"')).text)


@pytest.mark.parametrize("so", [pb.StructuredOutput(json_schema='{"type": "nosuch"}'),
                                pb.StructuredOutput(regex="(open"), pb.StructuredOutput(),
                                pb.StructuredOutput(json_schema="{not json")])
def test_a_bad_constraint_is_invalid_argument(served, so):
    request = pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(max_tokens=4, structured_output=so))
    for call in (served.stub.Generate, served.stub.GenerateStream):
        err = code_of(call, request, metadata=AUTH, timeout=RPC_TIMEOUT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured_output" in err.details()
    assert served.client.engine.engine.num_requests == 0
