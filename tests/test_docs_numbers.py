"""Every number in a table of README.md, docs/PERFORMANCE.md and docs/RESULTS.md comes from a
results file that its section names (``benchmarks/results/....json``): each numeric cell, at the
precision it is printed with, must equal a value of one of those files (seconds also as ms,
bytes as MiB, GiB or GB; a compare summary's runs also as each variant's mean run time). A cell
with words beyond units is prose and not checked. A table whose section names no results file,
or a number that none of its files holds, fails with the table's place and the number."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/PERFORMANCE.md", "docs/RESULTS.md"]
CITATION = re.compile(r"benchmarks/results/[\w./-]+\.json")
NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?![\w.])")


def sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """(heading, lines) of each ## or ### section."""
    heading, lines = "(top)", []
    for line in text.splitlines():
        if line.startswith(("## ", "### ")):
            yield heading, lines
            heading, lines = line.strip("# "), []
        else:
            lines.append(line)
    yield heading, lines


def tables(lines: list[str]) -> Iterator[list[list[str]]]:
    """Each markdown table's body rows (header and separator dropped), as lists of cells."""
    block: list[str] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) > 2:
            yield [[cell.strip() for cell in row.strip().strip("|").split("|")]
                   for row in block[2:]]
        block = []


def numbers_of(value: object) -> Iterator[float]:
    """Every number in a JSON value, with its units' other spellings."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        x = float(value)
        yield from (x, x * 1000, x / 2**20, x / 2**30, x / 1e9, x * 100)
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers_of(item)


UNITS = re.compile(r"\b(?:s|ms|GiB|MiB|GB|x|of)\b|%|±|\*\*|\[|\]|,|\+|-")


def mean_run_seconds(data: object) -> list[float]:
    """A compare summary's mean run time per variant (its "run s (mean)" column)."""
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        return []
    seconds: dict[str, list[float]] = {}
    for run in data["runs"]:
        if run["seconds"] is not None:  # a run compare did not time (trained before the suite)
            seconds.setdefault(run["variant"], []).append(run["seconds"])
    return [sum(v) / len(v) for v in seconds.values()]


def printed(cell: str) -> list[tuple[float, int]]:
    """The numbers of a numeric cell with their decimals (integers with thousands separators
    too); none for a cell with words beyond units ("cannot run", "modelled"), which is prose."""
    if re.search(r"[A-Za-z]", UNITS.sub(" ", cell)):
        return []
    found = []
    for match in NUMBER.findall(cell.replace("**", "")):
        text = match.replace(",", "")
        decimals = len(text.split(".")[1]) if "." in text else 0
        found.append((float(text), decimals))
    return found


def matches(value: float, decimals: int, pool: list[float]) -> bool:
    tolerance = 0.5 * 10.0 ** -decimals + 1e-9
    return any(math.isfinite(x) and abs(x - value) <= tolerance for x in pool)


def check(doc: str) -> list[str]:
    problems = []
    for heading, lines in sections((REPO / doc).read_text()):
        found = list(tables(lines))
        if not found:
            continue
        cited = sorted(set(CITATION.findall("\n".join(lines))))
        if not cited:
            problems.append(f"{doc}, '{heading}': a table, but the section names no "
                            f"benchmarks/results/*.json")
            continue
        pool: list[float] = []
        for name in cited:
            path = REPO / name
            if not path.exists():
                problems.append(f"{doc}, '{heading}': {name} does not exist")
                continue
            data = json.loads(path.read_text())
            pool.extend(numbers_of(data))
            pool.extend(mean_run_seconds(data))
        for table in found:
            for row in table:
                for cell in row[1:]:  # the first column names the row
                    for value, decimals in printed(cell):
                        if not matches(value, decimals, pool):
                            problems.append(f"{doc}, '{heading}', row '{row[0]}': {cell!r} is "
                                            f"in none of {', '.join(cited)}")
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_every_table_number_is_in_its_results_files(doc):
    problems = check(doc)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_changed_number(tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "x.json").write_text(json.dumps({"recall": 0.8304, "seconds": 1.2,
                                                "bytes": 3 * 2**30}))
    doc = tmp_path / "doc.md"
    table = "| a | b | c |\n|---|---:|---:|\n"
    doc.write_text(f"## Ok\nFrom `benchmarks/results/x.json`.\n\n{table}| row | 0.830 | 1.2 s |\n"
                   f"| row | 1200 ms | 3.00 GiB |\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert check("doc.md") == []
    doc.write_text(f"## Changed\nFrom `benchmarks/results/x.json`.\n\n{table}"
                   f"| row | 0.832 | 1.2 s |\n")
    assert check("doc.md") == ["doc.md, 'Changed', row 'row': '0.832' is in none of "
                               "benchmarks/results/x.json"]
    doc.write_text(f"## Uncited\n\n{table}| row | 0.830 | 1.2 s |\n")
    assert "names no benchmarks/results" in check("doc.md")[0]
