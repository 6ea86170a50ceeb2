"""Progress that suits where it goes: tqdm bars on a terminal, a few log lines in a file.

`progress=auto` (the default) draws tqdm bars when stderr is a terminal and otherwise reports through `logging`
(so `run.log` and the console agree, and a Slurm or CI log holds no carriage-return redraws): one line when a
loop has advanced by `LOG_PERCENT` % AND `LOG_SECONDS` s since its last line (whichever is rarer), with the count,
the rate and the time left, and one line when it ends. `bar`, `log` and `off` force one behaviour. Loops that
are one part of a larger step (`leave=False`, an epoch's batches) report no end line, their caller logs, and
no line either when less than `LOG_SECONDS` of them is left.
`wsss.dist.progress` picks the behaviour (and shows nothing on ranks other than 0).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

MODES = ("auto", "bar", "log", "off")
LOG_PERCENT = 10.0
LOG_SECONDS = 30.0

log = logging.getLogger("wsss.progress")
_mode = "auto"


def set_mode(mode: str) -> None:
    """`progress=` of the run: auto | bar | log | off; also for torch.hub's downloads (`download_bar`)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress={mode}: must be one of {MODES}")
    _mode = mode
    import torch.hub

    torch.hub.tqdm = download_bar  # torchvision's weights come through torch.hub.download_url_to_file


def download_bar(*args: Any, **kwargs: Any) -> Any:
    """torch.hub's download progress as the run's mode says: its tqdm bar (`bar`), log lines (`log`), or
    nothing (`off`), so a run written to a file holds no carriage-return redraws of a weight download."""
    mode = resolved_mode()
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(*args, **kwargs)
    kwargs.setdefault("desc", "torch.hub download")
    if mode == "off":
        kwargs["disable"] = True
    return LogProgress(*args, **kwargs)


def resolved_mode() -> str:
    """bar, log or off: `auto` is a bar on a terminal, log lines elsewhere."""
    if _mode != "auto":
        return _mode
    return "bar" if sys.stderr.isatty() else "log"


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LogProgress:
    """The part of tqdm's interface wsss uses (iterate, `update`, `close`), reported as log lines."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        leave: bool = True,
        disable: bool = False,
        clock: Callable[[], float] = time.monotonic,
        **_: Any,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.leave, self.disable, self.clock = leave, disable, clock
        self.n = 0
        self.start = self.last_time = clock()
        self.last_n = 0
        self.closed = False

    def __iter__(self) -> Iterator:
        assert self.iterable is not None, "LogProgress without an iterable"
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self.clock()
        share = 100.0 * (self.n - self.last_n) / self.total if self.total else 0.0
        if now - self.last_time >= LOG_SECONDS and (share >= LOG_PERCENT or not self.total):
            if not self.leave and self.total and self._left(now) < LOG_SECONDS:
                return  # a part of a larger step about to end: its caller's line follows in moments
            self.last_time, self.last_n = now, self.n
            log.info("%s", self._line(now))

    def _left(self, now: float) -> float:
        """Seconds left at the current rate (infinite before the first item)."""
        rate = self.n / (now - self.start) if now > self.start else 0.0
        return (self.total - self.n) / rate if rate > 0 else float("inf")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.leave:
            elapsed = self.clock() - self.start
            rate = self.n / elapsed if elapsed > 0 else 0.0
            done = f"{self.n} {self.unit} done in {duration(elapsed)} ({rate:.3g} {self.unit}/s)"
            log.info("%s: %s", self.desc, done)

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if not self.total:
            return f"{self.desc}: {self.n} {self.unit}, {rate:.3g} {self.unit}/s"
        left = duration((self.total - self.n) / rate) if rate > 0 else "?"
        percent = 100.0 * self.n / self.total
        count = f"{self.n}/{self.total} {self.unit} ({percent:.0f} %)"
        return f"{self.desc}: {count}, {rate:.3g} {self.unit}/s, {left} left"
