"""The streamed text of one sequence: incremental detokenization and stop strings.

A stop string may span token boundaries, so text that could still turn into one is held back: a
match found later always starts at or after what was already streamed, and the text is cut where it
starts. Shared by the native engine and the vLLM engine client, so both stream and stop alike.
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
        self._finished = False

    def add(self, token_ids: list[int], check_stop: bool = True) -> str | None:
        """Appends the tokens' text; returns the stop string that now matches (the caller finishes
        the sequence), else None."""
        self.text += self.detokenizer.add(token_ids)
        if not check_stop or not self.stop or self.stop_at is not None:
            return None
        hits = [(i, stop) for stop in self.stop if (i := self.text.find(stop, self.emitted_chars)) >= 0]
        if not hits:
            return None
        self.stop_at, stop = min(hits)
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
