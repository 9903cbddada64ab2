"""The streamed text of one sequence: incremental detokenization and stop strings.

A stop string may span token boundaries, so text that could still turn into one is held back: a
match found later always starts at or after what was already streamed, and the text is cut where it
starts. Shared by the native engine and the vLLM engine client, so both stream and stop alike.

Stop strings are matched by their end: every match ends in the text added since the last check (an
earlier one would have been found then), so each new character is looked up once per distinct stop
length in a set of the strings of that length. The cost per token grows with the new text and the
number of distinct lengths, not with the number of stop strings.
"""
from __future__ import annotations

from services.model.tokenizer import IncrementalDetokenizer


class TextStream:
    def __init__(self, detokenizer: IncrementalDetokenizer, stop: tuple[str, ...] = ()):
        self.detokenizer = detokenizer
        self.stop = stop
        self.text = ""
        self.emitted_chars = 0
        self.stop_at: int | None = None  # where a matched stop string starts
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._by_length: dict[int, frozenset[str]] = {}
        for s in stop:
            self._by_length.setdefault(len(s), set()).add(s)  # type: ignore[union-attr]
        self._by_length = {n: frozenset(group) for n, group in sorted(self._by_length.items())}
        self._checked = 0  # the text up to here holds no stop string ending in it
        self._finished = False

    def add(self, token_ids: list[int], check_stop: bool = True) -> str | None:
        """Appends the tokens' text; returns the stop string that now matches (the caller finishes
        the sequence), else None."""
        self.text += self.detokenizer.add(token_ids)
        if not check_stop or not self.stop or self.stop_at is not None:
            return None
        best: tuple[int, str] | None = None
        text, first_end = self.text, self._checked + 1
        for end in range(first_end, len(text) + 1):
            for length, group in self._by_length.items():
                start = end - length
                if start < self.emitted_chars:
                    break  # the lengths ascend: the rest start earlier still
                if best is not None and start > best[0]:
                    continue
                candidate = text[start:end]
                if candidate in group and (best is None or (start, candidate) < best):
                    best = (start, candidate)
        self._checked = len(text)
        if best is None:
            return None
        self.stop_at, stop = best
        return stop

    def emit(self, finished: bool) -> str:
        """The text that can be streamed now; with finished, everything that is left."""
        if finished:
            if not self._finished:
                self._finished = True
                if self.stop_at is not None:
                    self.text = self.text[:self.stop_at]
                else:
                    self.text += self.detokenizer.finish()
            end = len(self.text)
        else:
            end = max(self.emitted_chars, len(self.text) - self._hold)
        out = self.text[self.emitted_chars:end]
        self.emitted_chars = max(self.emitted_chars, end)
        return out
