"""README.md and docs/: the README stays short, every relative link resolves, and the documented commands that
redraw the shipped tables and figures work on a fresh clone (their inputs are shipped; the tables they write are
the shipped ones)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO

README_MAX_LINES = 250
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _prose(text: str) -> str:
    """The page without its fenced code blocks (links inside them are not links)."""
    return FENCE.sub("", text)


def _anchors(page: Path) -> set:
    """GitHub's heading ids: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*)$", _prose(page.read_text()), re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:  # repeated headings get -1, -2, ...
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_readme_stays_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move reference material to docs/"


def test_the_docs_pages_exist():
    assert len(PAGES) > 1, "docs/*.md is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_a_file_that_exists(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


def _documented_commands(module: str) -> list:
    """Every ``python -m <module> ...`` line in a fenced block of README.md or docs/, as argument lists
    (continuation lines joined, comments dropped), without repeats."""
    commands = []
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if not line.startswith(f"python -m {module} "):
                    continue
                words = shlex.split(line, comments=True)[3:]
                if words not in commands:
                    commands.append(words)
    return commands


@pytest.mark.parametrize("module", ["experiments.table", "experiments.figures"])
def test_documented_table_and_figure_commands_read_only_shipped_files(module):
    """A fresh clone has no runs/: what these commands read must be in the repository."""
    commands = _documented_commands(module)
    assert commands, f"no documented python -m {module} command"
    for args in commands:
        inputs, names_left = [], 0
        for word in args:  # --out and --prefix take one name, --by columns up to the next flag: none are files
            if word.startswith("-"):
                names_left = {"--out": 1, "--prefix": 1, "--by": len(args)}.get(word, 0)
            elif names_left:
                names_left -= 1
            else:
                inputs.append(word)
        assert inputs, args
        missing = [word for word in inputs if not (REPO / word).exists()]
        assert not missing, f"python -m {module} {' '.join(args)}: {missing} not shipped"


def test_documented_table_commands_write_the_shipped_tables(tmp_path, capsys):
    """Each documented ``experiments.table`` command, run on the shipped CSV, writes the file name the
    repository ships, with the shipped content."""
    from experiments.table import main

    for args in _documented_commands("experiments.table"):
        csv = Path(args[0])
        out = Path(args[args.index("--out") + 1]) if "--out" in args else csv.with_name(f"{csv.stem}-table")
        shipped = REPO / out.parent / f"{out.name}.md"
        assert shipped.exists(), f"{' '.join(args)} would write {out}.md, which the repository does not ship"
        rest = [a for a, previous in zip(args, [None, *args]) if "--out" not in (a, previous)]
        assert main([str(REPO / rest[0]), *rest[1:], "--out", str(tmp_path / out.name)]) == 0
        assert (tmp_path / f"{out.name}.md").read_text() == shipped.read_text(), args
        assert (tmp_path / f"{out.name}.csv").read_text() == shipped.with_suffix(".csv").read_text(), args
    capsys.readouterr()
