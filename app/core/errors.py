"""The error a person is shown: a request that could not be done, and why."""

from __future__ import annotations


class UserError(Exception):
    """A request that could not be done, with an explanation for the person who asked."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)
