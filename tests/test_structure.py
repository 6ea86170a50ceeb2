"""The house rules of wsss/ (scripts/check_structure.py): no import cycle, no module over 450 lines, no
function over 70 lines; and the checker itself finds a cycle, a long module and a long function it is shown."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import check_structure


def test_wsss_keeps_the_house_rules():
    assert check_structure.breaches() == []


def test_the_checker_sees_a_cycle_a_long_module_and_a_long_function(tmp_path):
    pkg = tmp_path / "wsss"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from wsss import b\n")
    (pkg / "b.py").write_text("def f():\n    from wsss.a import x\n" + "    y = 1\n" * 70)
    (pkg / "c.py").write_text("from . import a\n" + "z = 1\n" * 450)
    found = check_structure.breaches(tmp_path)
    assert "import cycle: wsss.a <-> wsss.b" in found
    assert "module wsss.c: 451 lines (at most 450)" in found
    assert "function wsss.b:1 f: 72 lines (at most 70)" in found
    assert len(found) == 3
