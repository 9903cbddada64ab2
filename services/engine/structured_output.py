"""Structured outputs: what a request's output must match, and its compilation into a token matcher.

A `StructuredOutput` names one constraint: a JSON schema, any JSON object, a regular expression, a
list of choices, or a grammar (Lark, as llguidance reads it; GBNF, recognised by its `::=` rules, is
converted to Lark first). The grammar engine is llguidance: it turns the constraint into a matcher
that, at each step, says which tokens may come next (a bitmask over the vocabulary) and is advanced
by the token sampled.

`GrammarCompiler` compiles at admission, off the step loop: a constraint the engine cannot compile is
a `RequestRejected` naming the problem, and nothing is queued. Compiled matchers are kept per
constraint in a bounded LRU cache; each sequence gets its own copy of the cached one, so a repeated
schema costs a copy, not a compilation.

JSON is generated compactly (no whitespace between tokens): a schema may allow whitespace with its
own `"x-guidance": {"whitespace_flexible": true}`. The grammar's vocabulary is the tokenizer's byte
strings: SentencePiece's "▁" is a space, byte-fallback pieces are their byte, and ids that carry no
text (pad/bos/eos/unk, unused ids) are special tokens the grammar never produces; eos ends it.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from services.engine.api import Rejection, RequestRejected
from services.model.tokenizer import UNK_ID, Tokenizer

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# A JSON object with any content: what OpenAI's `response_format: {"type": "json_object"}` promises.
_ANY_OBJECT = '{"type": "object"}'
_JSON_DEFAULTS = {"whitespace_flexible": False}
DEFAULT_CACHE_SIZE = 256


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a request's output. `spec` is the schema as canonical JSON text, the regex,
    the choices as a JSON list, or the grammar text; `param` is the request field it came from, so an
    error can name it."""

    kind: str
    spec: str
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RequestRejected(Rejection(f"structured output kind must be one of {KINDS}, got "
                                            f"{self.kind!r}", self.param))
        if not isinstance(self.spec, str):
            raise RequestRejected(Rejection(f"{self.param} must be a string, got {self.spec!r}", self.param))

    @classmethod
    def json_schema(cls, schema: Any, param: str = "response_format") -> StructuredOutput:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise RequestRejected(Rejection(f"{param}: the JSON schema is not valid JSON: {exc}",
                                                param)) from None
        if not isinstance(schema, (dict, bool)):
            raise RequestRejected(Rejection(f"{param}: a JSON schema must be an object, got {schema!r}",
                                            param))
        return cls("json", json.dumps(schema, ensure_ascii=False), param)

    @classmethod
    def json_object(cls, param: str = "response_format") -> StructuredOutput:
        return cls("json_object", _ANY_OBJECT, param)

    @classmethod
    def choice(cls, choices: Seq[str], param: str = "guided_choice") -> StructuredOutput:
        if (isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices
                or not all(isinstance(c, str) for c in choices)):
            raise RequestRejected(Rejection(f"{param} must be a non-empty list of strings, got {choices!r}",
                                            param))
        return cls("choice", json.dumps(list(choices), ensure_ascii=False), param)

    @property
    def size(self) -> int:
        """Characters of the constraint, for limits.max_structured_output_chars."""
        return len(self.spec)

    def grammar(self) -> str:
        """The constraint as an llguidance grammar (not yet checked)."""
        from llguidance import LLMatcher

        if self.kind in ("json", "json_object"):
            return LLMatcher.grammar_from_json_schema(self.spec, defaults=_JSON_DEFAULTS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            # Lark string literals take JSON's escapes.
            options = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(self.spec))
            return LLMatcher.grammar_from_lark(f"start: {options}")
        text = self.spec
        if "::=" in text:
            from llguidance.gbnf_to_lark import any_to_lark

            text = any_to_lark(text)
        return LLMatcher.grammar_from_lark(text)


class _Vocabulary:
    """The tokenizer as llguidance's TokenizerWrapper reads it: each id's bytes, special ids marked
    with a leading 0xFF (llguidance's convention), and an encoder for the text it tokenizes itself
    (only forced continuations; masks come from the byte strings alone)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for token_id in range(vocab_size):
            if token_id >= tokenizer.vocab_size or token_id == UNK_ID or tokenizer.is_control(token_id):
                self.special_token_ids.append(token_id)
                self.tokens.append(b"\xff<special_%d>" % token_id)
            else:
                self.tokens.append(tokenizer.token_bytes(token_id))
        self._ids_by_bytes: dict[bytes, int] | None = None

    def __call__(self, text: bytes) -> list[int]:
        """Ids whose bytes are exactly `text`. llguidance tokenizes the text a grammar forces and masks
        by those ids, so SentencePiece's dummy prefix (an "▁" it puts in front of every text, even one
        that starts with a space) must go: the first piece loses its space, spelled anew."""
        ids = self._tokenizer.encode(text.decode("utf-8", errors="replace"))
        if ids and self._bytes(ids[:1]).startswith(b" ") and self._bytes(ids) == b" " + text:
            ids = [*self._spell(self._bytes(ids[:1])[1:]), *ids[1:]]
        # Text that is not valid UTF-8 (a character cut by the grammar's forced bytes) goes byte by byte.
        return ids if self._bytes(ids) == text else self._spell(text, whole=False)

    def _bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.tokens[i] for i in ids)

    def _spell(self, data: bytes, whole: bool = True) -> list[int]:
        """`data` as one piece if the vocabulary has it (and `whole`), else byte by byte
        (SentencePiece's byte-fallback pieces, or the byte tokenizer's bytes)."""
        if self._ids_by_bytes is None:
            self._ids_by_bytes = {}
            for token_id, token in enumerate(self.tokens):
                if token and not token.startswith(b"\xff"):
                    self._ids_by_bytes.setdefault(token, token_id)
        if not data:
            return []
        if whole and data in self._ids_by_bytes:
            return [self._ids_by_bytes[data]]
        return [self._ids_by_bytes[data[i:i + 1]] for i in range(len(data))]


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe (compilation runs in worker threads while
    the step thread copies matchers). Building the grammar vocabulary is deferred to the first
    constrained request, so an engine that never sees one pays nothing."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE):
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._cache_size = cache_size
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self.compilations = 0

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance import LLTokenizer, TokenizerWrapper

                vocab = _Vocabulary(self._tokenizer, self._vocab_size)
                self._ll_tokenizer = LLTokenizer(TokenizerWrapper(vocab), n_vocab=self._vocab_size)
            return self._ll_tokenizer

    def compile(self, constraint: StructuredOutput):
        """A fresh matcher for `constraint` (an llguidance LLMatcher), or RequestRejected naming why it
        cannot be compiled."""
        with self._lock:
            template = self._cache.get(constraint)
            if template is not None:
                self._cache.move_to_end(constraint)
                return template.deep_copy()
        template = self._build(constraint)
        with self._lock:
            self._cache[constraint] = template
            self._cache.move_to_end(constraint)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return template.deep_copy()

    def _build(self, constraint: StructuredOutput):
        from llguidance import LLMatcher

        try:
            grammar = constraint.grammar()
        except ValueError as exc:
            raise RequestRejected(Rejection(f"{constraint.param}: {exc}", constraint.param)) from None
        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestRejected(Rejection(
                f"{constraint.param}: the {_NAMES[constraint.kind]} cannot be compiled: "
                f"{matcher.get_error().strip()}", constraint.param))
        self.compilations += 1
        return matcher


_NAMES = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex",
          "choice": "choice list", "grammar": "grammar"}
