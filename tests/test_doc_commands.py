"""Every command in README.md and docs/*.md is checked as far as a test can afford: most are composed and
validated in-process, a few run for real (the list below says how each kind is checked).

The commands are read from the documents themselves: the fenced `bash` / `sh` blocks (line continuations, `&&`
chains and `#` comments handled) and the inline code spans that start like a command (`python ...`,
`torchrun ...`, `pip ...`). Each is classified and checked as far as a test can afford:

- `python -m wsss.run ...` (also under `torchrun ... -m wsss.run`, and as `python wsss/run.py ...`): every job it
  launches is composed in-process with Hydra's compose API, the overrides' values are read back from the composed
  config (group choices from `hydra.runtime.choices`), and `wsss.config.validate` passes. A `-m` command is
  expanded into its jobs by Hydra's own BasicSweeper, as `-m` does: Hydra 1.3 refuses `--cfg` together with `-m`
  ("Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified") and refuses a comma
  list without `-m`. A few commands also go through the real command line with `--cfg job` (the first job of a
  sweep), and the printed config must equal the in-process one; the quick start and a threshold sweep really run
  on the tiny config.
- `python -m wsss.report` / `python -m wsss.cache` / `python scripts/X.py`: the command as written plus `--help`
  exits 0 (run in-process with runpy, as `python` would run it: a subcommand or an option value argparse rejects
  fails), and every `--option` it names is in that help. `wsss.cache list` and `prune --dry-run` really run.
- `pip install` / `python -m pytest`: the extras named exist in pyproject.toml, the markers named are registered.

Placeholders (`PATH`, `DIR`, `ROOT`, `<...>`) become temporary paths, `group=NAME` every option of the group,
and `...` (more overrides) is dropped.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import REPO
from tests.doc_commands import (
    COMMANDS,
    DOCS,
    INLINE,
    STARTS,
    SYNOPSES,
    Command,
    assert_applied,
    command_ids,
    commands_of,
    compose_job,
    fenced_commands,
    fill_placeholders,
    inline_commands,
    job_config,
    run_args,
    shell_blocks,
    sweep_jobs,
)
from tests.tiny import FORK_SERVER, TINY
from wsss.config import register_configs, validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

register_configs()

# Commands cheap enough to really run (on the tiny config); each must still be in the docs.
REAL_RUNS = ("python -m wsss.run", "python -m wsss.run -m stage=pseudo_masks pseudo.threshold=0.2,0.3")
REAL_CACHE = ("python -m wsss.cache list", "python -m wsss.cache prune --unused-days 30 --dry-run")
# What the docs hold today (2026-12-05); fewer means commands were lost, or the extraction broke.
AT_LEAST = {"run": 16, "cache": 6, "report": 6, "script": 7, "pip": 4, "pytest": 4}
AT_LEAST_FENCED = 18


def test_every_command_is_found_and_classified() -> None:
    unknown = [f"{c.where}: {c.text}" for c in COMMANDS if c.kind is None]
    assert not unknown, "commands of no known kind (teach this test, or fix the docs):\n" + "\n".join(unknown)
    counts = {k: len(commands_of(k)) for k in AT_LEAST}
    assert all(counts[k] >= n for k, n in AT_LEAST.items()), f"found {counts}, expected at least {AT_LEAST}"
    fenced = sum(c.fenced for c in COMMANDS)
    assert fenced >= AT_LEAST_FENCED, f"{fenced} commands in fenced blocks, expected at least {AT_LEAST_FENCED}"
    texts = {c.text for c in COMMANDS}
    for cmd in (*REAL_RUNS, *REAL_CACHE):
        assert cmd in texts, f"{cmd!r} is run for real here but no longer in the docs: update REAL_*"
    spans = {" ".join(m.group(1).split()) for p in DOCS for m in INLINE.finditer(p.read_text())}
    assert set(SYNOPSES) <= spans, f"stale SYNOPSES entries: {set(SYNOPSES) - spans}"


def test_untagged_blocks_hold_no_commands() -> None:
    """A block without a language is a diagram or output; a command there would go unchecked, so tag it bash."""
    found = [
        f"{p.name}:{start + i}: {line.strip()}"
        for p in DOCS
        for lang, start, body in shell_blocks(p)
        if lang == ""
        for i, line in enumerate(body)
        if line.strip().startswith(("$ ", *STARTS))
    ]
    assert not found, "commands in a block without a language:\n" + "\n".join(found)


def test_the_extraction_reads_shell_as_the_shell_does(tmp_path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "x\n```bash\n# a comment\npip install -e '.[test]' && python -m wsss.run a=1   # why\n"
        "python -m wsss.run -m b=1,2 \\\n    'c=[x,y]'\n```\n`python scripts/f.py all` and `ls`\n"
    )
    got = [(c.where, c.words, c.kind) for c in (*fenced_commands(doc), *inline_commands(doc))]
    assert got == [
        ("doc.md:4.1", ("pip", "install", "-e", ".[test]"), "pip"),
        ("doc.md:4.2", ("python", "-m", "wsss.run", "a=1"), "run"),
        ("doc.md:5", ("python", "-m", "wsss.run", "-m", "b=1,2", "c=[x,y]"), "run"),
        ("doc.md:8", ("python", "scripts/f.py", "all"), "script"),
    ]


# ----------------------------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize("cmd", commands_of("run"), ids=command_ids(commands_of("run")))
def test_run_command_composes_and_validates(cmd: Command, tmp_path) -> None:
    multirun, overrides = run_args(fill_placeholders(cmd.words, tmp_path))
    synopsis = any(w.endswith("=NAME") for w in cmd.words)  # `stage=NAME`: every stage, one job each
    jobs = sweep_jobs(multirun or synopsis, overrides)
    assert jobs, cmd.text
    for job in jobs:
        cfg = compose_job(job)
        assert_applied(cfg, job)
        validate(job_config(cfg))


def _cli_checked() -> list[Command]:
    """The commands also put through the real command line: fenced ones with shell quoting, and the first `-m`."""
    fenced = [c for c in commands_of("run") if c.fenced and c.words[0] == "python"]
    quoted = [c for c in fenced if c.text != " ".join(c.words)]
    sweep = [c for c in fenced if "-m" in c.words[3:]][:1]
    return quoted + [c for c in sweep if c not in quoted]


@pytest.mark.parametrize("cmd", _cli_checked(), ids=command_ids(_cli_checked()))
def test_run_command_prints_the_same_config_with_cfg_job(cmd: Command, tmp_path) -> None:
    """`python -m wsss.run <its first job> --cfg job` exits 0 and prints what compose gives in-process."""
    multirun, overrides = run_args(fill_placeholders(cmd.words, tmp_path))
    job = sweep_jobs(multirun, overrides)[0]
    proc = FORK_SERVER.run([*job, "--cfg", "job"], dict(os.environ), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed == OmegaConf.to_container(job_config(compose_job(job)))


def test_the_cli_check_covers_quoting_and_a_sweep() -> None:
    picked = _cli_checked()
    assert any("-m" in c.words[3:] for c in picked), [c.text for c in picked]
    assert any(c.text != " ".join(c.words) for c in picked), [c.text for c in picked]


# ----------------------------------------------------------------------------------------------- real runs


def _tiny_env(root: Path) -> dict[str, str]:
    return {**os.environ, "WSSS_DATA": str(root / "data"), "WSSS_CACHE": str(root / "cache")}


def _run_tiny(text: str, root: Path, tag: str) -> subprocess.CompletedProcess:
    """A docs `python -m wsss.run` command with the tiny overrides appended, run in `root/tag`."""
    (root / tag).mkdir()
    words = shlex.split(text)
    if words[1:3] == ["-m", "wsss.run"]:  # in a child of the fork server (tests/forkrun.py)
        return FORK_SERVER.run([*words[3:], *TINY, "progress=off"], _tiny_env(root), timeout=600, cwd=root / tag)
    return subprocess.run(
        [sys.executable, *words[1:], *TINY, "progress=off"],
        cwd=root / tag,
        env=_tiny_env(root),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's quick start, run once on the tiny config; its data and cache serve the other real runs."""
    root = tmp_path_factory.mktemp("docs")
    return root, _run_tiny(REAL_RUNS[0], root, "quick_start")


@pytest.mark.slow
def test_quick_start_runs_and_scores(quick_start) -> None:
    root, proc = quick_start
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = list((root / "quick_start" / "outputs" / "runs").glob("*/metrics.json"))
    assert len(metrics) == 1, proc.stderr[-3000:]


@pytest.mark.slow
def test_threshold_sweep_runs_one_job_per_threshold(quick_start) -> None:
    root, _ = quick_start
    proc = _run_tiny(REAL_RUNS[1], root, "sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [p for p in (root / "sweep").rglob("overrides.yaml") if p.parent.name == ".hydra"]
    thresholds = sorted(next(o for o in yaml.safe_load(j.read_text()) if o.startswith("pseudo.")) for j in jobs)
    assert thresholds == ["pseudo.threshold=0.2", "pseudo.threshold=0.3"], proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("text", REAL_CACHE)
def test_cache_command_runs_on_the_quick_starts_cache(text: str, quick_start, monkeypatch, capsys) -> None:
    root, _ = quick_start
    keys = {p.parent.name for p in (root / "cache").glob("*/*/manifest.json")}
    assert keys
    monkeypatch.setenv("WSSS_CACHE", str(root / "cache"))
    code = _run_module(shlex.split(text), monkeypatch)
    out = capsys.readouterr().out
    assert code == 0, out
    assert {p.parent.name for p in (root / "cache").glob("*/*/manifest.json")} == keys  # --dry-run removed nothing
    if text.endswith(" list"):
        assert all(k in out for k in keys), out


# ----------------------------------------------------------------------------------------------- other tools


def _run_module(words: list[str], monkeypatch) -> int:
    """`python -m M args` or `python scripts/X.py args` in this process (runpy, as `python` runs it): exit code."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts put their folder on it
    if words[1] == "-m":
        monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
        run = lambda: runpy.run_module(words[2], run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        monkeypatch.setattr(sys, "argv", [str(REPO / words[1]), *words[2:]])
        run = lambda: runpy.run_path(str(REPO / words[1]), run_name="__main__")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
        try:
            run()
        except SystemExit as e:
            return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return 0


TOOLS = [*commands_of("report"), *commands_of("cache"), *commands_of("script")]


@pytest.mark.parametrize("cmd", TOOLS, ids=command_ids(TOOLS))
def test_tool_command_parses(cmd: Command, tmp_path, monkeypatch, capsys) -> None:
    """The command as written, plus `--help`, exits 0 and its help names every option the command uses."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WSSS_CACHE", str(tmp_path / "cache"))
    words = fill_placeholders(cmd.words, tmp_path)
    code = _run_module([*words, "--help"], monkeypatch)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert out.startswith("usage:"), out[:500]
    for w in words:
        if w.startswith("--"):
            assert w.split("=")[0] in out, f"{w} is not an option of `{' '.join(words[:3])}`:\n{out}"


@pytest.mark.parametrize("cmd", commands_of("pip"), ids=command_ids(commands_of("pip")))
def test_pip_command_names_extras_that_exist(cmd: Command) -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    targets = [w for w in cmd.words[2:] if not w.startswith("-")]
    assert targets, cmd.text
    for target in targets:
        m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
        assert m, f"{cmd.text}: installs {target}, not this project"
        named = m.group(1).split(",") if m.group(1) else []
        assert set(named) <= set(extras), f"{cmd.text}: no extra {set(named) - set(extras)} in pyproject.toml"


@pytest.mark.parametrize("cmd", commands_of("pytest"), ids=command_ids(commands_of("pytest")))
def test_pytest_command_uses_registered_markers(cmd: Command) -> None:
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {m.split(":")[0].strip() for m in ini["markers"]}
    words = list(cmd.words[3:])
    for flag, value in zip(words, [*words[1:], ""], strict=True):
        if flag == "-m":
            named = set(re.findall(r"\w+", value)) - {"and", "or", "not"}
            assert named <= registered, f"{cmd.text}: markers {named - registered} are not registered"
    paths = [w for w in words if not w.startswith("-") and (REPO / w).suffix == ".py"]
    assert all((REPO / p).is_file() for p in paths), f"{cmd.text}: no such test file"
