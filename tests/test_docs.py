"""The README and docs/: the README stays short, every figure is backed by a dated benchmark result,
every relative link resolves, and nothing points outside the repository.

A figure is a number with a unit or a percent sign (`2.65-2.9x`, `0.2-0.3 s`, `61.2%`, `3.5 GiB`,
`1.9 points`). Each paragraph, list item or table row that holds one must also link to a dated
result file in `benchmarks/results/` or to `benchmarks/README.md` (whose sections link theirs).
Fenced code blocks, inline code and HTML comments are not prose: a config value, a command's
output or a flag there is not a figure.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]  # where figures must be backed
LINKING = [*PAGES, ROOT / "CONTRIBUTING.md"]  # where every relative link must resolve
README_MAX_BYTES = 10_500

NUMBER = r"(?<![\w.,])\d[\d,]*(?:\.\d+)?"
UNIT = (r"%|points?\b|(?:s|ms|min|minutes?|seconds?|h|hours?)\b|[KMGT]i?B\b|trials/h\b|images/s\b"
        r"|[GT]FLOP(?:/s)?\b")
FIGURE = re.compile(rf"{NUMBER}(?:\s?(?:{UNIT})|x\b)")  # `3x` but not `4 x 512` nor `512x512`
BACKED = re.compile(r"^(?:\.\./)*benchmarks/(?:results/[^\s#]*\d{4}-\d{2}-\d{2}[^\s#]*|README\.md(?:#\S*)?)$")
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
UNIT_START = re.compile(r"^\s*(?:[-*+] |\d+\. |\||#)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks and HTML comments; code lines become blank."""
    text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group().count("\n"), text, flags=re.S)
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            lines.append((number, ""))
            continue
        lines.append((number, "" if fenced else line))
    return lines


def units(text: str) -> list[tuple[int, str]]:
    """Paragraphs, list items and table rows (first line number, text), code left out."""
    found: list[tuple[int, list[str]]] = []
    for number, line in prose_lines(text):
        if not line.strip():
            found.append((number, []))
            continue
        if UNIT_START.match(line) or not found or not found[-1][1] or found[-1][1][0].lstrip().startswith(("|", "#")):
            found.append((number, [line]))
        else:
            found[-1][1].append(line)
    return [(number, "\n".join(lines)) for number, lines in found if lines]


def without_inline_code(text: str) -> str:
    return re.sub(r"(`+).*?\1", " ", text, flags=re.S)


def figures(unit: str) -> list[str]:
    """The figures of a unit's prose: link targets and inline code left out, link text kept."""
    prose = LINK.sub(lambda m: m.group(1), without_inline_code(unit))
    return [m.group().strip() for m in FIGURE.finditer(prose)]


def links(unit: str) -> list[str]:
    return [m.group(2) for m in LINK.finditer(without_inline_code(unit))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text()):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
    return {f"{base}-{n}" if n else base for base, count in seen.items() for n in range(count)}


def unbacked(path: Path) -> list[str]:
    problems = []
    for number, unit in units(path.read_text()):
        found = figures(unit)
        if found and not any(BACKED.match(target) for target in links(unit)):
            problems.append(f"{path.relative_to(ROOT)}:{number}: {', '.join(found)} without a result link")
    return problems


def test_the_figure_check_finds_figures_and_skips_what_is_not_one():
    assert figures("2.65-2.9x faster, 0.2-0.3 s, 61.2% and 58.8 %, 3.5 GiB, +1.9 points, 20x slower, 3,438 trials/h") == [
        "2.9x", "0.3 s", "61.2%", "58.8 %", "3.5 GiB", "1.9 points", "20x", "3,438 trials/h"]
    assert figures("Python 3.11+, port 5000, K = 16 shots, 512x512 JPEGs, 4 x 512 head, bf16, sha256, "
                   "`--budget 20m`, `timeout: 60 s`, ViT-B/32, 2026-11-27, version 0.1.0") == []
    assert figures("[2.65-2.9x](../benchmarks/results/cpu-2026-11-26.md)") == ["2.9x"]
    text = "text\n\n```bash\nsleep 5 s  # 30%\n```\n\n- a 3x item\n  continued [r](benchmarks/README.md#a)\n| 5 % | row |\n"
    assert [(n, figures(u), links(u)) for n, u in units(text)] == [
        (1, [], []), (7, ["3x"], ["benchmarks/README.md#a"]), (9, ["5 %"], [])]
    assert BACKED.match("../benchmarks/results/selection-2026-11-27-e-score-window-seeds1-13.md")
    assert not BACKED.match("../benchmarks/results/search-table")
    assert slug("2026-11-27 (fifth run), the same machine: kfold's folds in lockstep") == (
        "2026-11-27-fifth-run-the-same-machine-kfolds-folds-in-lockstep")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_links_to_a_dated_result(path):
    problems = unbacked(path)
    assert not problems, "\n".join(problems)


def test_the_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (at most {README_MAX_BYTES})"


@pytest.mark.parametrize("path", LINKING, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    problems = []
    for number, unit in units(path.read_text()):
        for target in links(unit):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                problems.append(f"{path.relative_to(ROOT)}:{number}: {target} does not exist")
            elif not resolved.is_relative_to(ROOT):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {target} is outside the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_docs_index_lists_every_page_and_the_readme_links_it():
    index = (ROOT / "docs" / "README.md").read_text()
    for page in DOCS:
        if page.name != "README.md":
            assert f"({page.name})" in index or f"({page.name}#" in index, f"docs/README.md does not list {page.name}"
    readme = README.read_text()
    assert "(docs/README.md)" in readme and "(CONTRIBUTING.md)" in readme


def test_nothing_points_outside_the_repository():
    """Facts the code relies on are stated in docs/, not in files the repository does not have."""
    outside = re.compile(r"DESIGN\.md|REFERENCE\.md|\.\./shared\b")
    sources = [*LINKING, *sorted((ROOT / "hpo_peft").rglob("*.py"))]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sources
             for n, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not found, f"pointers to files outside the repository: {found}"
