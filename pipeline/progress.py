"""Progress of long steps, with rate and ETA: a bar on a terminal, periodic plain lines in logs.

    with Progress("TransE epoch 3/20", total=len(triples), unit="triples", log=log) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

On a terminal (stderr a tty, tqdm installed) this draws a tqdm bar. Anywhere else (a Ray job's
log, a Ray Train worker, a file) it logs one line every ``every_s`` seconds through ``log``:

    TransE epoch 3/20: 1200000/10800000 triples (11%), 52,400 triples/s, ETA 3m03s

The rate is the mean since the start (steady for the uniform work it is used on), the ETA the
work left at that rate. ``final=True`` also logs a closing line with the total time; a step that
ends before its first line stays silent otherwise. ``clock`` is injectable (tests).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

_log = logging.getLogger(__name__)

#: seconds between two plain lines (a job log gets a line per step at most this often)
EVERY_S = 30.0


def on_terminal(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is a terminal: draw a bar; else log plain lines."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_seconds(seconds: float | None) -> str:
    """``12s``, ``3m05s``, ``2h07m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_rate(rate: float) -> str:
    if rate >= 100:
        return f"{rate:,.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


def _count(n: float) -> str:
    return f"{int(n)}" if float(n).is_integer() else f"{n:.1f}"


def _make_bar(what: str, total: float | None, unit: str, stream: IO[str]) -> Any | None:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=what, unit=f" {unit}", file=stream, dynamic_ncols=True,
                mininterval=0.5, leave=True)


class Progress:
    """Progress of one step of ``total`` units (None: unknown, no ETA); see the module docstring.

    ``bar``: None chooses by `on_terminal` (``stream``); False forces plain lines (where
    something else already draws a bar, e.g. Ray Data's); True asks for a bar (plain lines
    when tqdm is missing). ``elapsed``: seconds the step ran before this object was made (a
    step first heard of when its first unit is done)."""

    def __init__(self, what: str, total: float | None, *, unit: str = "it",
                 every_s: float = EVERY_S, log: logging.Logger | None = None,
                 stream: IO[str] | None = None, bar: bool | None = None, final: bool = False,
                 elapsed: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.every_s, self.final = every_s, final
        self.log = log or _log
        self.clock = clock
        self.done = 0.0
        self.postfix = ""
        self.lines = 0  # plain lines logged so far
        self._last = clock()
        self.start = self._last - elapsed
        stream = sys.stderr if stream is None else stream
        use_bar = on_terminal(stream) if bar is None else bar
        self._bar = _make_bar(what, total, unit, stream) if use_bar else None
        self._closed = False

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def update(self, n: float = 1, postfix: str | None = None) -> None:
        """``n`` more units done; ``postfix`` (e.g. the running loss) is shown from now on."""
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self.lines += 1
            self.log.info("%s", self.line(now))

    def rate(self, now: float | None = None) -> float:
        """Units per second since the start."""
        elapsed = (self.clock() if now is None else now) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the mean rate (None: no total, or nothing done yet)."""
        rate = self.rate(now)
        if self.total is None or rate <= 0:
            return None
        return max(0.0, self.total - self.done) / rate

    def line(self, now: float | None = None) -> str:
        """``what: done/total unit (pct%), rate unit/s, ETA t[, postfix]``."""
        now = self.clock() if now is None else now
        if self.total:
            head = (f"{self.what}: {_count(self.done)}/{_count(self.total)} {self.unit} "
                    f"({100.0 * self.done / self.total:.0f}%)")
        else:
            head = f"{self.what}: {_count(self.done)} {self.unit}"
        text = (f"{head}, {format_rate(self.rate(now))} {self.unit}/s, "
                f"ETA {format_seconds(self.eta(now))}")
        return f"{text}, {self.postfix}" if self.postfix else text

    def close(self) -> None:
        """End the bar; in plain mode log a closing line when ``final`` or after any line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if self.final or self.lines:
            now = self.clock()
            text = (f"{self.what}: {_count(self.done)} {self.unit} in "
                    f"{format_seconds(now - self.start)} ({format_rate(self.rate(now))} "
                    f"{self.unit}/s)")
            self.log.info("%s", f"{text}, {self.postfix}" if self.postfix else text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
