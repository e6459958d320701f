"""Progress of a long step: a tqdm bar in a terminal, a line every few seconds in a log.

tqdm alone does not fit both: on a file or pipe it still writes carriage-return frames, which a log (a
``ray job submit`` log, CI's output, ``> run.log``) shows as one ever-growing line, and ``disable=None``
shows nothing at all for an hour-long step. Ray Data makes the same split for its own progress
(``LoggingExecutionProgressManager`` when stdout is not a terminal).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Counts ``done`` of ``total``; use as a context manager and call :meth:`update` or :meth:`update_to`."""

    def __init__(self, total: int, desc: str, unit: str = "img", file: TextIO | None = None, every_s: float = 10.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.file = file or sys.stderr
        self.done = 0
        self.start = self._logged = time.monotonic()
        self._bar = (
            tqdm(total=total, desc=desc, unit=unit, file=self.file, dynamic_ncols=True, smoothing=0.1)
            if self.file.isatty()
            else None
        )

    def update(self, n: int = 1) -> None:
        self.update_to(self.done + n)

    def update_to(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        if self._bar is None and time.monotonic() - self._logged >= self.every_s:
            self._line()

    def write(self, line: str) -> None:
        """A line of results: above the bar in a terminal (the bar stays last), a plain line in a log."""
        if self._bar is not None:
            self._bar.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def _line(self) -> None:
        self._logged = time.monotonic()
        seconds = self._logged - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        print(
            f"  {self.desc}: {self.done}/{self.total} {self.unit} ({shown} {self.unit}/s, {seconds:.0f} s)",
            file=self.file,
            flush=True,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
