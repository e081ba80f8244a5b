"""The one argument validator of the adapters' ``Args.__post_init__``: each raises ValueError naming the option.

Numbers refuse booleans, and floats refuse nan and inf unless ``finite=False``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_option(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, integer: bool = False,
                 finite: bool = True, lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is a number (an int where ``integer``) within [lo, hi] (open ends where
    asked); ``optional``: None passes."""
    if optional and value is None:
        return
    kind = "an integer" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok and not integer and finite and not math.isfinite(value):
        ok = False
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bounds = []
        if lo is not None:
            bounds.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            bounds.append(f"{'<' if hi_open else '<='} {hi}")
        if lo is not None and hi is not None and not lo_open and not hi_open:
            bounds = [f"in [{lo}, {hi}]"]
        what = f"{kind} {' and '.join(bounds)}".strip()
        if finite and not integer:
            what = f"a finite {what[2:] if what.startswith('a ') else what}"
        raise ValueError(f"{flag(name)} must be {what}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any], optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (None passes where ``optional``)."""
    choices = tuple(choices)
    if optional and value is None:
        return
    if value not in choices:
        raise ValueError(f"{flag(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_bool(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bool):
        raise ValueError(f"{flag(name)} must be true or false, got {value!r}")
