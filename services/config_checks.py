"""Checks the frozen configuration dataclasses share: each rule written once, each error naming the
option as the user wrote it (`owner.name`)."""
from __future__ import annotations

import math


class ConfigError(ValueError):
    """An invalid option (wrong type or out of range); callers catch it as a ValueError."""


def positive_int(owner: str, name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is an int subclass, but `true` as a count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{owner}.{name} must be a positive integer{' or null' if allow_none else ''}, "
                          f"got {value!r}")


def non_negative_number(owner: str, name: str, value: object, positive: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        raise ConfigError(f"{owner}.{name} must be a {'positive' if positive else 'non-negative'} number, "
                          f"got {value!r}")
