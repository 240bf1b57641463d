"""Argument checks shared by the whole package: one place for "must be a positive integer/number".

Each check raises ``ValueError`` naming the argument, the value received and what was expected, and
returns the value (as ``int``/``float``) so it can be assigned in one line:
``self.num_heads = positive_int("num_heads", num_heads)``.
"""

from __future__ import annotations

import math

__all__ = ["positive_int", "positive_float", "probability"]


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` >= ``minimum`` (default 1); booleans are refused."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` as a finite ``float`` > 0 (>= 0 with ``allow_zero``); booleans are refused."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value >= 0 if allow_zero else value > 0):
        expected = "a finite number >= 0" if allow_zero else "a positive finite number"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def probability(name: str, value) -> float:
    """``value`` as a ``float`` in ``[0, 1)`` (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)
