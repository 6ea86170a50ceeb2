"""`python -m wsss.run --help`: Hydra's `hydra/help` template filled with wsss's own text.

The stages, the config groups and their options are read from the registries when the help is shown (through
the `wsss_help` resolver), so the help lists what the code has, never a copy. Hydra then substitutes its own
`$FLAGS_HELP` into the template (`string.Template`), so the resolver writes every `$` of the text as `$$`.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from wsss.stages.base import Stage

WIDTH = 120
GROUND_TRUTH = "the dataset's ground truth"  # what a stage with `ground_truth` needs besides its upstream stages
REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"  # run.py's config_path, "../conf"

# The overrides most runs need, each with one line; tests/test_help.py composes and validates every one.
OVERRIDES: tuple[tuple[str, str], ...] = (
    ("stage=pseudo_masks", "stop after the pseudo masks"),
    ("dataset=folder dataset.root=DIR", "your own images: DIR/images/ and a labels file (docs/own-data.md)"),
    ("model.checkpoint=PATH", "a trained classifier (a model.pt) instead of training one"),
    ("cam=gradcampp", "another CAM method (the cam group above)"),
    ("pseudo.threshold=0.4", "the background threshold: a pixel whose best map is not above it is background"),
    ("pseudo.refine=crf", "refine the maps before thresholding (the pseudo.refine choices above)"),
    ("dataset.eval_split=val", "make CAMs, masks and scores on this split (default train)"),
    ("evaluate.select_on=val", "choose the threshold on this split and report dataset.eval_split at it"),
    ("train.epochs=5", "train for this many epochs (default 50)"),
    ("device=cpu", "where to compute: auto (the default: a GPU if there is one), cpu, cuda, cuda:N"),
    ("progress=log", "a log line per 10 % of a loop instead of progress bars (Slurm, CI, output to a file)"),
    ("-m pseudo.threshold=0.3,0.5", "a sweep: one job per value (or combination), a leaderboard at the end"),
    ("--cfg job", "print the composed config, every key there is to override, and exit"),
)

HEADER = """\
wsss: weakly supervised semantic segmentation from image-level labels. A GAP classifier's class activation maps
become pseudo masks, refined and scored; every stage is cached by all it depends on, so a sweep trains once.

Usage: python -m wsss.run [stage=NAME] [group=option ...] [key=value ...]      (-m: one job per comma-list value)
"""

FOOTER = "Hydra's own help (its groups, the hydra.* keys): python -m wsss.run --hydra-help; https://hydra.cc"

COMPLETION = """\
== Tab completion of groups, options and keys (bash; zsh with bashcompinit) ==
  eval "$(python -m wsss.run -sc install=bash)"    then, in the repository root: python wsss/run.py cam=<TAB>
  (Hydra completes `python FILE.py` and installed commands, not `python -m MODULE`: hydra issue #1957)"""

TEMPLATE = """\
${hydra.help.header}
${wsss_help:}

== Hydra's flags ==
$FLAGS_HELP

${hydra.help.footer}
"""


def _rows(rows: list[tuple[str, str]], indent: int = 2) -> list[str]:
    """`name  text` rows, the text column aligned and wrapped at WIDTH with a hanging indent."""
    col = indent + max(len(name) for name, _ in rows) + 2
    out = []
    for name, text in rows:
        first = f"{' ' * indent}{name:<{col - indent}}"
        out += textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=" " * col, break_on_hyphens=False)
    return out


def _options(names: list[str], chosen: Any) -> str:
    """The options of a group, the chosen one marked `*`."""
    return ", ".join(f"{n}*" if n == chosen else n for n in names)


def first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph, its lines joined and a `Stage `x`:` (or `Stages `x`
    and `y`:`) prefix dropped: up to the first `.`, `?` or `!` before a space or the end, outside parentheses and
    backticks; its first letter capitalised."""
    para = " ".join(text.strip().split("\n\n", 1)[0].split())
    para = re.sub(r"^Stages? `\w+`(?:(?:, | and )`\w+`)*: ", "", para)
    depth, code = 0, False
    for i, ch in enumerate(para):
        if ch == "`":
            code = not code
        elif code:
            continue
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch in ".?!" and depth == 0 and (i + 1 == len(para) or para[i + 1] == " "):
            para = para[: i + 1]
            break
    return para[:1].upper() + para[1:]


def describe(stage: Stage) -> str:
    """A stage's one sentence: its declared `summary`, else its module docstring's first sentence."""
    return stage.summary or first_sentence(sys.modules[stage.run.__module__].__doc__ or "")


def needs_text(stage: Stage, cfg: DictConfig) -> str:
    """`Needs a, b.`: the stages whose artifacts `stage` consumes under `cfg`, and the ground truth if it does."""
    split = stage.split(cfg)
    needs = list(dict.fromkeys(n.stage for n in stage.needs(cfg, split).values()))
    if stage.ground_truth(cfg, split):
        needs.append(GROUND_TRUTH)
    return f"Needs {', '.join(needs) or 'nothing'}."


def stage_rows(cfg: DictConfig | None) -> list[tuple[str, str]]:
    """(stage, what it makes and, under `cfg`, what it needs) for every stage of `wsss.stages.STAGES`."""
    from wsss.stages import STAGES

    return [(name, describe(s) + (f" {needs_text(s, cfg)}" if cfg is not None else "")) for name, s in STAGES.items()]


def group_options() -> dict[str, list[str]]:
    """Every config group (and the one choice key, pseudo.refine) with its options, from the registries."""
    from wsss.cam import METHODS
    from wsss.cam.clip_es import CLIP_METHODS
    from wsss.data import DATASETS
    from wsss.models import BACKBONES
    from wsss.models.clip import CLIP_BACKBONES
    from wsss.refine import REFINERS
    from wsss.stages import STAGES

    return {
        "stage": sorted(STAGES),
        "dataset": sorted(DATASETS),
        "model": sorted([*BACKBONES, *CLIP_BACKBONES]),
        "cam": sorted([*METHODS, *CLIP_METHODS]),
        "experiment": sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")),
        "pseudo.refine": list(REFINERS),
    }


def docs_line() -> str:
    """README.md, every page of docs/ and BENCHMARKS.md, as they are on disk."""
    pages = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "docs").glob("*.md"))]
    return ", ".join(["README.md (start here)", *pages, "BENCHMARKS.md"])


def help_body(cfg: DictConfig | None = None) -> str:
    """The help between Hydra's header and its flags; with `cfg` (the composed config) the current choices and
    each stage's needs under it are shown."""
    chosen: dict[str, Any] = {}
    if cfg is not None:
        chosen = dict(OmegaConf.select(cfg, "hydra.runtime.choices", default=None) or {})
        chosen["pseudo.refine"] = OmegaConf.select(cfg, "pseudo.refine", default=None)
    groups = group_options()
    notes = {"experiment": " (a paper's recipe over several groups; default: none)", "pseudo.refine": " (a key)"}
    lines = ["== Stages: stage=NAME runs NAME after what it needs (unless cached) ==", *_rows(stage_rows(cfg))]
    lines += ["", "== Config groups: group=option (* this run's choice) =="]
    lines += _rows([(g, _options(opts, str(chosen.get(g))) + notes.get(g, "")) for g, opts in groups.items()])
    lines += ["", "== Common overrides (README.md and docs/config.md have more) =="]
    lines += _rows(list(OVERRIDES))
    lines += ["", COMPLETION, "", "== Docs =="]
    lines += textwrap.wrap(docs_line(), WIDTH, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)


def _resolve_help(*, _root_: DictConfig) -> str:
    return help_body(_root_).replace("$", "$$")


def register_help() -> None:
    """Register the `wsss_help` resolver and the `hydra/help: wsss` config that conf/config.yaml selects."""
    OmegaConf.register_new_resolver("wsss_help", _resolve_help, replace=True)
    node = {"app_name": "wsss", "header": HEADER, "footer": FOOTER, "template": TEMPLATE}
    ConfigStore.instance().store(group="hydra/help", name="wsss", node=node)
