"""src/settings.py and the declarations in src/config.py: every setting is declared once, as a typed field with
its help and default, and the parser, --help, the global defaults, the choices checked on a reloaded config,
docs/flags.md's flag table, the resume parser and the audit's flags are all generated from it."""
from __future__ import annotations

import dataclasses

import pytest

from dp_layers.norms import NORM_KINDS
from experiments.audit import build_parser as audit_parser
from src.cli import build_parser, build_resume_parser, flag_table
from src.config import GLOBAL_DEFAULTS, NORMS, SECTIONS, SETTINGS, Config, build_config, validate
from src.datasets import DATASETS
from src.errors import UserError
from src.mnist import DEFAULTS as MNIST_DEFAULTS
from tests.conftest import REPO

MODES = {"dry_run", "explain_engine", "resume", "eval_only", "help"}


def test_every_config_field_is_a_declared_setting_and_a_flag():
    fields = {f.name for section in SECTIONS.values() for f in dataclasses.fields(section)}
    assert fields == set(SETTINGS)
    parser_dests = {a.dest for a in build_parser()._actions}
    assert parser_dests == set(SETTINGS) | MODES


def test_global_defaults_come_from_the_declarations_and_datasets_only_declare_known_settings():
    assert GLOBAL_DEFAULTS == {name: s.default for name, s in SETTINGS.items() if not s.per_dataset}
    for spec in DATASETS.values():
        assert set(spec.defaults) - {"pgd_radii"} <= set(SETTINGS), spec.name
        # what no global default covers, each dataset declares
        assert {name for name, s in SETTINGS.items() if s.per_dataset} - {"dataset"} <= set(spec.defaults)


def test_the_parser_keeps_none_so_user_settings_are_distinguishable():
    args = vars(build_parser().parse_args(["--dataset", "mnist"]))
    assert all(args[name] is None for name in SETTINGS if name != "dataset")


def test_a_radius_is_written_as_a_number_a_fraction_or_a_name():
    """--pgd-eps 2/255 as papers write it; a malformed fraction is refused by the parser, not read as a name."""
    parse = build_parser().parse_args
    assert parse(["--pgd-eps", "2/255"]).pgd_eps == pytest.approx(2 / 255)
    assert parse(["--pgd-eps", "0.1"]).pgd_eps == 0.1
    assert parse(["--pgd-eps", "literature"]).pgd_eps == "literature"
    for bad in ("2/0", "2/x"):
        with pytest.raises(SystemExit):
            parse(["--pgd-eps", bad])


def test_a_switch_a_dataset_turns_on_can_be_turned_off_on_the_command_line_and_in_sweeps():
    """cifar10 turns the recipe's switches on by default: --no-NAME must reach the config as off, and a sweep
    point that sets the switch false must say --no-NAME (leaving it out would get the dataset's on)."""
    from experiments.sweep import command_line

    switched_on = {name for spec in DATASETS.values() for name, value in spec.defaults.items() if value is True}
    assert {"augment", "ws"} <= switched_on
    for name in switched_on:
        option = SETTINGS[name].option
        args = build_parser().parse_args(["--dataset", "cifar10", f"--no-{option[2:]}"])
        assert getattr(args, name) is False
        assert f"--no-{option[2:]}" in command_line({option[2:]: False})
        on = next(spec for spec in DATASETS.values() if spec.defaults.get(name) is True)
        # (--augmult 1: cifar10's augmult needs --augment, and says so in one line; tests/test_bad_input.py)
        flags = vars(build_parser().parse_args(["--dataset", on.name, f"--no-{option[2:]}", "--augmult", "1"]))
        assert _field(build_config({k: v for k, v in flags.items() if k in SETTINGS}, on.defaults), name) is False
        assert _field(build_config({"dataset": on.name}, on.defaults), name) is True


def _field(config: Config, name: str):
    return getattr(getattr(config, SETTINGS[name].section), name)


def test_the_documented_flag_table_is_the_generated_one():
    page = (REPO / "docs" / "flags.md").read_text()
    block = page.split("<!-- flags:start -->\n")[1].split("<!-- flags:end -->")[0]
    assert block == flag_table(), "docs/flags.md's flag table is stale: regenerate it with `python -m src.cli`"
    for setting in SETTINGS.values():
        assert f"`{setting.option}" in block, setting.option


def test_norm_choices_come_from_the_norm_registry():
    assert NORMS == tuple(NORM_KINDS)
    norm_flag = next(a for a in build_parser()._actions if a.dest == "norm")
    assert tuple(norm_flag.choices) == tuple(NORM_KINDS)


def test_a_reloaded_config_is_checked_against_the_declared_choices():
    """--resume reads config.json: argparse never saw those values, so validate checks them."""
    record = build_config({"dataset": "mnist"}, MNIST_DEFAULTS).to_dict()
    record["model"]["norm"] = "batch"
    with pytest.raises(UserError, match="unknown --norm 'batch'"):
        validate(Config.from_dict(record))


@pytest.mark.parametrize("name", [n for n, s in SETTINGS.items() if not s.flag.resumable and n != "dataset"])
def test_resume_accepts_only_resumable_settings(name, capsys):
    """By construction: the resume parser has no other flag, whatever flags are added later."""
    setting = SETTINGS[name]
    value = [] if setting.type is bool else [str((setting.choices() or ("1",))[0])]
    with pytest.raises(SystemExit) as exit:
        build_resume_parser().parse_args(["--resume", "RUN", setting.option, *value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"drop {setting.option}" in err and len(err.splitlines()) == 1


def test_resume_parser_takes_the_resumable_settings():
    args = build_resume_parser().parse_args(["--resume", "RUN", "--device", "cpu", "--data-root", "d",
                                             "--wandb", "disabled"])
    assert (args.device, args.data_root, args.wandb) == ("cpu", "d", "disabled")


def test_the_audit_reuses_the_declarations():
    audit = {a.dest: a for a in audit_parser()._actions}
    vision = {a.dest: a for a in build_parser()._actions}
    shared = set(audit) & set(SETTINGS)
    assert {"engine", "norm", "lr", "clip", "noise", "target_epsilon", "epochs", "batch_size"} <= shared
    for name in shared:
        assert audit[name].type is vision[name].type and audit[name].option_strings == vision[name].option_strings
        assert SETTINGS[name].flag.help in audit[name].help, name
