"""docs/RELIABILITY.md promises things and names the tests that hold them: every test it names
exists (``test_file.py``, ``test_file.py::test_name`` or a bare ``test_name`` in some test file),
so a renamed or deleted test cannot leave a promise citing nothing."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED = re.compile(r"`(?:(test_\w+\.py)(?:::(test_\w+))?|(test_\w+))(?:\[[^\]`]*\])?`")


def missing_tests(text: str, tests: dict[str, str]) -> list[str]:
    """The citations in ``text`` whose file or test function is not in ``tests`` (file name ->
    source)."""
    everything = "\n".join(tests.values())
    missing = []
    for match in CITED.finditer(text):
        file, name, bare = match.groups()
        source = tests.get(file, "") if file else everything
        function = name or bare
        if (file and file not in tests) or \
                (function and not re.search(rf"^\s*def {function}\(", source, re.M)):
            missing.append(match.group(0))
    return missing


def test_every_test_the_reliability_page_names_exists():
    tests = {path.name: path.read_text() for path in (REPO / "tests").glob("test_*.py")}
    text = (REPO / "docs" / "RELIABILITY.md").read_text()
    assert len(CITED.findall(text)) > 50  # the page's citations are found at all
    assert missing_tests(text, tests) == []


def test_a_renamed_test_is_caught():
    tests = {"test_a.py": "def test_kept():\n    pass\n"}
    text = ("| promise | how | `test_a.py::test_kept`, `test_kept[cpu]`, `test_a.py::test_gone`, "
            "`test_b.py`, `test_renamed` |")
    assert missing_tests(text, tests) == ["`test_a.py::test_gone`", "`test_b.py`",
                                          "`test_renamed`"]
