"""Progress lines for long stages: count, rate, ETA at most every few seconds, then a one-line summary."""

from __future__ import annotations

import logging
import threading
import time


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(
        self, stage: str, total: int, logger: logging.Logger, unit: str = "images", every_s: float = 5.0
    ):
        self.stage, self.total, self.logger, self.unit, self.every_s = stage, total, logger, unit, every_s
        self.done = 0
        self._lock = threading.Lock()  # shard tasks may report from several threads
        self.start = time.perf_counter()
        self._last = self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            if now - self._last < self.every_s or self.done >= self.total:
                return
            self._last = now
            rate = self.rate()
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.logger.info(
                "%s: %d/%d %s (%.0f%%), %.1f %s/s, ETA %s",
                self.stage,
                self.done,
                self.total,
                self.unit,
                100.0 * self.done / max(1, self.total),
                rate,
                self.unit,
                _clock(eta) if eta == eta else "?",
            )

    def finish(self, extra: str = "") -> str:
        line = (
            f"{self.stage}: {self.done} {self.unit} in {self.elapsed:.1f}s ({self.rate():.1f} {self.unit}/s)"
        )
        line = f"{line}, {extra}" if extra else line
        self.logger.info("%s", line)
        return line
