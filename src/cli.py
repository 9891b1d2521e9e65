"""Command-line flags of ``vision.py``. Every flag defaults to None here so the config layer can tell
what the user set from what a dataset's defaults supply."""
from __future__ import annotations

import argparse
import os
import sys

from src.config import (ACCOUNTANTS, ACTIVATIONS, DATA_ROOT_ENV, DEVICES, ENGINES, GLOBAL_DEFAULTS, NORMS,
                        OPTIMIZERS, WANDB_MODES)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (exit 2) instead of usage plus error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _dataset_defaults_epilog() -> str:
    from src.datasets import DATASETS

    lines = ["per-dataset defaults (flags you give override them):"]
    for name, spec in DATASETS.items():
        items = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in spec.defaults.items())
        lines.append(f"  {name}: {items}")
        lines.append(f"    public data: {spec.public_default}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="vision.py",
        description="Differentially private (DP-SGD) image classifiers: LeNet-5 on MNIST, ResNet-18 on CIFAR-10.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_dataset_defaults_epilog(),
    )
    parser.add_argument("--dataset", required=True, choices=("mnist", "cifar10"))
    parser.add_argument("--dry-run", action="store_true",
                        help="print the privacy plan as one JSON object and exit, without loading data")
    parser.add_argument("--explain-engine", action="store_true",
                        help="print how the engine computes each layer's per-sample gradient norms and exit")

    data = parser.add_argument_group("data")
    data.add_argument("--data-root", default=None,
                      help=f"torchvision data folder (default: ${DATA_ROOT_ENV} or {GLOBAL_DEFAULTS['data_root']})")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                      help="download missing data sets when the network allows (default: on)")
    data.add_argument("--train-subset", type=_integer, metavar="N",
                      help="train on the first N private examples; the accountant uses this N")
    data.add_argument("--test-subset", type=_integer, metavar="N", help="evaluate on the first N test images")
    data.add_argument("--public-data", metavar="FILE.npz[:KEY]",
                      help="public images (uint8 array in an .npz or .npy) instead of the dataset's default source")
    data.add_argument("--public-size", type=_integer, metavar="N",
                      help=f"number of public images (default {GLOBAL_DEFAULTS['public_size']})")
    data.add_argument("--public-holdout", action="store_true", default=None,
                      help="cifar10: take the public set from the end of the CIFAR-10 training set and remove it "
                           "from the private set (and from n in the accountant)")

    model = parser.add_argument_group("model")
    model.add_argument("--norm", choices=NORMS, help="normalization layer in the model")
    model.add_argument("--act", choices=ACTIVATIONS, help="activation function")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=_integer)
    train.add_argument("--batch-size", type=_integer, help="expected (logical) Poisson batch size")
    train.add_argument("--physical-batch-size", type=_integer,
                       help="largest batch put through the model at once (Opacus BatchMemoryManager)")
    train.add_argument("--eval-batch-size", type=_integer)
    train.add_argument("--optimizer", choices=OPTIMIZERS)
    train.add_argument("--lr", type=_number)
    train.add_argument("--momentum", type=_number)
    train.add_argument("--seed", type=_integer)
    train.add_argument("--device", choices=DEVICES)
    train.add_argument("--public-refresh-every", type=_integer, metavar="STEPS",
                       help="--norm bn-public: recompute the public statistics every STEPS optimizer steps "
                            "(default 1: before every step, as the weights change)")

    privacy = parser.add_argument_group("privacy")
    privacy.add_argument("--engine", choices=ENGINES,
                         help="per-sample gradient engine: Opacus's hooks, functorch or ghost; mixed-ghost (ghost "
                              "clipping with norm rules for every layer); bk (book-keeping, one backward pass); "
                              "or non-private training")
    privacy.add_argument("--noise", type=_number, metavar="SIGMA", help="noise multiplier")
    privacy.add_argument("--target-epsilon", type=_number, metavar="EPS",
                         help="calibrate the noise so that epsilon after all epochs is at most EPS")
    privacy.add_argument("--delta", type=_number)
    privacy.add_argument("--clip", type=_number, help="per-sample gradient norm bound")
    privacy.add_argument("--accountant", choices=ACCOUNTANTS)

    output = parser.add_argument_group("output")
    output.add_argument("--out", help=f"folder for run directories (default {GLOBAL_DEFAULTS['out']})")
    output.add_argument("--run-id", help="name of the run directory (default: generated)")
    output.add_argument("--wandb", choices=WANDB_MODES, help="wandb mode (default offline; never prompts)")
    output.add_argument("--wandb-project")
    output.add_argument("--wandb-group")
    return parser


def parse_flags(argv=None) -> tuple:
    """(settings the user gave, {action: bool}) with the data-root environment variable applied."""
    args = build_parser().parse_args(argv)
    actions = {"dry_run": args.dry_run, "explain_engine": args.explain_engine}
    flags = {k: v for k, v in vars(args).items() if k not in actions}
    if flags["data_root"] is None and os.environ.get(DATA_ROOT_ENV):
        flags["data_root"] = os.environ[DATA_ROOT_ENV]
    return flags, actions


def report_error(message: str) -> int:
    print(f"vision.py: error: {message}", file=sys.stderr)
    return 2
