"""Command-line flags of ``vision.py``. Every flag defaults to None here so the config layer can tell
what the user set from what a dataset's defaults supply."""
from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction

from attacks.defaults import ATTACKS, PGD_NORMS
from src.config import (ACTIVATIONS, DATA_ROOT_ENV, DEVICES, ENGINES, GLOBAL_DEFAULTS, NORMS, OPTIMIZERS,
                        RIGOROUS_ACCOUNTANTS, WANDB_MODES, accountant_refusal)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (exit 2) instead of usage plus error."""

    def error(self, message: str):
        # Modes are one mutually exclusive group; say so in the words the rest of the tool uses.
        message = message.replace(": not allowed with argument ", " cannot be combined with ")
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


def _radius(text: str):
    """A number, or a dataset's named radius (resolved with the dataset's defaults)."""
    try:
        return float(text)
    except ValueError:
        if text.replace("-", "").isalpha():
            return text
        raise argparse.ArgumentTypeError(f"expected a number or a radius name, got {text!r}") from None


def _accountant(text: str) -> str:
    if text not in RIGOROUS_ACCOUNTANTS:
        raise argparse.ArgumentTypeError(accountant_refusal(text))
    return text


def readable(value) -> str:
    """A default as a researcher would write it: 8/255 rather than 0.03137254901960784, on/off for switches,
    radius names as 'study 0.03, literature 8/255'."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        short = f"{value:g}"
        if float(short) == value:
            return short
        fraction = Fraction(value).limit_denominator(1000)
        return f"{fraction.numerator}/{fraction.denominator}" if float(fraction) == value else short
    if isinstance(value, dict):
        return ", ".join(f"{k} {readable(v)}" for k, v in value.items())
    return str(value)


def _dataset_defaults_epilog() -> str:
    from src.datasets import DATASETS

    lines = ["per-dataset defaults (flags you give override them):"]
    for name, spec in DATASETS.items():
        items = [f"--{k.replace('_', '-')} {readable(v)}" for k, v in spec.defaults.items() if k != "pgd_radii"]
        lines.append(f"  {name}: " + ", ".join(items))
        if "pgd_radii" in spec.defaults:
            lines.append(f"    named --pgd-eps radii: {readable(spec.defaults['pgd_radii'])}")
        lines.append(f"    public data: {spec.public_default}")
    return "\n".join(lines)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each flag's default to its help: the global one, or 'per dataset' (listed in the epilog).
    The parser itself keeps default None, so the config layer can tell what the user gave."""
    from src.datasets import DATASETS

    per_dataset = {k for spec in DATASETS.values() for k in spec.defaults}
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "(default" in (action.help or ""):
            continue
        if action.dest in per_dataset:
            default = "per dataset, below"
        elif GLOBAL_DEFAULTS.get(action.dest) is not None:
            default = readable(GLOBAL_DEFAULTS[action.dest])
        else:
            continue
        action.help = f"{action.help} (default: {default})" if action.help else f"default: {default}"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="vision.py",
        description="Differentially private (DP-SGD) image classifiers: LeNet-5 on MNIST, ResNet-18 on CIFAR-10.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_dataset_defaults_epilog(),
    )
    from src.datasets import DATASETS  # the registry: a new dataset module is a new choice

    parser.add_argument("--dataset", choices=tuple(DATASETS), help="required, except with --resume")
    # What vision.py does: train (the default), or one of these modes; argparse keeps them exclusive.
    modes = parser.add_argument_group("modes (training is the default; at most one of these)")
    mode = modes.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the privacy plan as one JSON object and exit, without loading data")
    mode.add_argument("--explain-engine", action="store_true",
                      help="print how the engine computes each layer's per-sample gradient norms and exit")
    mode.add_argument("--resume", metavar="RUN_DIR",
                      help="continue a killed, failed or interrupted run from its last checkpoint, with its own "
                           "config.json (only --data-root, --device and --wandb may be given again)")
    mode.add_argument("--eval-only", metavar="RUN_DIR",
                      help="evaluate a finished run's model.pt (clean and robust) into a new run directory; "
                           "trains nothing")

    data = parser.add_argument_group("data")
    data.add_argument("--data-root", default=None,
                      help=f"torchvision data folder (default: ${DATA_ROOT_ENV} or {GLOBAL_DEFAULTS['data_root']})")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                      help="download missing data sets when the network allows (default: on)")
    data.add_argument("--train-subset", type=_integer, metavar="N",
                      help="train on the first N private examples; the accountant uses this N")
    data.add_argument("--test-subset", type=_integer, metavar="N", help="evaluate on the first N test images")
    data.add_argument("--val-size", type=_integer, metavar="N",
                      help="hold out the last N private training images as a validation set (removed from n); "
                           "tune on val_acc, never on the test set (default 0)")
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
    train.add_argument("--seed", type=_integer,
                       help="make the run reproducible; the DP guarantee then assumes the seed stays secret "
                            "(default: sampling and noise seeds from the OS, kept only in checkpoint.pt)")
    train.add_argument("--device", choices=DEVICES)
    train.add_argument("--public-refresh-every", type=_integer, metavar="STEPS",
                       help="--norm bn-public: recompute the public statistics every STEPS optimizer steps "
                            "(default 1: before every step, as the weights change)")
    train.add_argument("--checkpoint-every", type=_integer, metavar="STEPS",
                       help="also checkpoint every STEPS optimizer steps (every epoch end always is)")

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
    privacy.add_argument("--accountant", type=_accountant, metavar="{rdp,prv}",
                         help="the rigorous accountant that calibrates, guards and reports epsilon (default rdp); "
                              "GDP's approximation is reported beside it")
    privacy.add_argument("--max-epsilon", type=_number, metavar="EPS",
                         help="budget guard: stop cleanly before any step that would take epsilon above EPS "
                              "(for --accountant)")
    privacy.add_argument("--secure-rng", action="store_true", default=None,
                         help="Opacus secure mode: cryptographically secure sampling and noise (needs torchcsprng; "
                              "runs are then not reproducible from --seed)")

    robust = parser.add_argument_group("robustness (PGD adversarial training and robust evaluation)")
    robust.add_argument("--robust", action="store_true", default=None,
                        help="train on adversarial batches crafted against the current weights (then clip and noise)")
    robust.add_argument("--attack", choices=ATTACKS, help="training attack (default pgd; fgsm-rs is one step)")
    robust.add_argument("--pgd-norm", choices=PGD_NORMS, help="threat model of training and evaluation (default linf)")
    robust.add_argument("--pgd-eps", type=_radius, metavar="EPS|NAME",
                        help="attack radius in [0,1] pixel units, or a name: study (the CS523 study's 0.03), literature "
                             "(mnist 0.3, cifar10 8/255), dp-literature (mnist 0.1, its default)")
    robust.add_argument("--pgd-alpha", type=_number, help="training attack step (default 2.5 eps/steps; fgsm-rs 1.25 eps)")
    robust.add_argument("--pgd-steps", type=_integer, help="training PGD steps (mnist 40, cifar10 20)")
    robust.add_argument("--pgd-restarts", type=_integer, help="training PGD random restarts (worst case kept)")
    robust.add_argument("--adv-ratio", type=_number, help="fraction of each batch made adversarial (default 1.0)")
    robust.add_argument("--eval-pgd-steps", type=_integer, help="robust evaluation PGD steps (default 40)")
    robust.add_argument("--eval-pgd-restarts", type=_integer, help="robust evaluation restarts (default 1)")
    robust.add_argument("--eval-pgd-alpha", type=_number, help="robust evaluation step (default 2.5 eps/steps)")
    robust.add_argument("--eval-robust-size", type=_integer, metavar="N",
                        help="test images for robust accuracy (default 1000; 0 turns it off)")
    robust.add_argument("--eval-robust-every", type=_integer, metavar="EPOCHS",
                        help="robust accuracy every EPOCHS epochs and after the last (default: 1 with --robust, "
                             "else after the last epoch only)")
    robust.add_argument("--masking-checks", action="store_true", default=None,
                        help="after training (or with --eval-only): radius sweep, more steps/restarts, and transfer, "
                             "to expose gradient masking")
    robust.add_argument("--transfer-from", metavar="RUN_DIR",
                        help="also attack with adversarial examples crafted on this run's model (e.g. non-private)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", help=f"folder for run directories (default {GLOBAL_DEFAULTS['out']})")
    output.add_argument("--run-id", help="name of the run directory (default: generated)")
    output.add_argument("--wandb", choices=WANDB_MODES, help="wandb mode (default offline; never prompts)")
    output.add_argument("--wandb-project")
    output.add_argument("--wandb-group")
    output.add_argument("--unprotected-train-stats", action="store_true", default=None,
                        help="also release loss and accuracy on the private training batches, named "
                             "train_loss_unprotected/train_acc_unprotected: NOT covered by epsilon")
    _show_defaults(parser)
    return parser


def parse_flags(argv=None) -> tuple:
    """(settings the user gave, {action: bool}) with the data-root environment variable applied."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset is None and args.resume is None:
        parser.error("the following arguments are required: --dataset")
    actions = {"dry_run": args.dry_run, "explain_engine": args.explain_engine, "eval_only": args.eval_only,
               "resume": args.resume}
    flags = {k: v for k, v in vars(args).items() if k not in actions}
    if flags["data_root"] is None and os.environ.get(DATA_ROOT_ENV):
        flags["data_root"] = os.environ[DATA_ROOT_ENV]
    return flags, actions


def report_error(message: str) -> int:
    print(f"vision.py: error: {message}", file=sys.stderr)
    return 2
