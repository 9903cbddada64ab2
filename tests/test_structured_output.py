"""Structured outputs in the engine: grammar-constrained decoding with llguidance on the random-weight
tiny model. Seeded sampling makes every output deterministic; schemas bound their strings and arrays so
that the grammar completes well within max_tokens (a random model would otherwise wander)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from services.engine import LLM, SamplingParams
from services.engine.api import RequestRejected
from services.engine.sampler import GrammarMasks, apply_token_bitmask
from services.engine.structured_output import GrammarCompiler, StructuredOutput, _Vocabulary
from services.model.tokenizer import SentencePieceTokenizer
from tests.conftest import REFERENCE

NAME = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0},
                                                  "admin": {"type": "boolean"}},
                 "required": ["id", "admin"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
     "required": ["user", "scores"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]},
                                                "minItems": 1, "maxItems": 4}},
     "required": ["color", "sizes"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": NAME, "v": {"type": "boolean"}},
                                "required": ["k", "v"], "additionalProperties": False},
     "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"status": {"const": "ok"}, "note": {"anyOf": [NAME, {"type": "null"}]}},
     "required": ["status", "note"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", seed=0)


def _one(llm, params, prompt="The answer:"):
    [out] = llm.generate([prompt], params)
    return out.outputs[0]


def test_outputs_validate_against_many_schemas(llm):
    params = [SamplingParams(max_tokens=400, seed=seed, structured_output=StructuredOutput.json_schema(schema))
              for schema in SCHEMAS for seed in (1, 2)]
    outs = llm.generate(["The answer:"] * len(params), params)
    for p, out in zip(params, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), json.loads(p.structured_output.spec))


def test_regex_choice_grammar_and_json_object(llm):
    regex = _one(llm, SamplingParams(max_tokens=50, seed=3,
                                     structured_output=StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,4}")))
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", regex.text) and regex.finish_reason == "stop"
    for choices in (["yes", "no", 'maybe "so"'], ["Ünïcode ✓", "n/a"]):
        for seed in range(3):
            picked = _one(llm, SamplingParams(max_tokens=20, seed=seed,
                                              structured_output=StructuredOutput.choice(choices)))
            assert picked.text in choices and picked.finish_reason == "stop"
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/'
    grammar = _one(llm, SamplingParams(max_tokens=200, seed=4, structured_output=StructuredOutput("grammar", lark)))
    assert re.fullmatch(r"\([1-9](\+[1-9])*\)", grammar.text)
    gbnf = 'root ::= "x" [0-9] [0-9]'
    assert re.fullmatch(r"x[0-9]{2}", _one(llm, SamplingParams(
        max_tokens=20, seed=5, structured_output=StructuredOutput("grammar", gbnf))).text)
    obj = _one(llm, SamplingParams(max_tokens=400, seed=7, structured_output=StructuredOutput.json_object()))
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)


def test_every_sibling_of_n_is_constrained(llm):
    schema = SCHEMAS[2]
    out = llm.generate(["x"], SamplingParams(n=3, max_tokens=100, seed=11,
                                             structured_output=StructuredOutput.json_schema(schema)))[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), schema)


def test_unconstrained_rows_are_unaffected_by_constrained_neighbours(llm):
    plain = SamplingParams(max_tokens=24, seed=42, ignore_eos=True)
    alone = _one(llm, plain).token_ids
    constrained = SamplingParams(max_tokens=200, seed=1, structured_output=StructuredOutput.json_schema(SCHEMAS[1]))
    outs = llm.generate(["x", "The answer:", "y"], [constrained, plain, constrained])
    assert outs[1].outputs[0].token_ids == alone


@pytest.mark.parametrize("constraint, words", [
    (StructuredOutput.json_schema({"type": "nosuchtype"}), "JSON schema"),
    (StructuredOutput("regex", "[a-", "guided_regex"), "regex"),
    (StructuredOutput("grammar", "start: undefined_rule", "guided_grammar"), "grammar"),
])
def test_a_constraint_that_cannot_compile_is_rejected_before_queueing(llm, constraint, words):
    with pytest.raises(RequestRejected) as info:
        llm.engine.add_request("bad", [5, 6], SamplingParams(max_tokens=5, structured_output=constraint))
    assert info.value.param == constraint.param and words in str(info.value)
    assert not llm.engine.has_unfinished()


def test_bad_specs_and_combinations_are_rejected():
    with pytest.raises(RequestRejected, match="not valid JSON"):
        StructuredOutput.json_schema("{nope")
    with pytest.raises(RequestRejected, match="non-empty list of strings"):
        StructuredOutput.choice([])
    with pytest.raises(RequestRejected) as info:
        SamplingParams(min_tokens=2, structured_output=StructuredOutput.json_object())
    assert info.value.param == "min_tokens"


def test_compilations_are_cached_and_the_cache_is_bounded(llm):
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.model_info.vocab_size, cache_size=2)
    specs = [StructuredOutput("regex", f"a{i}") for i in range(3)]
    first = compiler.compile(specs[0])
    again = compiler.compile(specs[0])
    assert compiler.compilations == 1 and first is not again  # one compilation, a matcher per request
    compiler.compile(specs[1])
    compiler.compile(specs[2])  # evicts specs[0]
    compiler.compile(specs[0])
    assert compiler.compilations == 4


def test_the_grok1_sentencepiece_vocabulary_constrains_real_tokens():
    """The released tokenizer: "▁" pieces are spaces, byte-fallback pieces their byte, control ids never
    allowed, and text the grammar forces is spelled without SentencePiece's dummy prefix."""
    path = REFERENCE / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"the Grok-1 tokenizer is not at {path}")
    tokenizer = SentencePieceTokenizer(path)
    vocab = tokenizer.vocab_size
    compiler = GrammarCompiler(tokenizer, vocab)
    for text in ('{"a":1}', "x y", "ü{"):
        assert tokenizer.decode(_Vocabulary(tokenizer, vocab)(text.encode())) == text
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": -50, "maximum": 50},
                                               "e": {"enum": ["x y", "ü"]}},
              "required": ["name", "n", "e"], "additionalProperties": False}
    masks = GrammarMasks()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        matcher = compiler.compile(StructuredOutput.json_schema(schema))
        ids: list[int] = []
        while not matcher.is_stopped() and len(ids) < 200:
            logits = torch.randn(1, vocab, generator=generator)
            logits = apply_token_bitmask(logits, torch.tensor([0]), masks([matcher], vocab))
            token = int(logits.argmax())
            assert matcher.consume_token(token) and not tokenizer.is_control(token) or token == tokenizer.eos_id
            if token == tokenizer.eos_id:
                break
            ids.append(token)
        jsonschema.validate(json.loads(tokenizer.decode(ids)), schema)


def test_constraints_survive_preemption():
    """Too few KV blocks for all four: sequences are preempted and recomputed; each matcher keeps its
    place because the tokens it consumed are kept."""
    llm = LLM("tiny", seed=0, num_kv_blocks=12, block_size=16, max_model_len=192)
    schema = SCHEMAS[3]
    params = [SamplingParams(max_tokens=150, seed=seed, structured_output=StructuredOutput.json_schema(schema))
              for seed in range(4)]
    outs = llm.generate([[5 + i] * 30 for i in range(4)], params)
    assert llm.engine.stats.preemptions > 0
    for out in outs:
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_a_bitmask_masks_exactly_the_disallowed_tokens_of_the_constrained_rows():
    vocab = 70  # not a multiple of 32: the last word is partly padding
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=generator)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32, generator=generator)
    out = apply_token_bitmask(logits, torch.tensor([1, 3]), bitmask)
    for j, row in enumerate((1, 3)):
        for token in range(vocab):
            allowed = (int(bitmask[j, token // 32]) >> (token % 32)) & 1
            assert out[row, token] == (logits[row, token] if allowed else float("-inf"))
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
