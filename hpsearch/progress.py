"""A running search's progress on the driver's terminal: one live area, kept up to date.

On a terminal, a tqdm bar at the bottom: trials done of ``num_samples``, running, failed, the best
value so far, the time elapsed and, with a time budget, the time left; the one line per finished
trial prints above it. Where the output is no terminal (CI, a log file, ``ray submit``), no bar:
the plain lines only. Ray's own progress tables stay off (``verbose=0``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import time
from typing import Any, TextIO

from hpsearch.record.trial_log import TrialStatus


class Progress:
    """Counts of a search's trials, drawn live when ``live`` (default: the stream is a terminal)."""

    def __init__(self, *, num_samples: int, metric: str, mode: str, budget_s: float | None = None,
                 stream: TextIO | None = None, live: bool | None = None) -> None:
        self.num_samples, self.metric, self.mode, self.budget_s = num_samples, metric, mode, budget_s
        self.done = self.failed = 0
        self.running: set[str] = set()
        self.best: float | None = None
        self._stream, self._live = stream, live
        self._t0 = time.time()
        self._bar: Any = None
        self._redirect: Any = None
        self._closed = False

    @property
    def live(self) -> bool:
        """Whether the area is drawn: asked for, or the stream (default: stdout) is a terminal."""
        if self._live is None:
            stream = self._stream or sys.stdout
            self._live = bool(getattr(stream, "isatty", lambda: False)())
        return self._live

    def __getstate__(self) -> dict[str, Any]:
        # Tune copies and pickles its callbacks: the copy draws its own area, from its first event.
        state = self.__dict__.copy()
        state.update(_bar=None, _redirect=None, _stream=None)
        return state

    def _start(self) -> None:
        """The bar, drawn from the first event on (not when made: Tune runs a copy of the callback)."""
        if self._bar is not None or self._closed or not self.live:
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # The terminal's size ($COLUMNS and $LINES first); one that reports none (0 x 0) gets 120 x 24.
        size = shutil.get_terminal_size((120, 24))
        self._bar = tqdm(total=self.num_samples, initial=self.done, file=self._stream or sys.stdout, unit="trial",
                         ncols=size.columns or 120, nrows=size.lines or 24, leave=True,
                         bar_format="{desc} |{bar:24}| {n_fmt}/{total_fmt} trials{postfix}")
        self._bar.set_description_str("search")
        # The finished-trial lines print above the bar, not through it.
        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("hpsearch")])
        self._redirect.__enter__()

    def trial_started(self, trial_id: str) -> None:
        self.running.add(trial_id)
        self._draw()

    def trial_result(self, trial_id: str, value: Any) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = max if self.mode == "max" else min
            self.best = value if self.best is None else better(self.best, value)
        self._draw()

    def trial_ended(self, trial_id: str, status: TrialStatus) -> None:
        self.running.discard(trial_id)
        self.done += 1
        self.failed += status is TrialStatus.FAILED
        if self._bar is not None:
            self._bar.update(1)
        self._draw()

    def close(self) -> None:
        self._closed = True
        if self._bar is not None:
            self._draw()
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            with contextlib.suppress(Exception):
                self._redirect.__exit__(None, None, None)
            self._redirect = None

    def line(self) -> str:
        """What the live area says after the bar."""
        elapsed = time.time() - self._t0
        parts = [f"{len(self.running)} running", f"{self.failed} failed",
                 f"best {self.metric} {self.best:.4f}" if self.best is not None else f"no {self.metric} yet",
                 f"{_clock(elapsed)} elapsed"]
        if self.budget_s:
            parts.append(f"{_clock(max(0.0, self.budget_s - elapsed))} left of the time budget")
        return ", ".join(parts)

    def _draw(self) -> None:
        self._start()
        if self._bar is not None:
            self._bar.set_postfix_str(self.line(), refresh=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Forecast:
    """Warns, once, when a search without a time budget is on course to run for weeks: the epochs
    its plan expects (:func:`hpsearch.plan.make_plan`) at the pace of its first epochs."""

    WARN_AFTER_S = 7 * 24 * 3600
    SAMPLE = 8  # epochs measured before forecasting

    def __init__(self, *, expected_epochs: float, slots: int, budget_s: float | None) -> None:
        self.expected_epochs, self.slots, self.budget_s = expected_epochs, max(1, slots), budget_s
        self._times: list[float] = []
        self._said = budget_s is not None

    def epoch(self, epoch_time_s: Any) -> str | None:
        """Count one epoch's time; the warning, the first time the forecast passes a week."""
        if self._said or not isinstance(epoch_time_s, (int, float)) or not math.isfinite(epoch_time_s):
            return None
        self._times.append(float(epoch_time_s))
        if len(self._times) < self.SAMPLE:
            return None
        pace = sorted(self._times)[len(self._times) // 2]
        eta = self.expected_epochs * pace / self.slots
        if eta < self.WARN_AFTER_S:
            self._said = len(self._times) >= 4 * self.SAMPLE  # a few looks, then quiet
            return None
        self._said = True
        return (f"this search is on course to take about {_duration(eta)} ({self.expected_epochs:.0f} epochs "
                f"expected, about {pace:.2g} s each, {self.slots} at once); set search.time_budget_s, or fewer "
                "search.num_samples or epochs")


def _duration(seconds: float) -> str:
    days = seconds / 86400
    return f"{days / 365:.1f} years" if days >= 365 else f"{days:.0f} days"
