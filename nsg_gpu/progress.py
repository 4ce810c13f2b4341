"""Progress of a run: frames done, frames per minute and a time to completion.

The rate comes from the last few completions (a moving window), not from the whole run nor
from the last frame alone: the reference's preparation and a slow first frame (caches, disk)
stop counting once the window has moved past them, and one frame that stalls on a busy disk
does not swing the estimate by a factor of the remaining count. :class:`Stopwatch` times the
stages of one frame for :attr:`nsg_gpu.results.FrameResult.timings`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

__all__ = ["RunProgress", "Stopwatch", "format_seconds"]


class Stopwatch:
    """Adds the wall time since the last lap to a named stage of a ``timings`` dict (nothing
    is recorded where ``timings`` is None)."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + (now - self.last)
        self.last = now


class RunProgress:
    """Frames done out of a total, their rate over a moving window, and the ETA.

    Parameters
    ----------
    total : int
        Frames in the run.

    window : int
        Completions the rate is measured over (the span from the oldest to the newest).

    clock : callable
        Seconds, monotonic; ``time.monotonic`` by default.

    Examples
    --------
    >>> progress = RunProgress(200)
    >>> progress.update(1)  # from the run's progress callback: done, total
    >>> progress.eta_seconds is None  # not known before two completions
    True
    """

    def __init__(self, total: int, *, window: int = 10, clock: Callable[[], float] = time.monotonic):
        if window < 2:
            raise ValueError("window must be at least 2")
        self.total = int(total)
        self.done = 0
        self._clock = clock
        self._kept = 0
        self._times: deque[tuple[int, float]] = deque(maxlen=window)

    def update(self, done: int, *, kept: bool = False) -> None:
        """Record that ``done`` frames are complete now.

        ``kept`` marks a frame that cost no work (its output from an earlier run was kept):
        it counts as done but not towards the rate, which would otherwise promise the
        remaining frames at the speed of skipping.
        """
        self.done = int(done)
        if kept:
            self._kept += 1
            return
        self._times.append((self.done - self._kept, self._clock()))

    @property
    def frames_per_minute(self) -> float | None:
        """Completions per minute over the window; None before two completions are known.

        The start of the run is not a completion: the first one (usually the reference)
        carries the run's set-up, which later frames do not repeat.
        """
        if len(self._times) < 2:
            return None
        (first_done, first_time), (last_done, last_time) = self._times[0], self._times[-1]
        if last_done <= first_done or last_time <= first_time:
            return None
        return 60.0 * (last_done - first_done) / (last_time - first_time)

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the last frame at the current rate; 0 when done, None when unknown."""
        if self.done >= self.total:
            return 0.0
        rate = self.frames_per_minute
        if rate is None or rate <= 0:
            return None
        return 60.0 * (self.total - self.done) / rate

    def summary(self) -> str:
        """``12/200 frames, 8.4 frames/min, ETA 22 min 23 s`` (rate and ETA once known)."""
        text = f"{self.done}/{self.total} frames"
        rate = self.frames_per_minute
        if rate is not None:
            text += f", {rate:.1f} frames/min"
        eta = self.eta_seconds
        if eta is not None and self.done < self.total:
            text += f", ETA {format_seconds(eta)}"
        return text


def format_seconds(seconds: float) -> str:
    """``45 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
