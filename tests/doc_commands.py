"""The commands of README.md and docs/*.md as the shell reads them, and what a `wsss.run` command launches:
the extraction and the job expansion `test_doc_commands.py` and `test_help.py` check with."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from tests.conftest import CONF_DIR, REPO
from wsss.config import register_configs

register_configs()

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*```+\s*(\S*)")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
STARTS = ("python ", "torchrun ", "pip ")

# Inline spans written as a synopsis rather than a command, and the commands they stand for.
SYNOPSES = {
    "python -m wsss.cache list / prune": ("python -m wsss.cache list", "python -m wsss.cache prune"),
    "python -m wsss.report DIR [DIR ...]": ("python -m wsss.report DIR DIR",),
}


@dataclass(frozen=True)
class Command:
    """One command of a document: where it is, its text and its words (as the shell splits them)."""

    where: str  # "README.md:17", with ".2" for the second command of an `&&` chain
    text: str
    words: tuple[str, ...]
    fenced: bool

    @property
    def kind(self) -> str | None:
        w = self.words
        if w[0] == "torchrun":
            try:
                return "run" if torchrun_args(w).training_script == "wsss.run" else None
            except SystemExit:  # torchrun's parser refused the words
                return None
        if w[:2] == ("pip", "install"):
            return "pip"
        if w[0] in ("python", "python3") and len(w) > 1:
            if w[1] == "wsss/run.py":  # the same app as `-m wsss.run`, the form Hydra's tab completion knows
                return "run"
            if w[1] == "-m" and len(w) > 2:
                return {"wsss.run": "run", "wsss.report": "report", "wsss.cache": "cache", "pytest": "pytest"}.get(w[2])
            if w[1].startswith("scripts/") and w[1].endswith(".py"):
                return "script"
        return None


def torchrun_args(words: tuple[str, ...]):
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(list(words[1:]))


def _split(line: str, where: str, fenced: bool) -> list[Command]:
    """A shell line as commands: comments dropped, `&&` / `;` / `||` chains split."""
    words = shlex.split(line, comments=True)
    parts: list[list[str]] = [[]]
    for w in words:
        if w in ("&&", ";", "||"):
            parts.append([])
        else:
            parts[-1].append(w)
    parts = [p for p in parts if p]
    return [
        Command(where if len(parts) == 1 else f"{where}.{i}", shlex.join(p), tuple(p), fenced)
        for i, p in enumerate(parts, 1)
    ]


def shell_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """The fenced blocks of a Markdown file: (language, line of the first content line, lines)."""
    blocks, lang, start, body = [], None, 0, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and lang is None:
            lang, start, body = m.group(1).lower(), n + 1, []
        elif line.strip().startswith("```") and lang is not None:
            blocks.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path.name}: a fenced block opened at line {start - 1} is never closed"
    return blocks


def fenced_commands(path: Path) -> list[Command]:
    out = []
    for lang, start, body in shell_blocks(path):
        if lang not in SHELL_BLOCKS:
            continue
        n, line = 0, ""
        for i, text in enumerate(body):
            if not line:
                n = start + i
            if text.rstrip().endswith("\\"):
                line += text.rstrip()[:-1] + " "
                continue
            out += _split(line + text, f"{path.name}:{n}", fenced=True)
            line = ""
        assert not line, f"{path.name}:{n}: a line continuation runs off the end of its block"
    return out


def inline_commands(path: Path) -> list[Command]:
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    for _, start, body in shell_blocks(path):  # blank the fenced blocks, keeping the line numbers
        for i in range(start - 2, start + len(body)):
            lines[i] = "\n"
    text = "".join(lines)
    out = []
    for m in INLINE.finditer(text):
        span = " ".join(m.group(1).split())
        if not span.startswith(STARTS):
            continue
        where = f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}"
        for i, cmd in enumerate(SYNOPSES.get(span, (span,)), 1):
            out += _split(cmd, where if len(SYNOPSES.get(span, ())) < 2 else f"{where}.{i}", fenced=False)
    return out


COMMANDS = [c for p in DOCS for c in (*fenced_commands(p), *inline_commands(p))]


def commands_of(kind: str) -> list[Command]:
    return [c for c in COMMANDS if c.kind == kind]


def command_ids(commands: list[Command]) -> list[str]:
    return [c.where for c in commands]


# ----------------------------------------------------------------------------------------------- extraction


def fill_placeholders(words: tuple[str, ...], tmp: Path) -> list[str]:
    """The words with placeholders made real: a file for PATH, a folder for DIR / ROOT / <...>, every option for
    `group=NAME`; `...` (more overrides) dropped. Composition reads no file, but the values are real anyway."""
    (tmp / "model.pt").touch()
    (tmp / "dir").mkdir(exist_ok=True)
    real = {"PATH": str(tmp / "model.pt"), "DIR": str(tmp / "dir"), "ROOT": str(tmp / "dir")}
    out = []
    for w in words:
        if w == "...":
            continue
        key, eq, value = w.rpartition("=")
        if eq and value == "NAME" and (CONF_DIR / key).is_dir():
            value = ",".join(sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml")))
        elif value in real or re.fullmatch(r"<[^>]+>", value):
            value = real.get(value, str(tmp / "dir"))
        out.append(f"{key}{eq}{value}")
    return out


# ----------------------------------------------------------------------------------------------- wsss.run

HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p")
HYDRA_FLAGS = ("--resolve", "--help")


def run_args(words: list[str]) -> tuple[bool, list[str]]:
    """(multirun, overrides) of a `python -m wsss.run` or `torchrun ... -m wsss.run` command."""
    if words[0] == "torchrun":
        args = torchrun_args(tuple(words))
        assert args.module, "torchrun runs wsss.run as a module: `-m wsss.run`"
        words = ["python", "-m", "wsss.run", *args.training_script_args]
    elif words[1] == "wsss/run.py":
        words = ["python", "-m", "wsss.run", *words[2:]]
    multirun, overrides, rest = False, [], iter(words[3:])
    for w in rest:
        if w in ("-m", "--multirun"):
            multirun = True
        elif w in HYDRA_FLAGS_WITH_VALUE:
            next(rest)
        elif w.startswith("-"):
            assert w in HYDRA_FLAGS, f"a wsss.run flag this test does not know: {w}"
        else:
            overrides.append(w)
    return multirun, overrides


def sweep_jobs(multirun: bool, overrides: list[str]) -> list[list[str]]:
    """The jobs a command launches: one, or with `-m` what Hydra's BasicSweeper makes of the comma lists."""
    if not multirun:
        return [overrides]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    return batch


def compose_job(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def job_config(cfg: DictConfig) -> DictConfig:
    """What `--cfg job` prints: the config without its `hydra` node."""
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def assert_applied(cfg: DictConfig, overrides: list[str]) -> None:
    """Each override's value is in the composed config: a group's choice, or the value at the key."""
    choices = cfg.hydra.runtime.choices
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_delete():
            continue
        key, value = o.key_or_group, o.value()
        if key in choices:
            assert choices[key] == value, f"{o.input_line}: the config chose {key}={choices[key]}"
        else:
            got = OmegaConf.select(cfg, key)
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert got == value, f"{o.input_line}: the composed config has {key}={got!r}"
