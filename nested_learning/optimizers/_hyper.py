"""Hyper-parameter checks shared by the optimizers: each error names the argument and its value."""

from __future__ import annotations

import math


def number(name: str, value: object, low: float = 0.0, high: float = math.inf, *, high_open: bool = False) -> float:
    """``value`` as a float in [low, high] (or [low, high) with ``high_open``), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    inside = low <= value < high if high_open else low <= value <= high
    if not inside:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def positive_int(name: str, value: object) -> int:
    """``value`` as an int ≥ 1, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else ValueError."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]
