"""How a setting is declared: once, as a typed field of a config section (``src.config``), carrying its help
text, its default and how it is written on a command line.

Everything else is generated from those fields: ``vision.py``'s parser and ``--help`` (``src.cli``), the
global defaults the config layer resolves with, the choices ``validate`` checks a reloaded config.json
against, docs/flags.md's flag table, and the flags ``experiments.audit`` and ``experiments.point`` accept. A
setting whose default depends on the dataset has none here; each dataset module declares it next to the
dataset (``DEFAULTS`` in ``src/mnist.py``, ``src/cifar10.py``).

Torch-free, like ``src.cli``: ``--help`` and a bad flag answer without importing torch.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

PER_DATASET = "per dataset"  # the help's word for a default a dataset module supplies


@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line (kept in its field's metadata)."""

    help: str
    metavar: Optional[str] = None
    choices: Union[tuple, Callable[[], tuple], None] = None  # a callable is asked when the parser is built
    parse: Optional[Callable[[str], Any]] = None  # argparse type; inferred from the field's type when None
    default_text: Optional[str] = None  # the default as help should say it, when the value alone does not
    resumable: bool = False  # may be given again with --resume: says where things are, not what is trained
    training_only: bool = False  # means nothing without training: refused with --eval-only


def setting(default: Any = dataclasses.MISSING, **flag: Any) -> Any:
    """A config field declared with its flag. No ``default``: the dataset supplies it (or the user must)."""
    return dataclasses.field(default=default, metadata={"flag": Flag(**flag)})


@dataclass(frozen=True)
class Setting:
    """One declared setting, as the generators see it: its section, name, type, default and flag."""

    section: str
    name: str
    type: type  # int, float, str or bool (Optional unwrapped)
    default: Any  # dataclasses.MISSING when the dataset supplies it
    flag: Flag

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def per_dataset(self) -> bool:
        return self.default is dataclasses.MISSING

    def choices(self) -> Optional[tuple]:
        choices = self.flag.choices
        return tuple(choices()) if callable(choices) else choices


def _plain_type(annotation) -> type:
    """int for ``Optional[int]``, and so on."""
    if typing.get_origin(annotation) is Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def section_settings(section_name: str, section_class) -> list:
    hints = typing.get_type_hints(section_class)
    return [Setting(section=section_name, name=f.name, type=_plain_type(hints[f.name]), default=f.default,
                    flag=f.metadata["flag"])
            for f in dataclasses.fields(section_class) if "flag" in f.metadata]
