"""`vision.py --help` and flag errors answer without importing torch, and help speaks in readable defaults."""
from __future__ import annotations

import subprocess
import sys

import pytest

from src.cli import build_parser, readable
from tests.conftest import REPO

# Runs vision.main in a fresh interpreter and reports whether torch got imported on the way.
PROBE = """
import sys
sys.path.insert(0, {repo!r})
import vision
try:
    code = vision.main({argv!r})
except SystemExit as exit:
    code = exit.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["--dataset", "mnist", "--lr", "x"], 2),
                                       (["--dataset", "mnist", "--noise", "-1"], 2),
                                       (["--dataset", "mnist", "--accountant", "gdp"], 2)])
def test_help_and_bad_flags_do_not_import_torch(argv, code):
    result = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO), argv=argv)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == f"NO-TORCH {code}", result.stdout + result.stderr


def test_help_shows_every_default_readably():
    text = build_parser().format_help()
    assert "(default: bk)" in text and "default: 1e-05" in text and "default: per dataset, below" in text
    assert "--pgd-eps 8/255" in text and "0.0313" not in text
    assert "seed 00" not in text.lower()


def test_readable_values():
    assert readable(8 / 255) == "8/255" and readable(0.03) == "0.03" and readable(1e-5) == "1e-05"
    assert readable(True) == "on" and readable({"study": 0.03, "literature": 8 / 255}) == "study 0.03, literature 8/255"


MODES = {"--dry-run": [], "--explain-engine": [], "--resume": ["RUN"], "--eval-only": ["RUN"]}


@pytest.mark.parametrize("first,second", [(a, b) for a in MODES for b in MODES if a < b])
def test_modes_are_exclusive_in_the_parser(first, second, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["--dataset", "mnist", first, *MODES[first], second, *MODES[second]])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1 and "cannot be combined with" in err
