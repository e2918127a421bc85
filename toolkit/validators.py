"""attrs validators that options classes share (torch-free, as the options classes are)."""
from __future__ import annotations


def positive_int(_, attribute, value) -> None:
    """An int above 0 (not a bool: ``True`` is an int in Python)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")
