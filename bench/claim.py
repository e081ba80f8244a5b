"""Claims as data: what a paper states, the runs that measure it, and the rule that decides it.

An adapter declares its claims (``Method.claims``); ``bench claims`` (bench/claims.py) plans the
runs (shared between claims, reused from MLflow when a FINISHED run with the same protocol hash
exists), runs what is missing and gives one verdict per claim: holds, does not hold, not measured.
This module is plain data at the bottom of the layers: it imports nothing of the harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

RELATIONS = ("less", "greater", "within", "at-most", "at-least", "minimum-inside", "decreasing", "increasing")
TOLERANCES = ("ci", "margin")
VERDICTS = ("holds", "does not hold", "not measured")


@dataclass(frozen=True)
class Arm:
    """One configuration a claim measures: a ``bench run`` per seed, at full size and at --quick size.

    ``None`` fields take the run spec's resolved defaults (the method's data set, sample count, metrics).
    """

    method: str
    steps: int = 50
    options: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    dataset: str | None = None
    num_samples: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    quick_num_samples: int | None = None  # --quick and the default test suite
    quick_seeds: tuple[int, ...] | None = None
    metrics: tuple[str, ...] | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class Claim:
    """A paper's statement, decided by ``relation`` over the values of ``metric`` in ``arms`` (in order).

    Relations: ``less`` / ``greater`` (the first arm's value against the second's), ``within`` (|a - b| <=
    margin), ``at-most`` / ``at-least`` (the first arm against ``bound``), ``minimum-inside`` (an inner arm is
    below both ends: a U shape), ``decreasing`` / ``increasing`` (along the arms). Tolerance ``ci``: the 95%
    t-interval over seeds (paired by seed for two arms) must lie on the claimed side; ``margin``: the means must
    differ by at least ``margin`` (or lie within it, for ``within``).
    """

    id: str  # unique within its method, e.g. "more-steps-lower-fid"
    statement: str  # what the paper says, in words
    reference: str  # the paper's numbers and where they are (table, figure)
    metric: str  # an output key, e.g. "fid"
    arms: tuple[tuple[str, Arm], ...]  # (label, arm) in the order the relation reads them
    relation: str = "less"
    tolerance: str = "ci"
    margin: float = 0.0
    bound: float | None = None
    note: str = ""  # why it may not hold on the embedded world, what differs from the paper

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"claim {self.id!r}: relation {self.relation!r} is not one of {', '.join(RELATIONS)}")
        if self.tolerance not in TOLERANCES:
            raise ValueError(f"claim {self.id!r}: tolerance {self.tolerance!r} is not one of {', '.join(TOLERANCES)}")
        if self.relation in ("at-most", "at-least") and self.bound is None:
            raise ValueError(f"claim {self.id!r}: relation {self.relation!r} needs a bound")
        if not self.arms:
            raise ValueError(f"claim {self.id!r} has no arms")
