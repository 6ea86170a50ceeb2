"""README.md stays a front door: at most 200 lines (details go to docs/), and every local link resolves."""

from __future__ import annotations

import re

from tests.conftest import REPO

README = REPO / "README.md"
MAX_LINES = 200


def test_readme_is_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"


def test_readme_local_links_exist():
    text = README.read_text()
    targets = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)]+)\)", text) if "://" not in t]
    missing = [t for t in targets if t and not (REPO / t).exists()]
    assert not missing, missing


def test_readme_has_no_unfilled_placeholder():
    assert not re.search(r"\bREADME_[A-Z_]+\b", README.read_text())
