"""Helpers the test modules share (fixtures live in conftest.py); no test module imports another."""

from __future__ import annotations

import time


class FakeClock:
    """Wall-clock seconds that pass only when `sleep` is called: code timed by it behaves the same under any load."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
