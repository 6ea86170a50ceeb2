"""`python -m wsss.run --help` lists every stage, group and option the code has, and Hydra's completion works.

Nothing here lists a stage, group or option by hand: the groups are conf/'s folders (plus the one choice key,
`pseudo.refine`), their options are read from the registries and from conf/, and the overrides are the ones the
help itself lists (`wsss.help.OVERRIDES`), each composed and validated as the docs' commands are.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF_DIR, REPO
from tests.doc_commands import assert_applied, compose_job, fill_placeholders, job_config, run_args, sweep_jobs
from tests.tiny import FORK_SERVER
from wsss.config import register_configs, validate
from wsss.help import OVERRIDES, WIDTH, help_body

register_configs()

MAX_LINES = 100  # two screens


def _registries() -> dict[str, list[str]]:
    """Each group's options as the code has them: its registry, and for a conf/ group also its files."""
    from wsss.cam import METHODS
    from wsss.data import DATASETS
    from wsss.models import BACKBONES
    from wsss.refine import REFINERS
    from wsss.stages import STAGES

    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF_DIR.iterdir() if p.is_dir()}
    from wsss.cam.clip_es import CLIP_METHODS
    from wsss.models.clip import CLIP_BACKBONES

    registry = {
        "stage": STAGES,
        "dataset": DATASETS,
        "model": [*BACKBONES, *CLIP_BACKBONES],
        "cam": [*METHODS, *CLIP_METHODS],
    }
    for name, options in registry.items():
        assert groups[name] == sorted(options), f"conf/{name}/ and its registry differ"  # as test_config checks
    return {**groups, "pseudo.refine": sorted(REFINERS)}


def _section(text: str, title: str) -> dict[str, str]:
    """The rows of a `== title ...` section: first word -> the rest, wrapped lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== {title}"))
    rows: dict[str, str] = {}
    last = ""
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        if re.match(r"  \S", line):  # a row; deeper indents continue the row above
            last, _, rest = line.strip().partition(" ")
            rows[last] = rest.strip()
        else:
            rows[last] += " " + line.strip()
    return rows


def _options(row: str) -> tuple[list[str], list[str]]:
    """(options, the chosen ones) of a group row: `a, b*, c (a note)`."""
    listed = [o.strip() for o in re.sub(r" \(.*\)$", "", row).split(",")]
    return sorted(o.rstrip("*") for o in listed), [o.rstrip("*") for o in listed if o.endswith("*")]


@pytest.fixture(scope="module")
def rendered() -> str:
    proc = FORK_SERVER.run(["--help"], dict(os.environ), timeout=300)  # `python -m wsss.run --help`
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_help_fits_two_screens(rendered: str) -> None:
    screen_lines = sum(max(1, -(-len(line) // WIDTH)) for line in rendered.splitlines())
    assert screen_lines <= MAX_LINES, f"{screen_lines} lines at {WIDTH} columns:\n{rendered}"


def _needs(stage, cfg) -> str:
    """What a stage's declaration says it needs under `cfg`, as the help words it."""
    split = stage.split(cfg)
    needs = list(dict.fromkeys(n.stage for n in stage.needs(cfg, split).values()))
    needs += ["the dataset's ground truth"] if stage.ground_truth(cfg, split) else []
    return f"Needs {', '.join(needs) or 'nothing'}."


def _whole_sentence(text: str) -> bool:
    """Capitalised, ended by `.`, `?` or `!`, and no parenthesis or code span left open."""
    spans = re.sub(r"`[^`]*`", "", text)
    return text[:1].isupper() and text[-1] in ".?!" and spans.count("(") == spans.count(")") and "`" not in spans


def test_help_lists_every_stage_with_a_whole_sentence_and_what_it_needs(rendered: str) -> None:
    from wsss.stages import STAGES

    rows = _section(rendered, "Stages")
    assert list(rows) == list(STAGES), rendered  # every stage, in the registry's (pipeline) order
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)  # what `--help` alone composes
    for name, stage in STAGES.items():
        needs = _needs(stage, cfg)
        assert rows[name].endswith(f" {needs}"), (name, rows[name], needs)
        what = rows[name].removesuffix(f" {needs}")
        assert _whole_sentence(what), (name, what)
        if stage.summary:
            assert what == stage.summary, name
        else:  # the module docstring's own words, from its first one after the `Stage `name`:` prefix
            doc = " ".join((sys.modules[stage.run.__module__].__doc__ or "").split())
            assert doc.startswith(f"Stage `{name}`: ") or doc.startswith("Stages "), (name, doc[:80])
            assert f": {what[0].lower()}{what[1:]}" in doc or f": {what}" in doc, (name, what)
    assert rows["segment_gt_train"].endswith(" Needs the dataset's ground truth."), rows["segment_gt_train"]
    assert rows["segment_gt"].endswith(" Needs segment_gt_train."), rows["segment_gt"]
    assert rows["faithfulness"].startswith("Do the stored CAMs show what the classifier used? Needs "), rows


def test_help_lists_every_group_with_its_options(rendered: str) -> None:
    rows = _section(rendered, "Config groups")
    expected = _registries()
    assert sorted(rows) == sorted(expected), rendered
    for group, options in expected.items():
        listed, chosen = _options(rows[group])
        assert listed == options, f"{group}: the help lists {listed}, the code has {options}"
        assert len(chosen) <= 1, rows[group]


def test_help_lists_the_overrides_and_where_the_docs_are(rendered: str) -> None:
    assert len(_section(rendered, "Common overrides")) == len(OVERRIDES)
    words = " ".join(rendered.split())  # the columns' padding and the wrapping undone
    for override, what in OVERRIDES:
        assert f" {override} {what}" in words, override
    docs = re.findall(r"\b(?:docs/\w[\w-]*\.md|README\.md|BENCHMARKS\.md)\b", rendered)
    pages = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")}
    assert {"README.md", "BENCHMARKS.md", *pages} <= set(docs), rendered
    assert all((REPO / d).is_file() for d in docs), [d for d in docs if not (REPO / d).is_file()]
    assert "--shell-completion" in rendered  # Hydra's own flags
    assert 'eval "$(python -m wsss.run -sc install=bash)"' in rendered  # one `$`: Hydra's template unescaped it


@pytest.mark.parametrize("override", [o for o, _ in OVERRIDES])
def test_every_listed_override_composes_and_validates(override: str, tmp_path) -> None:
    """As `python -m wsss.run <override>` would: every job composes, the values are applied, validation passes."""
    multirun, overrides = run_args(fill_placeholders(("python", "-m", "wsss.run", *override.split()), tmp_path))
    for job in sweep_jobs(multirun, overrides):
        cfg = compose_job(job)
        assert_applied(cfg, job)
        validate(job_config(cfg))


def test_help_marks_the_choices_and_needs_of_the_composed_config() -> None:
    from wsss.stages import STAGES

    overrides = ["cam=gradcampp", "dataset=voc12", "pseudo.refine=rw", "stage=refine", "experiment=irn_voc12"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    text = help_body(cfg)
    rows = _section(text, "Config groups")
    for o in overrides:
        group, _, option = o.partition("=")
        assert _options(rows[group])[1] == [option], rows[group]
    stages = _section(text, "Stages")
    for name, stage in STAGES.items():
        needs = {n.stage for n in stage.needs(cfg, stage.split(cfg)).values()}
        shown = stages[name].rpartition(" Needs ")[2].removesuffix(".")
        assert set(shown.split(", ")) - {"nothing", "the dataset's ground truth"} == needs, (name, shown)
    assert stages["refine"].endswith(" Needs cams, affinity.")  # pseudo.refine=rw: the walk needs AffinityNet


def _query(line: str) -> list[str]:
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    proc = FORK_SERVER.run(["-sc", "query=bash"], env, timeout=300)  # `python -m wsss.run -sc query=bash`
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_completion_query_lists_the_cam_methods() -> None:
    from wsss.cam import METHODS

    got = _query("python wsss/run.py cam=")
    assert {f"cam={m}" for m in METHODS} <= set(got), got
    assert all(g.startswith("cam=") for g in got), got


def test_completion_installs_and_completes_in_bash() -> None:
    """What a user gets: the install script eval'd in bash, then Tab after `python wsss/run.py cam=grad`."""
    bash = shutil.which("bash")
    python = Path(sys.executable).parent / "python"
    if bash is None or not python.is_file():
        pytest.skip("needs bash and a `python` beside this interpreter")
    script = (
        'eval "$(python -m wsss.run -sc install=bash)"\n'
        'COMP_LINE="python wsss/run.py cam=grad"; COMP_POINT=${#COMP_LINE}\n'
        "COMP_WORDS=($COMP_LINE); COMP_CWORD=2\n"
        "hydra_bash_completion\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([bash, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from wsss.cam import METHODS

    assert sorted(proc.stdout.split()) == sorted(f"cam={m}" for m in METHODS if m.startswith("grad")), proc.stdout
