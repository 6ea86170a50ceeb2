"""Look after the artifact cache: `python -m wsss.cache list | prune`.

    python -m wsss.cache list                          every artifact: stage, key, split, what differs
                                                       from the default config, size, created, last used
    python -m wsss.cache list --runs [outputs]         every run directory below outputs/ and the artifacts
                                                       it links, each ok or PRUNED
    python -m wsss.cache prune --unused-days 30        remove artifacts not used for 30 days
    python -m wsss.cache prune --keep stage=evaluate dataset=voc12 ...
                                                       remove every artifact the graph of that config
                                                       (Hydra overrides) does not reach
    ... --dry-run                                      say what would be removed, remove nothing

The cache is `--cache-dir`, else `$WSSS_CACHE`, else `outputs/cache` (the config's `paths.cache_dir`).
"Last used" is the artifact directory's mtime, which the pipeline touches on every reuse. An artifact that
a running build holds locked is never removed. `prune` ends by naming the run directories (below `--runs-dir`,
default `outputs`) whose links it broke, and `list --runs` marks them, so a pruned artifact is never lost
silently.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from wsss.artifacts import read_json
from wsss.errors import DamagedFileError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class Entry:
    """One artifact directory of the cache."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any] | None  # None: unfinished (a killed or running build)
    size: int
    last_used: float

    @property
    def split(self) -> str:
        return (self.manifest or {}).get("split", "?")

    @property
    def created(self) -> str:
        return (self.manifest or {}).get("created", "unfinished")


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def scan(cache_dir: Path) -> list[Entry]:
    """Every artifact directory under `cache_dir` (`<stage>/<key>/`), finished or not."""
    entries = []
    if not cache_dir.is_dir():
        return entries
    for stage_dir in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        for d in sorted(p for p in stage_dir.iterdir() if p.is_dir() and p.name != "recipes"):
            manifest = None
            with contextlib.suppress(OSError, DamagedFileError):
                manifest = read_json(d / "manifest.json")
            entries.append(Entry(stage_dir.name, d.name, d, manifest, _size(d), d.stat().st_mtime))
    return entries


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from wsss.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def differences(entry: Entry, defaults: Any) -> str:
    """The entry's config values that differ from the default config's slice for its stage and split."""
    from wsss.stages import STAGES

    if entry.manifest is None or entry.stage not in STAGES:
        return ""
    try:
        ref = _flatten(STAGES[entry.stage].params(defaults, entry.split))
    except Exception:  # a default that cannot express this entry (another dataset): show everything
        ref = {}
    mine = _flatten(entry.manifest.get("config", {}))
    diff = [f"{k}={v}" for k, v in mine.items() if ref.get(k, object()) != v and not k.endswith(".root")]
    return " ".join(diff) or "(defaults)"


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M")


def list_cache(cache_dir: Path, out: TextIO | None = None) -> list[Entry]:
    """Print one line per artifact; return the entries."""
    out = out or sys.stdout
    entries = scan(cache_dir)
    defaults = _compose([])
    out.write(f"{'stage':<13} {'key':<16} {'split':<10} {'size':>8} {'created':<25} {'last used':<16} config\n")
    for e in entries:
        out.write(
            f"{e.stage:<13} {e.key:<16} {e.split:<10} {_human(e.size):>8} {e.created:<25} {_stamp(e.last_used):<16} "
            f"{differences(e, defaults)}\n"
        )
    total = sum(e.size for e in entries)
    out.write(f"{len(entries)} artifacts, {_human(total)} in {cache_dir}\n")
    return entries


def list_runs(root: Path, out: TextIO | None = None) -> list[Path]:
    """Print every run directory below `root` with its artifacts, each ok or PRUNED; return the runs."""
    from wsss.rundir import find_runs, read_index

    out = out or sys.stdout
    runs = find_runs(root)
    broken = 0
    for run in runs:
        index = read_index(run)
        gone = [label for label, e in index.items() if not Path(e["path"]).is_dir()]
        broken += bool(gone)
        out.write(f"{run}{'  (PRUNED: ' + ', '.join(gone) + ')' if gone else ''}\n")
        for label, e in index.items():
            out.write(f"  {label:<16} {e['key']:<16} {'PRUNED' if label in gone else 'ok'}\n")
    out.write(f"{len(runs)} runs below {root}, {broken} with a pruned artifact\n")
    return runs


def _broken_runs(runs_dir: Path, removed: list[Entry]) -> list[Path]:
    """Run directories below `runs_dir` that link to one of `removed`."""
    from wsss.rundir import find_runs, read_index

    gone = {str(e.path.resolve()) for e in removed}
    return [r for r in find_runs(runs_dir) if any(v["path"] in gone for v in read_index(r).values())]


def reachable_keys(overrides: list[str]) -> set[str]:
    """Keys of every node the graph of the composed config reaches from its requested stage."""
    from wsss.pipeline import Pipeline

    cfg = _compose(overrides)
    pipe = Pipeline(cfg)
    return {node.key for node in pipe.upstream(pipe.node(str(cfg.stage.name)))}


@contextlib.contextmanager
def _unlocked(entry: Entry) -> Iterator[bool]:
    """Hold the entry's build lock without waiting; yields False when a build holds it."""
    path = entry.path.parent / f"{entry.key}.lock"
    if not path.exists():
        yield True
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def prune(
    cache_dir: Path,
    unused_days: float | None = None,
    keep: list[str] | None = None,
    dry_run: bool = False,
    out: TextIO | None = None,
    runs_dir: Path | None = None,
) -> list[Entry]:
    """Remove artifacts unused for `unused_days`, or not reachable from the config `keep` (overrides)."""
    out = out or sys.stdout
    if unused_days is None and keep is None:
        raise ValueError("prune needs --unused-days N or --keep [OVERRIDES ...]")
    entries = scan(cache_dir)
    victims = entries
    if unused_days is not None:
        cutoff = time.time() - unused_days * 86400
        victims = [e for e in victims if e.last_used < cutoff]
    if keep is not None:
        keys = reachable_keys(keep)
        victims = [e for e in victims if e.key not in keys]
    removed = []
    for e in victims:
        with _unlocked(e) as free:
            if not free:
                out.write(f"skipping {e.path}: a build holds its lock\n")
                continue
            out.write(f"{'would remove' if dry_run else 'removing'} {e.stage}/{e.key} ({_human(e.size)})\n")
            if not dry_run:
                shutil.rmtree(e.path)
                with contextlib.suppress(FileNotFoundError):
                    (e.path.parent / f"{e.key}.lock").unlink()
            removed.append(e)
    total = sum(e.size for e in removed)
    out.write(f"{'would free' if dry_run else 'freed'} {_human(total)} ({len(removed)} of {len(entries)} artifacts)\n")
    if runs_dir is not None and runs_dir.is_dir() and removed:
        broken = _broken_runs(runs_dir, removed)
        if broken:
            names = ", ".join(str(r) for r in broken[:5]) + (", ..." if len(broken) > 5 else "")
            out.write(
                f"{len(broken)} run directories below {runs_dir} {'would lose' if dry_run else 'lost'} an artifact "
                f"({names}); python -m wsss.cache list --runs {runs_dir} marks them\n"
            )
    return removed


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: `python -m wsss.cache list | prune ...`."""
    parser = argparse.ArgumentParser(prog="python -m wsss.cache", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("WSSS_CACHE", "outputs/cache")))
    sub = parser.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("list", help="one line per artifact")
    lp.add_argument(
        "--runs",
        nargs="?",
        const=Path("outputs"),
        type=Path,
        metavar="DIR",
        help="list the run directories below DIR (default outputs) and their artifacts instead",
    )
    p = sub.add_parser("prune", help="remove unused or unreachable artifacts")
    p.add_argument("--unused-days", type=float, help="remove artifacts not used for this many days")
    p.add_argument("--keep", nargs="*", metavar="OVERRIDE", help="keep only what this config's graph reaches")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.add_argument("--runs-dir", type=Path, default=Path("outputs"), help="run directories to check for broken links")
    args = parser.parse_args(argv)
    try:
        if args.command == "list" and args.runs is not None:
            list_runs(args.runs)
        elif args.command == "list":
            list_cache(args.cache_dir)
        else:
            prune(args.cache_dir, args.unused_days, args.keep, args.dry_run, runs_dir=args.runs_dir)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"wsss: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
