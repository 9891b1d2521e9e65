"""Command-line flags of ``vision.py``, generated from the settings declared in ``src.config`` (each field's
type, default and help), plus the modes. Every flag defaults to None here so the config layer can tell
what the user set from what a dataset's defaults supply."""
from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction

from typing import Optional

from src.config import DATA_ROOT_ENV, PARSERS, SECTION_TITLES, SETTINGS
from src.settings import Setting


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (exit 2) instead of usage plus error."""

    def error(self, message: str):
        # Modes are one mutually exclusive group; say so in the words the rest of the tool uses.
        message = message.replace(": not allowed with argument ", " cannot be combined with ")
        self.exit(2, f"{self.prog}: error: {message}\n")


def readable(value) -> str:
    """A default as a researcher would write it: 8/255 rather than 0.03137254901960784, on/off for switches,
    radius names as 'study 0.03, literature 8/255'."""
    if value is None:
        return "none"
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


def default_text(setting: Setting, *, per_dataset: str = "") -> Optional[str]:
    """The default as --help and docs/flags.md say it: the declared one, readable, or each dataset's (spelled out
    unless ``per_dataset`` names where they are listed instead). None: there is no default to state."""
    from src.datasets import DATASETS

    by_dataset = {name: spec.defaults.get(setting.name, setting.default) for name, spec in DATASETS.items()
                  if setting.name in spec.defaults or not setting.per_dataset}
    if any(setting.name in spec.defaults for spec in DATASETS.values()):
        return per_dataset or "; ".join(f"{name} {readable(value)}" for name, value in by_dataset.items())
    if setting.flag.default_text:
        return setting.flag.default_text
    if setting.per_dataset:
        return None
    return readable(setting.default)


def negatable(setting: Setting) -> bool:
    """A switch that some default turns on (globally, or a dataset's: cifar10's --augment) needs its
    --no-NAME form, or the user could not turn it off."""
    from src.datasets import DATASETS

    return setting.type is bool and (setting.default is True or any(
        spec.defaults.get(setting.name) is True for spec in DATASETS.values()))


def add_setting(group, setting: Setting, *, default=None, choices=None, help_default: Optional[str] = None) -> None:
    """One declared setting as a flag. The parser's own default stays None unless a caller (the audit) gives
    one, so the config layer can tell what the user set from what a default supplied."""
    choices = choices or setting.choices()
    stated = help_default or default_text(setting, per_dataset="per dataset, below")
    help_text = f"{setting.flag.help} (default: {stated})" if stated else setting.flag.help
    if setting.type is bool:
        action = argparse.BooleanOptionalAction if negatable(setting) else "store_true"
        group.add_argument(setting.option, action=action, default=default, help=help_text)
        return
    group.add_argument(setting.option, type=setting.flag.parse or PARSERS[setting.type], choices=choices,
                       metavar=setting.flag.metavar, default=default, help=help_text)


def _add_modes(parser: argparse.ArgumentParser) -> None:
    """What vision.py does: train (the default), or one of these modes; argparse keeps them exclusive."""
    modes = parser.add_argument_group("modes (training is the default; at most one of these)")
    mode = modes.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the privacy plan as one JSON object and exit, without loading data")
    mode.add_argument("--explain-engine", action="store_true",
                      help="print how the engine computes each layer's per-sample gradient norms and exit")
    resumable = ", ".join(s.option for s in SETTINGS.values() if s.flag.resumable)
    mode.add_argument("--resume", metavar="RUN_DIR",
                      help="continue a killed, failed or interrupted run from its last checkpoint, with its own "
                           f"config.json (only {resumable} may be given again)")
    mode.add_argument("--eval-only", metavar="RUN_DIR",
                      help="evaluate a finished run's model.pt (clean and robust) into a new run directory; "
                           "trains nothing")


def build_parser() -> argparse.ArgumentParser:
    """vision.py's parser, generated from the declared settings (src.config, src.settings)."""
    parser = OneLineErrorParser(
        prog="vision.py",
        description="Differentially private (DP-SGD) image classifiers: LeNet-5 on MNIST, ResNet-18 on CIFAR-10.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_dataset_defaults_epilog(),
    )
    _add_modes(parser)
    groups = {name: parser.add_argument_group(title) for name, title in SECTION_TITLES.items()}
    for setting in SETTINGS.values():
        add_setting(groups[setting.section], setting)
    return parser


class ResumeParser(OneLineErrorParser):
    """The command line of ``--resume``: only the settings declared resumable exist here, so anything that
    would change what is trained is refused by construction, in one line that says why."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            flag = message.split()[2].split("=")[0]
            message = (f"--resume continues the run with its own config.json; drop {flag} (only "
                       f"{', '.join(s.option for s in SETTINGS.values() if s.flag.resumable)} may be given)")
        super().error(message)


def build_resume_parser() -> argparse.ArgumentParser:
    parser = ResumeParser(prog="vision.py", allow_abbrev=False)
    parser.add_argument("--resume", metavar="RUN_DIR", required=True)
    for setting in SETTINGS.values():
        if setting.flag.resumable or setting.name == "dataset":  # --dataset only to check it is the run's
            add_setting(parser, setting)
    return parser


def _refuse_training_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--eval-only trains nothing: settings declared training-only are refused, not ignored."""
    for setting in SETTINGS.values():
        if setting.flag.training_only and getattr(args, setting.name) is not None:
            parser.error(f"--eval-only trains nothing: drop {setting.option} (the evaluation attack is set by "
                         "--pgd-eps, --pgd-norm and the --eval-pgd-* flags)")


def parse_flags(argv=None) -> tuple:
    """(settings the user gave, {mode: value}) with the data-root environment variable applied."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:
        build_resume_parser().parse_args(argv)
    elif args.dataset is None and args.eval_only is not None:  # the run records its dataset
        from src.errors import UserError
        from src.run_directory import RunDirectory

        try:
            args.dataset = RunDirectory(args.eval_only).trained_dataset()
        except UserError as error:
            parser.error(str(error))
    elif args.dataset is None:
        parser.error("the following arguments are required: --dataset")
    if args.eval_only is not None:
        _refuse_training_settings(parser, args)
    actions = {"dry_run": args.dry_run, "explain_engine": args.explain_engine, "eval_only": args.eval_only,
               "resume": args.resume}
    flags = {k: v for k, v in vars(args).items() if k not in actions}
    if flags["data_root"] is None and os.environ.get(DATA_ROOT_ENV):
        flags["data_root"] = os.environ[DATA_ROOT_ENV]
    return flags, actions


def _table_cell(text: str) -> str:
    return text.replace("|", "\\|")


def flag_table() -> str:
    """The flag table of docs/flags.md, generated from the same declarations as --help (a test keeps the page in
    step: ``python -m src.cli`` prints the table to paste between its flags markers)."""
    parser = build_parser()
    lines = []
    for group in parser._action_groups:
        rows = [action for action in group._group_actions if action.option_strings and action.dest != "help"]
        if not rows:
            continue
        lines += ["", f"**{group.title}**", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for action in rows:
            setting = SETTINGS.get(action.dest)
            stated = default_text(setting) if setting else None
            flag = parser._get_formatter()._format_action_invocation(action)
            meaning = setting.flag.help if setting else action.help
            lines.append(f"| `{_table_cell(flag)}` | {_table_cell(stated or '')} | {_table_cell(meaning)} |")
    return "\n".join(lines[1:]) + "\n"


def report_error(message: str) -> int:
    print(f"vision.py: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    print(flag_table(), end="")
