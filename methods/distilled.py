"""What the few-step students' adapters share (issue 14): the student's card, its step counts, its training budget.

A student is a model folder with a ``distillation.json`` beside its weights (bench.models.read_student): the
adapter of the paper that made it refuses a model that is not its student and a step count it was not distilled
for (one line, before sampling), and records the student's one-time training budget (``pretrain_steps``,
``pretrain_seconds``) beside the quality metrics, so that the leaderboard and sweeps place a student beside the
solvers with its cost in columns.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from bench.errors import BenchError
from bench.interfaces import DiffusionModel


def student_card(model: DiffusionModel) -> Mapping[str, Any] | None:
    return (getattr(model, "extra", None) or {}).get("distillation")


class StudentMethod:
    """Mixin of a student's adapter (before the Method base in the bases): ``students`` names the
    ``distillation.json`` methods it samples; ``any_model`` lets it also sample a model without a card (a public
    checkpoint in the same format whose card is its scheduler or UNet config: see the adapter)."""

    students: ClassVar[tuple[str, ...]] = ()
    any_model: ClassVar[bool] = False

    def check_student(self, model: DiffusionModel, steps: int) -> Mapping[str, Any] | None:
        card = student_card(model)
        if card is None:
            if self.any_model:
                return None
            raise BenchError(f"method {self.name!r} samples a student of {' or '.join(self.students)}; "  # type: ignore[attr-defined]
                             f"{model.name!r} has no distillation.json (not a distilled model)")
        if card.get("method") not in self.students:
            raise BenchError(f"method {self.name!r} samples a student of {' or '.join(self.students)}; "  # type: ignore[attr-defined]
                             f"{model.name!r} was made by {card.get('method')!r}")
        allowed = card.get("steps")
        if allowed is not None and int(steps) not in [int(s) for s in allowed]:
            raise BenchError(f"{model.name!r} was distilled for {' or '.join(str(s) for s in allowed)} step(s); "
                             f"--steps {steps} would sample it off its grid")
        return card

    def student_budget(self, model: DiffusionModel) -> dict[str, float]:
        """The student's one-time training budget from its card, as run values (``pretrain_*``)."""
        budget = (student_card(model) or {}).get("budget") or {}
        return {f"pretrain_{k}": float(v) for k, v in budget.items() if isinstance(v, (int, float))}
