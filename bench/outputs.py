"""What a metric outputs: each value's key, label, direction, number format, protocol family and tolerance.

A metric declares its ``outputs`` (``Metric.outputs``); the leaderboard, sweep, nightly, CLI and report read
them through ``lookup`` instead of keeping tables of their own. This module imports nothing of the harness.
"""

from __future__ import annotations

from dataclasses import dataclass

DIRECTIONS = ("lower", "higher", "none")


@dataclass(frozen=True)
class Output:
    """One value a metric computes."""

    key: str  # the MLflow metric key; a trailing "*" declares a family of keys by prefix (e.g. "attr_acc_*")
    label: str  # what a table's column says, naming the network that computed it on the embedded world
    direction: str = "lower"  # "lower" / "higher" is better; "none": not ranked (a count, a spread)
    fmt: str = ".3f"  # format spec of a table cell
    family: str | None = None  # the protocol family (params protocol.metrics.<family>.*) that defines the value
    tolerance: float | None = 0.05  # nightly's default relative regression tolerance; None: not checked

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"output {self.key!r}: direction {self.direction!r} is not one of {DIRECTIONS}")

    def matches(self, key: str) -> bool:
        return key.startswith(self.key[:-1]) if self.key.endswith("*") else key == self.key

    def format(self, value: float) -> str:
        return format(value, self.fmt)
