"""Tokenizers for Grok-1: the released SentencePiece model, and a byte-level fallback for dummy models.

Both map text to ids and back with the Grok-1 special ids: pad 0, bos 1, eos 2, unk 3.

Decoding works on bytes: every id contributes a fixed byte string (`Tokenizer.token_bytes`) and the
result is decoded as UTF-8, each byte that is not part of a valid sequence becoming one U+FFFD, and a
control id (bos/eos/pad) ending any incomplete character before it. These are SentencePiece's own rules,
so `SentencePieceTokenizer.decode` equals `SentencePieceProcessor.decode` for every id sequence.
Because they are local, `IncrementalDetokenizer` streams text with O(new tokens) work: it only holds
back the tail of a multi-byte character that is not complete yet (SentencePiece byte-fallback pieces).

SentencePiece adds a dummy space in front of the text when encoding and drops it again when decoding:
the first non-control piece loses its leading "▁". `token_bytes(..., leading=True)` applies that rule.

Ids that a model's vocabulary has beyond the tokenizer's pieces ("unused" ids: 260.. for
`ByteTokenizer`, padding rows for a SentencePiece model smaller than the embedding) carry no text: they
decode to nothing, or to the placeholder "[UNUSED:<id>]" when `skip_special=False`. A model with random
weights emits them often; dropping them keeps the output readable.
"""
from __future__ import annotations

import codecs
import operator
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"

# Undecodable bytes come out of "surrogateescape" as U+DC80..U+DCFF, one per byte; valid UTF-8 never
# decodes to a lone surrogate, so every match is an error byte.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def unused_placeholder(token_id: int) -> str:
    return f"[UNUSED:{token_id}]"


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine and the API need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str: ...

    def token_bytes(self, token_id: int, skip_special: bool = True, leading: bool = False) -> bytes:
        """The bytes `token_id` adds to the decoded text; `leading`: only control ids precede it."""
        ...

    def is_control(self, token_id: int) -> bool:
        """Whether the id carries no text and leaves the sequence start where it is (pad/bos/eos, unused)."""
        ...


def check_id(token_id: object, vocab_size: int) -> int:
    try:
        value = operator.index(token_id)  # accepts numpy and torch integers, rejects floats
    except TypeError:
        raise TypeError(f"token ids must be integers, got {token_id!r} ({type(token_id).__name__})") from None
    if not 0 <= value < vocab_size:
        raise ValueError(f"token id {value} is out of range [0, {vocab_size})")
    return value


def utf8_bytes(text: object) -> bytes:
    """The UTF-8 of text to encode; rejects what no tokenizer can encode."""
    if not isinstance(text, str):
        raise TypeError(f"encode() expects str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: lone surrogate {text[exc.start]!r} at index "
                         f"{exc.start}") from None


def decode_ids(tokenizer: Tokenizer, ids: Iterable[int], skip_special: bool = True) -> str:
    """The text of a whole id sequence (what both tokenizers' `decode` return)."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special)
    return detokenizer.add(ids) + detokenizer.finish()


class SentencePieceTokenizer:
    """The Grok-1 `tokenizer.model` (or any SentencePiece model), decoding exactly as SentencePiece does.

    `vocab_size` may exceed the number of pieces (an embedding padded for sharding): the extra ids are
    unused ids. `encode` matches `SentencePieceProcessor.encode`, so user-defined symbols such as
    "<|separator|>" written in the text become their single id, as in the release.
    """

    # Piece kinds, one byte per id.
    _TEXT, _TEXT_SPACED, _BYTE, _CONTROL, _UNKNOWN = range(5)

    def __init__(self, model_file: str | Path, vocab_size: int | None = None) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"cannot load SentencePiece model {path}: {exc}") from exc
        num_pieces = self._sp.get_piece_size()
        if vocab_size is None:
            vocab_size = num_pieces
        if not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if vocab_size < num_pieces:
            raise ValueError(f"SentencePiece model {path} has {num_pieces} pieces, more than the model's "
                             f"vocab_size {vocab_size}")
        self._vocab_size = vocab_size
        self._num_pieces = num_pieces
        self._pieces: list[str] = self._sp.id_to_piece(list(range(num_pieces)))
        self._surfaces, self._kinds = self._tables()

    def _tables(self) -> tuple[list[bytes], bytes]:
        sp = self._sp
        surfaces: list[bytes] = []
        kinds = bytearray()
        unk_surface = sp.decode([sp.unk_id()]).encode("utf-8") if sp.unk_id() >= 0 else b""
        for token_id, piece in enumerate(self._pieces):
            if sp.is_control(token_id):
                kind, surface = self._CONTROL, b""
            elif sp.is_unknown(token_id):
                kind, surface = self._UNKNOWN, unk_surface
            elif sp.is_byte(token_id):
                kind, surface = self._BYTE, bytes([int(piece[3:5], 16)])  # pieces look like "<0xE3>"
            else:
                kind = self._TEXT_SPACED if piece.startswith("\u2581") else self._TEXT
                surface = piece.replace("\u2581", " ").encode("utf-8")
            surfaces.append(surface)
            kinds.append(kind)
        return surfaces, bytes(kinds)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_pieces(self) -> int:
        return self._num_pieces

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def piece(self, token_id: int) -> str:
        token_id = check_id(token_id, self._vocab_size)
        return self._pieces[token_id] if token_id < self._num_pieces else unused_placeholder(token_id)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        utf8_bytes(text)  # the C++ encoder would fail on a lone surrogate with an opaque message
        ids: list[int] = self._sp.encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return decode_ids(self, ids, skip_special)

    def is_control(self, token_id: int) -> bool:
        token_id = check_id(token_id, self._vocab_size)
        return token_id >= self._num_pieces or self._kinds[token_id] == self._CONTROL

    def token_bytes(self, token_id: int, skip_special: bool = True, leading: bool = False) -> bytes:
        token_id = check_id(token_id, self._vocab_size)
        if token_id >= self._num_pieces:
            return b"" if skip_special else unused_placeholder(token_id).encode()
        kind = self._kinds[token_id]
        if kind == self._CONTROL:
            return b"" if skip_special else self._pieces[token_id].encode("utf-8")
        surface = self._surfaces[token_id]
        # SentencePiece drops only the "▁" of the first text piece, never a byte piece's space.
        return surface[1:] if leading and kind == self._TEXT_SPACED else surface


class ByteTokenizer:
    """UTF-8 bytes for models without a tokenizer file: ids 0..3 pad/bos/eos/unk, id 4 + b is byte b.

    Every text encodes without unk (unk still decodes to "[UNK]", as in Grok-1). Ids from 260 to
    vocab_size - 1 are unused (see the module docstring). There is no dummy prefix, so `leading` has no
    effect.
    """

    BYTE_OFFSET = 4
    MIN_VOCAB_SIZE = BYTE_OFFSET + 256
    _SPECIAL_NAMES = ("[PAD]", "[BOS]", "[EOS]")
    _UNK_SURFACE = b"[UNK]"  # what the Grok-1 SentencePiece model decodes unk to

    def __init__(self, vocab_size: int = MIN_VOCAB_SIZE) -> None:
        if not isinstance(vocab_size, int) or vocab_size < self.MIN_VOCAB_SIZE:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {self.MIN_VOCAB_SIZE} (4 special ids + "
                             f"256 bytes), got {vocab_size!r}")
        self._vocab_size = vocab_size
        self._byte_surfaces = tuple(bytes([b]) for b in range(256))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + self.BYTE_OFFSET for b in utf8_bytes(text)]
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return decode_ids(self, ids, skip_special)

    def is_control(self, token_id: int) -> bool:
        token_id = check_id(token_id, self._vocab_size)
        return token_id < UNK_ID or token_id >= self.MIN_VOCAB_SIZE

    def token_bytes(self, token_id: int, skip_special: bool = True, leading: bool = False) -> bytes:
        token_id = check_id(token_id, self._vocab_size)
        if self.BYTE_OFFSET <= token_id < self.MIN_VOCAB_SIZE:
            return self._byte_surfaces[token_id - self.BYTE_OFFSET]
        if token_id == UNK_ID:
            return self._UNK_SURFACE
        if skip_special:
            return b""
        if token_id < UNK_ID:
            return self._SPECIAL_NAMES[token_id].encode()
        return unused_placeholder(token_id).encode()


class IncrementalDetokenizer:
    """Streams the text of a growing id sequence: each `add` returns only the new text.

    The deltas of all `add` calls plus `finish()` concatenate to `tokenizer.decode(ids, skip_special)`.
    An incomplete multi-byte character is held back until its last byte arrives (at most 3 bytes), so a
    delta never ends in a broken character. `prompt_ids` are ids that precede the streamed ones (they
    are not emitted): after a non-empty prompt the first piece keeps its leading space, as it would when
    decoding prompt and completion together.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True,
                 prompt_ids: Iterable[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._leading = all(tokenizer.is_control(token_id) for token_id in prompt_ids)
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def add(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; return the text they complete (possibly empty)."""
        try:
            batch = [operator.index(ids)]  # type: ignore[arg-type]
        except TypeError:
            batch = list(ids)  # type: ignore[arg-type]
        # Look every id up before touching any state, so an invalid id leaves the stream as it was.
        pieces = []
        leading = self._leading
        for token_id in batch:
            control = self._tokenizer.is_control(token_id)
            pieces.append((self._tokenizer.token_bytes(token_id, self._skip_special, leading), control))
            leading = leading and control
        self._leading = leading
        out = []
        pending = bytearray()
        for data, control in pieces:
            pending += data
            if control:
                # SentencePiece decodes each run of byte pieces on its own: a control id between them
                # ends an incomplete character, which then decodes as U+FFFD per byte.
                out.append(self._decoder.decode(bytes(pending), final=True))
                pending.clear()
        out.append(self._decoder.decode(bytes(pending), final=False))
        return _ESCAPED_BYTE.sub("\ufffd", "".join(out))

    def finish(self) -> str:
        """End of sequence: a held-back incomplete character becomes one U+FFFD per byte."""
        return _ESCAPED_BYTE.sub("\ufffd", self._decoder.decode(b"", final=True))

    @property
    def has_pending(self) -> bool:
        """Whether bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])


def load_tokenizer(model_dir: str | Path | None, vocab_size: int) -> Tokenizer:
    """The SentencePiece tokenizer in `model_dir/tokenizer.model` if there is one, else a ByteTokenizer.

    `model_dir=None` (a model with random weights) always gives a ByteTokenizer; a directory that does not
    exist is an error rather than a silent switch to bytes.
    """
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        path = Path(model_dir) / TOKENIZER_FILE
        if path.is_file():
            return SentencePieceTokenizer(path, vocab_size)
    return ByteTokenizer(vocab_size)
