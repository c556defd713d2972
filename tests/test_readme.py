"""README.md is a front page: short, the usage near the top, CI's two commands first, every link resolving and
every result number rendered from the committed JSON (benchmarks/render_readme.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_readme  # noqa: E402

INSTALL = (
    'python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e ".[train,dev]" '
    "&& .venv/bin/python examples/quickstart.py"
)
TEST = ".venv/bin/python -m pytest -q"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _blocks(lines, lang):
    """(first line, last line) (1-based, fences included) of every fenced block of ``lang``."""
    out, start = [], None
    for i, line in enumerate(lines, 1):
        if start is None and line == f"```{lang}":
            start = i
        elif start is not None and line == "```":
            out.append((start, i))
            start = None
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path):
    return {_slug(line) for line in path.read_text().split("\n") if line.startswith("#")}


def _broken_links(path: Path):
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    return broken


def test_readme_is_a_front_page():
    lines = README.read_text().split("\n")
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move prose to docs/"
    usage = [(a, b) for a, b in _blocks(lines, "python") if "tocom_hub.patch(" in "\n".join(lines[a:b])]
    assert usage and usage[0][1] <= 40, "the patch / set_r usage must end within README.md's first 40 lines"
    snippet = "\n".join(lines[usage[0][0] : usage[0][1]])
    assert "timm.create_model(" in snippet and "tocom_hub.set_r(" in snippet


def test_readme_starts_with_the_two_ci_commands():
    """.ci/run reads the first line of the first two ```bash blocks: install + quickstart, then the tests."""
    lines = README.read_text().split("\n")
    bash = _blocks(lines, "bash")
    assert [lines[a] for a, _ in bash[:2]] == [INSTALL, TEST]
    assert [b - a for a, b in bash[:2]] == [2, 2], "each of the two commands is a one-line block"


def test_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists (and a heading that exists)."""
    pages = [README, ROOT / "benchmarks" / "study" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = {str(p.relative_to(ROOT)): _broken_links(p) for p in pages}
    if not (ROOT / "docs" / "serving.md").exists():  # written by the serving branch; strict once it is merged
        broken["docs/export.md"].remove("serving.md")
    assert broken == {str(p.relative_to(ROOT)): [] for p in pages}
    linked = {t.partition("#")[0] for t in LINK.findall(README.read_text())}
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= linked, "README.md links every docs page"


def test_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page.write_text("[ok](other.md#a-section) [gone](missing.md) [no anchor](other.md#nowhere)")
    assert _broken_links(page) == ["missing.md", "other.md#nowhere"]


def test_result_numbers_come_from_rendered_tables():
    """A table with a number in README.md sits under a render_readme marker; the prose holds no speed-up,
    percentage with decimals or signed point change (those belong in a rendered table)."""
    lines = README.read_text().split("\n")
    code = {i for a, b in _blocks(lines, "python") + _blocks(lines, "bash") for i in range(a - 1, b)}
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            if any(re.search(r"\d", line) for line in lines[start:i]):
                marker = lines[start - 1].strip()
                assert marker.startswith("<!-- ") and marker[5:-4] in render_readme.TABLES, (
                    f"README.md line {start + 1}: a table with numbers that no marker renders"
                )
            continue
        if i not in code:
            hit = re.search(r"\d+(\.\d+)?\s?×|\d+\.\d+\s?%|[+−]\d+\.\d+", lines[i])
            assert hit is None, f"README.md line {i + 1}: {hit.group(0)!r} — render it from the JSON"
        i += 1


def test_every_rendered_table_is_checked(tmp_path):
    """A hand-edited speed-up in the headline speed table is stale; rendering restores it."""
    readme = README.read_text()
    row = next(line for line in readme.split("\n") if line.startswith("| eager | 1 |"))
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace(row, row.replace("×", "×0", 1)))
    assert render_readme.stale(edited) == ["speed-table"]
    assert render_readme.main(["--readme", str(edited)]) == 0
    assert edited.read_text() == readme
