"""Progress that suits where it goes: bars on a terminal, a bounded number of log lines in a file."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from tqdm import tqdm

from tests.conftest import REPO
from tests.tiny import TINY
from wsss import dist, progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _expected_lines(total: int, step_s: float, leave: bool = True) -> list[int]:
    """The counts at which a line is due, by the rule written out: 10 % and 30 s since the last line, both."""
    due, last_n, last_t = [], 0, 0.0
    for n in range(1, total + 1):
        t = n * step_s
        if t - last_t >= 30 and 100 * (n - last_n) / total >= 10:
            if not leave and (total - n) * step_s < 30:
                continue  # a part of a larger step with under 30 s left: its caller's line comes next
            due.append(n)
            last_n, last_t = n, t
    return due + ([total] if leave else [])


@pytest.mark.parametrize(
    ("total", "step_s", "leave"),
    [(100, 1.0, True), (100, 0.01, True), (4, 100.0, True), (50, 3.0, False), (12, 3.0, False)],
)
def test_log_lines_every_ten_percent_and_thirty_seconds(caplog, total, step_s, leave):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="wsss.progress")
    bar = progress.LogProgress(desc="cams cam", total=total, unit="img", leave=leave, clock=clock)
    for _ in range(total):
        clock.t += step_s
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing
    lines = [r.getMessage() for r in caplog.records]
    counts = [int(re.match(r"cams cam: (\d+)", m).group(1)) for m in lines]
    assert counts == _expected_lines(total, step_s, leave)
    assert all("\r" not in m for m in lines)
    if leave:
        assert (
            lines[-1] == f"cams cam: {total} img done in {progress.duration(total * step_s)} ({1 / step_s:.3g} img/s)"
        )
    if len(lines) > 1:  # an intermediate line carries the share, the rate and the time left
        n = counts[0]
        left = progress.duration((total - n) * step_s)
        assert lines[0] == f"cams cam: {n}/{total} img ({100 * n / total:.0f} %), {1 / step_s:.3g} img/s, {left} left"


def test_iterating_reports_like_updating(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="wsss.progress")

    def items():
        for i in range(20):
            clock.t += 5.0
            yield i

    assert list(progress.LogProgress(items(), desc="evaluate", total=20, clock=clock)) == list(range(20))
    counts = [int(re.match(r"evaluate: (\d+)", r.getMessage()).group(1)) for r in caplog.records]
    assert counts == _expected_lines(20, 5.0)


@pytest.mark.parametrize(
    ("mode", "kind", "disabled"), [("log", progress.LogProgress, False), ("bar", tqdm, False), ("off", tqdm, True)]
)
def test_the_mode_picks_the_reporter(monkeypatch, mode, kind, disabled):
    monkeypatch.setattr(progress, "_mode", mode)
    bar = dist.progress(total=3, desc="x")
    assert isinstance(bar, kind)
    assert bar.disable is disabled
    bar.close()


def test_auto_is_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(progress, "_mode", "auto")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert progress.resolved_mode() == "bar"
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert progress.resolved_mode() == "log"


def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match="progress=loud"):
        progress.set_mode("loud")


def _run_to_file(tmp_path, args: list[str], name: str) -> bytes:
    """`python -m wsss.run *TINY *args` with stdout and stderr written to one file, as `> run.out 2>&1` does."""
    env = {**os.environ, "WSSS_DATA": str(tmp_path / "data"), "WSSS_CACHE": str(tmp_path / "cache")}
    path = tmp_path / name
    with path.open("wb") as f:
        proc = subprocess.run([sys.executable, "-m", "wsss.run", *TINY, *args], cwd=REPO, env=env, stdout=f, stderr=f)
    data = path.read_bytes()
    assert proc.returncode == 0, data[-2000:]
    return data


def test_a_run_written_to_a_file_has_no_redraws_and_few_progress_lines(tmp_path):
    """Output to a file (not a terminal): no carriage return anywhere, and per loop at most 10 intermediate
    lines and one end line; `progress=bar` brings the tqdm redraws back."""
    data = _run_to_file(tmp_path, [f"hydra.run.dir={tmp_path / 'run'}"], "run.out")
    assert b"\r" not in data
    out = data.decode()
    said = re.findall(r"\[wsss\.progress\]\S* (?:- )?(.*)", out)  # the progress logger's messages
    ends = [m.split(": ")[0] for m in said if re.search(r": \d+ \w+ done in ", m)]
    assert {"train 1/1", "cams cam", "pseudo masks", "evaluate"} - set(ends) == {"train 1/1"}  # epochs: no end line
    for desc in set(ends):
        lines = [m for m in said if m.startswith(f"{desc}: ")]
        assert 1 <= len(lines) <= 11, (desc, lines)
    bars = _run_to_file(tmp_path, ["progress=bar", "stage=pseudo_masks", "pseudo.threshold=0.3"], "bars.out")
    assert b"\r" in bars
    assert b"[wsss.progress]" not in bars  # bars, not log lines


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_a_weight_download_off_a_terminal_is_log_lines_or_nothing(tmp_path, caplog, capfd, mode):
    """torch.hub.download_url_to_file, through which torchvision downloads its weights, on a stub download (a
    file:// URL, no network): off a terminal, `auto` reports it as a log line and `off` not at all; stderr holds
    no tqdm redraw either way."""
    import torch.hub

    src = tmp_path / "weights.pth"
    src.write_bytes(os.urandom(300_000))
    before = progress._mode
    try:
        progress.set_mode(mode)
        assert progress.resolved_mode() == ("log" if mode == "auto" else "off")  # pytest's stderr is no terminal
        with caplog.at_level(logging.INFO, logger="wsss.progress"):
            torch.hub.download_url_to_file(src.as_uri(), str(tmp_path / "got.pth"), progress=True)
    finally:
        progress.set_mode(before)
    assert (tmp_path / "got.pth").read_bytes() == src.read_bytes()
    err = capfd.readouterr().err
    assert "\r" not in err, err
    assert "B/s" not in err, err
    lines = [r.getMessage() for r in caplog.records if r.name == "wsss.progress"]
    if mode == "off":
        assert lines == []
    else:
        assert len(lines) == 1, lines
        assert re.fullmatch(r"torch\.hub download: 300000 B done in \d+ s \([\d.e+]+ B/s\)", lines[0]), lines
