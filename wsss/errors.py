"""Errors a user can act on. Each message names the file or config key and the problem.

`python -m wsss.run` turns these (and `ValueError` / `OSError` from the readers) into one line,
`wsss: error: <message>`, with exit status 2; the traceback goes to the run's log file.
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
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


class WriteError(WsssError, OSError):
    """Writing a file failed (no space left, permission denied); nothing was left that a rerun would trust."""
