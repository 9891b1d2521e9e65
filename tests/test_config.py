"""src/config.py: how flags, dataset defaults and global defaults combine, and the checks that need no data.
(Every refused command line, end to end, is in test_bad_input.py.)"""
from __future__ import annotations

import pytest

from src.config import GLOBAL_DEFAULTS, build_config, resolve_settings
from src.errors import UserError
from src.mnist import DEFAULTS as MNIST_DEFAULTS


def test_flags_win_over_dataset_defaults_which_win_over_global_ones():
    settings = resolve_settings({"lr": 0.1}, MNIST_DEFAULTS)
    assert settings["lr"] == 0.1 and settings["epochs"] == MNIST_DEFAULTS["epochs"]
    assert settings["delta"] == GLOBAL_DEFAULTS["delta"]


def test_noise_and_target_epsilon_are_one_choice():
    """Giving --noise replaces the dataset's default --target-epsilon instead of being combined with it."""
    config = build_config({"dataset": "mnist", "noise": 1.0}, MNIST_DEFAULTS)
    assert config.privacy.noise == 1.0 and config.privacy.target_epsilon is None
    with pytest.raises(UserError, match="either --noise or --target-epsilon"):
        build_config({"dataset": "mnist", "noise": 1.0, "target_epsilon": 2.0}, MNIST_DEFAULTS)


def test_seed_defaults_to_none_and_new_settings_have_defaults():
    config = build_config({"dataset": "mnist"}, MNIST_DEFAULTS)
    assert config.train.seed is None and config.data.val_size == 0
    assert config.output.unprotected_train_stats is False and config.privacy.accountant == "rdp"


@pytest.mark.parametrize("flags,message", [({"accountant": "gdp"}, "central-limit approximation"),
                                           ({"val_size": -1}, "--val-size must be non-negative"),
                                           ({"seed": -3}, "--seed must be non-negative")])
def test_validation_messages_name_the_flag(flags, message):
    with pytest.raises(UserError, match=message):
        build_config({"dataset": "mnist", **flags}, MNIST_DEFAULTS)
