"""One grid point of a wandb sweep: ``wandb agent`` calls this with the sweep's flags, and it runs
``vision.py`` with them after applying the same rule as the local runner (``experiments.sweep.point_flags``).

    python -m experiments.point --dataset mnist --noise=1.0 --norm=none --robust --attack=fgsm-rs ...
"""
from __future__ import annotations

import sys

import vision
from experiments.sweep import point_flags


def parse(argv: list) -> dict:
    flags, i = {}, 0
    while i < len(argv):
        name = argv[i][2:]
        if "=" in name:
            name, value = name.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        else:
            value = True
        flags[name] = value
        i += 1
    return flags


def to_argv(flags: dict) -> list:
    argv = []
    for name, value in flags.items():
        if value is True:
            argv.append(f"--{name}")
        elif value not in (False, None, "None", "null"):
            argv += [f"--{name}", str(value)]
    return argv


def main(argv=None) -> int:
    return vision.main(to_argv(point_flags(parse(list(sys.argv[1:] if argv is None else argv)))))


if __name__ == "__main__":
    sys.exit(main())
