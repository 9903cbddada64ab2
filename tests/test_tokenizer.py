"""Tokenizers: the released Grok-1 SentencePiece model (reference cases), bytes, streaming decode."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from services.model.tokenizer import (
    ByteTokenizer,
    IncrementalDetokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "grok1-reference"
MODEL_FILE = REFERENCE / "tokenizer.model"
CASES_FILE = REFERENCE / "tokenizer_cases.json"

# Japanese (incl. half-width kana), emoji that the vocabulary lacks (byte fallback), a ZWJ sequence,
# a supplementary-plane letter, accents, leading/trailing and repeated whitespace.
HARD_TEXTS = [
    "日本語のテキスト：ｶﾀｶﾅ、ひらがな、漢字。",
    "emoji 🫠🪿 and 👩‍👩‍👧‍👦 family",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math, café, naïve, Ærøskøbing",
    "  leading spaces\n\n\ttabs   and\r\nlines  ",
    "<|separator|> [BOS] literal markers",
]

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
# SentencePiece reads U+2581 in the input as its own space marker, so it decodes back as " ";
# surrogates cannot be encoded at all.
SP_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
                  max_size=40)
ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@pytest.fixture(scope="module")
def grok() -> SentencePieceTokenizer:
    if not MODEL_FILE.is_file():
        pytest.skip(f"Grok-1 reference data not found at {REFERENCE.resolve()}")
    return SentencePieceTokenizer(MODEL_FILE)


@pytest.fixture(scope="module")
def oracle(grok: SentencePieceTokenizer) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(MODEL_FILE))


@pytest.fixture(scope="module")
def cases(grok: SentencePieceTokenizer) -> list[dict]:
    return json.loads(CASES_FILE.read_text(encoding="utf-8"))


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs: object) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detokenizer.add(token_id) for token_id in ids] + [detokenizer.finish()]


def byte_piece_ids(tokenizer: SentencePieceTokenizer, ids: list[int]) -> list[int]:
    return [i for i in ids if tokenizer.piece(i).startswith("<0x")]


# --- the released SentencePiece model ------------------------------------------------------------

def test_special_ids_and_size(grok: SentencePieceTokenizer) -> None:
    assert (grok.vocab_size, grok.pad_id, grok.bos_id, grok.eos_id) == (131072, 0, 1, 2)
    assert grok.piece(3) == "[UNK]"
    assert isinstance(grok, Tokenizer)


def test_reference_cases_ids(grok: SentencePieceTokenizer, cases: list[dict]) -> None:
    assert len(cases) >= 3
    for case in cases:
        # The cases were made without BOS (none starts with id 1).
        assert grok.encode(case["text"]) == case["ids"]
        assert grok.encode(case["text"], add_bos=True) == [1, *case["ids"]]


def test_reference_cases_round_trip(grok: SentencePieceTokenizer, cases: list[dict]) -> None:
    for case in cases:
        assert grok.decode(case["ids"]) == case["text"]
        assert grok.decode([1, *case["ids"], 2]) == case["text"]


def test_streaming_equals_decode_for_reference_cases(grok: SentencePieceTokenizer, cases: list[dict]) -> None:
    for case in cases:
        deltas = stream(grok, case["ids"])
        assert "".join(deltas) == case["text"]
        assert not any("\ufffd" in delta for delta in deltas)


def test_streaming_hard_texts_use_byte_fallback_without_replacement_chars(
        grok: SentencePieceTokenizer) -> None:
    for text in HARD_TEXTS:
        ids = grok.encode(text)
        assert grok.decode(ids) == text
        deltas = stream(grok, ids)
        assert "".join(deltas) == text
        assert not any("\ufffd" in delta for delta in deltas), deltas
    assert byte_piece_ids(grok, grok.encode(HARD_TEXTS[1])), "the emoji text should need byte pieces"


def test_streaming_holds_back_incomplete_character(grok: SentencePieceTokenizer) -> None:
    ids = grok.encode("x🫠")
    byte_ids = byte_piece_ids(grok, ids)
    assert len(byte_ids) == 4
    detokenizer = IncrementalDetokenizer(grok)
    assert detokenizer.add(ids[: ids.index(byte_ids[0])]) == "x"
    for token_id in byte_ids[:3]:
        assert detokenizer.add(token_id) == ""
        assert detokenizer.has_pending
    assert detokenizer.add(byte_ids[3]) == "🫠"
    assert not detokenizer.has_pending
    assert detokenizer.finish() == ""


def test_unfinished_character_is_flushed_as_replacement(grok: SentencePieceTokenizer,
                                                        oracle: sentencepiece.SentencePieceProcessor) -> None:
    e3, x82 = oracle.piece_to_id("<0xE3>"), oracle.piece_to_id("<0x82>")  # two of the three bytes of "ア"
    detokenizer = IncrementalDetokenizer(grok)
    assert detokenizer.add([e3, x82]) == ""
    assert detokenizer.finish() == "\ufffd\ufffd" == oracle.decode([e3, x82])


def test_leading_space_marker(grok: SentencePieceTokenizer,
                              oracle: sentencepiece.SentencePieceProcessor) -> None:
    the, space = oracle.piece_to_id("\u2581The"), oracle.piece_to_id("\u2581")
    for ids in ([the], [1, the], [space, the], [space, space], [the, the], [4, the], [3, the]):
        assert grok.decode(ids) == oracle.decode(ids)
        assert "".join(stream(grok, ids)) == oracle.decode(ids)
    assert grok.decode([1, the]) == "The"
    # After a prompt the completion keeps its space, as decoding prompt + completion together would.
    prompt = grok.encode("The answer is")
    completion = grok.encode("The answer is 42")[len(prompt):]
    assert [grok.piece(i) for i in completion] == ["\u2581", "4", "2"]
    assert "".join(stream(grok, completion, prompt_ids=prompt)) == " 42"
    assert "".join(stream(grok, completion)) == "42"


def test_decode_matches_sentencepiece_on_random_ids(grok: SentencePieceTokenizer,
                                                    oracle: sentencepiece.SentencePieceProcessor) -> None:
    rng = random.Random(1234)
    byte_ids = [i for i in range(400) if oracle.is_byte(i)]
    specials = [0, 1, 2, 3, 4, oracle.piece_to_id("\u2581"), oracle.piece_to_id("\u2581The")]
    for _ in range(2000):
        ids = [rng.choice(byte_ids) if r < 0.5 else rng.choice(specials) if r < 0.7 else rng.randrange(131072)
               for r in (rng.random() for _ in range(rng.randint(0, 10)))]
        expected = oracle.decode(ids)
        assert grok.decode(ids) == expected, ids
        split = rng.randint(0, len(ids))
        detokenizer = IncrementalDetokenizer(grok)
        assert detokenizer.add(ids[:split]) + detokenizer.add(ids[split:]) + detokenizer.finish() == expected
        assert "".join(stream(grok, ids)) == expected, ids


def test_control_tokens_render_when_not_skipped(grok: SentencePieceTokenizer) -> None:
    ids = [1, *grok.encode("Hi"), 2]
    assert grok.decode(ids, skip_special=False) == "[BOS]Hi[EOS]"
    assert "".join(stream(grok, ids, skip_special=False)) == "[BOS]Hi[EOS]"


def test_sentencepiece_bad_input(grok: SentencePieceTokenizer) -> None:
    with pytest.raises(ValueError, match="131072"):
        grok.decode([422, 131072])
    with pytest.raises(ValueError, match="-1"):
        grok.decode([-1])
    with pytest.raises(TypeError):
        grok.decode([1.5])
    for bad in (b"bytes", None, 42, ["list"]):
        with pytest.raises(TypeError):
            grok.encode(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="surrogate"):
        grok.encode("a\ud800")


def test_invalid_id_leaves_stream_unchanged(grok: SentencePieceTokenizer) -> None:
    ids = grok.encode("こんにちは world")
    detokenizer = IncrementalDetokenizer(grok)
    text = detokenizer.add(ids[:2])
    with pytest.raises(ValueError, match="999999"):
        detokenizer.add([ids[2], 999999])
    text += detokenizer.add(ids[2:]) + detokenizer.finish()
    assert text == "こんにちは world"


@SETTINGS
@given(text=SP_TEXT)
def test_sentencepiece_random_text(grok: SentencePieceTokenizer, oracle: sentencepiece.SentencePieceProcessor,
                                   text: str) -> None:
    ids = grok.encode(text)
    assert ids == oracle.encode(text)
    assert grok.decode(ids) == text
    deltas = stream(grok, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas if "\ufffd" not in text)


def test_load_tokenizer(tmp_path: Path, grok: SentencePieceTokenizer) -> None:
    (tmp_path / "tokenizer.model").symlink_to(MODEL_FILE.resolve())
    loaded = load_tokenizer(tmp_path, 131072)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode("Hello") == grok.encode("Hello")
    with pytest.raises(ValueError, match=r"131072 pieces.*vocab_size 1024"):
        load_tokenizer(tmp_path, 1024)
    # An embedding padded past the pieces: the extra ids decode to nothing.
    padded = load_tokenizer(str(tmp_path), 131072 + 128)
    assert padded.vocab_size == 131200
    assert padded.decode([422, 131100, 3033]) == "The answer"
    assert padded.decode([131100], skip_special=False) == "[UNUSED:131100]"


def test_load_tokenizer_rejects_corrupt_model(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"tokenizer\.model"):
        load_tokenizer(tmp_path, 131072)


# --- bytes ---------------------------------------------------------------------------------------

def test_load_tokenizer_without_model_file(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None, 1024), ByteTokenizer)
    loaded = load_tokenizer(tmp_path, 300)
    assert isinstance(loaded, ByteTokenizer) and loaded.vocab_size == 300
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_tokenizer(tmp_path / "no-such-dir", 1024)


def test_byte_tokenizer_layout() -> None:
    tok = ByteTokenizer(1024)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (1024, 0, 1, 2)
    assert tok.encode("A") == [ord("A") + 4]
    assert tok.encode("é", add_bos=True) == [1, 0xC3 + 4, 0xA9 + 4]
    assert tok.encode("") == []
    assert isinstance(tok, Tokenizer)


def test_byte_tokenizer_vocab_too_small() -> None:
    ByteTokenizer(260)
    with pytest.raises(ValueError, match="260"):
        ByteTokenizer(259)
    with pytest.raises(ValueError):
        load_tokenizer(None, 100)


def test_byte_tokenizer_specials_and_unused_ids() -> None:
    tok = ByteTokenizer(1024)
    ids = [1, *tok.encode("ok"), 700, 3, 2, 0, 1023]
    assert tok.decode(ids) == "ok[UNK]"
    assert tok.decode(ids, skip_special=False) == "[BOS]ok[UNUSED:700][UNK][EOS][PAD][UNUSED:1023]"
    assert "".join(stream(tok, ids)) == "ok[UNK]"
    with pytest.raises(ValueError, match="1024"):
        tok.decode([1024])
    with pytest.raises(TypeError):
        tok.encode(b"ok")  # type: ignore[arg-type]


def test_byte_tokenizer_streams_whole_characters() -> None:
    tok = ByteTokenizer(512)
    ids = tok.encode("aア🚀")
    deltas = stream(tok, ids)
    assert deltas == ["a", "", "", "ア", "", "", "", "🚀", ""]


def test_byte_tokenizer_random_ids_stream_like_decode() -> None:
    tok = ByteTokenizer(1024)
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(1024) if rng.random() < 0.3 else rng.randrange(0x80 + 4, 260)
               for _ in range(rng.randint(0, 12))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


@SETTINGS
@given(text=ANY_TEXT)
def test_byte_tokenizer_random_text(text: str) -> None:
    tok = ByteTokenizer(1024)
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    deltas = stream(tok, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas if "\ufffd" not in text)
