"""`StepGate`: hold an engine's step loop so that "still running when the client leaves" is true by
construction rather than by the CPU being slow enough.

While the gate is closed each `LLMEngine.step()` waits for a permit; `allow(n)` hands out n steps and
`wait_for_steps(n)` waits (with a generous deadline) until that many gated steps have run. Leaving the
`with` block opens the gate for good and restores the engine's own `step`.
"""
from __future__ import annotations

import threading

from typing_extensions import Self

# Generous: a gated step is one forward pass of a test model; the bound only keeps a broken test from
# hanging the suite, it never decides a pass.
DEADLINE_S = 120.0


class StepGate:
    def __init__(self, engine):
        self.engine = engine
        self.steps = 0
        self._permits = threading.Semaphore(0)
        self._open = False
        self._ran = threading.Condition()

    def _gated_step(self):
        if not self._open:
            self._permits.acquire()
        try:
            return type(self.engine).step(self.engine)
        finally:
            with self._ran:
                self.steps += 1
                self._ran.notify_all()

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    def wait_for_steps(self, n: int, timeout_s: float = DEADLINE_S) -> None:
        with self._ran:
            if not self._ran.wait_for(lambda: self.steps >= n, timeout_s):
                raise TimeoutError(f"only {self.steps} of {n} gated engine steps ran within {timeout_s} s")

    def __enter__(self) -> Self:
        self.engine.step = self._gated_step
        return self

    def __exit__(self, *exc) -> None:
        self._open = True
        self._permits.release()  # a step waiting for a permit goes on
        del self.engine.step
