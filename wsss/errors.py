"""Errors a user can act on. Each message names the file or config key and the problem.

`python -m wsss.run` turns these (and `ValueError` / `OSError` from the readers) into one line,
`wsss: error: <message>`, with exit status 2; the traceback goes to the run's log file. Every error here
survives pickling (its state is its constructor's arguments), so one raised in a DataLoader worker reaches the
main process whole (`wsss.data.loader`).
"""

from __future__ import annotations

from pathlib import Path


class WsssError(Exception):
    """Base of the errors wsss raises on purpose for bad input."""


class ConfigError(WsssError, ValueError):
    """A config value out of range, or two values that contradict each other."""


class CacheError(WsssError, OSError):
    """The artifact cache cannot be used: not writable where a build is needed, or a lock cannot be taken."""


class DamagedFileError(WsssError, ValueError):
    """A file of a cached artifact that cannot be read back; the pipeline removes it and rebuilds it.

    Args:
        path: The damaged file.
        problem: What went wrong reading it.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:
        # Pickled whole, as a DataLoader worker's error must be (wsss.data.loader): path and problem, notes kept.
        return type(self), (self.path, self.problem), self.__dict__


class WriteError(WsssError, OSError):
    """Writing a file failed (no space left, permission denied); nothing was left that a rerun would trust."""
