"""The wall clock a test hands the bot (`Tuning.clock`) and sets as it goes."""

from __future__ import annotations


class Clock:
    """The bot's wall clock, set by the test: `clock.now = …` moves time for the bot."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
