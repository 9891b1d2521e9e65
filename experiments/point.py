"""One grid point of a wandb sweep: ``wandb agent`` calls this with the sweep's flags, and it runs
``vision.py`` with them after applying the same rule as the local runner (``experiments.sweep.point_flags``).

    python -m experiments.point --dataset mnist --noise=1.0 --norm=none --robust --attack=fgsm-rs ...

The agent's command line is read by ``vision.py``'s own parser (generated from the declared settings), so a
flag the sweep misspells is refused here exactly as ``vision.py`` would refuse it.
"""
from __future__ import annotations

import sys

import vision
from experiments.sweep import command_line, point_flags

NULLS = ("None", "null")  # how wandb writes a sweep value of null: --name=None


def parse(argv: list) -> dict:
    """{flag name: value} of the settings the agent gives (names as in sweep files: ``train-subset``)."""
    from src.cli import build_parser
    from src.config import SETTINGS

    argv = [a for a in argv if not (a.startswith("--") and a.partition("=")[2] in NULLS)]
    args = build_parser().parse_args(argv)
    return {setting.option[2:]: getattr(args, name) for name, setting in SETTINGS.items()
            if getattr(args, name) is not None}


def to_argv(flags: dict) -> list:
    return command_line(flags)


def main(argv=None) -> int:
    return vision.main(to_argv(point_flags(parse(list(sys.argv[1:] if argv is None else argv)))))


if __name__ == "__main__":
    sys.exit(main())
