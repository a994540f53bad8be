"""When to stop the live pre-copy rounds and suspend the guest."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrecopyPolicy:
    """Stop when few pages are dirty or after ``max_rounds`` rounds (the spec's simple policy).

    Round 0 is the full copy; each later round resends what the guest dirtied meanwhile.
    ``max_rounds=0`` means no live rounds: suspend first, then copy (what `xl save` does).
    """

    max_rounds: int = 5
    target_dirty: int = 50

    def __post_init__(self) -> None:
        if self.max_rounds < 0 or self.target_dirty < 0:
            raise ValueError("max_rounds and target_dirty must be >= 0")

    @property
    def live(self) -> bool:
        return self.max_rounds > 0

    def keep_going(self, rounds_done: int, dirty: int) -> bool:
        """After ``rounds_done`` live rounds, with ``dirty`` pages now dirty: one more round?"""
        return rounds_done < self.max_rounds and dirty > self.target_dirty
