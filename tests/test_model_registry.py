"""``--model``: the registry (src/models), each family's defaults over the dataset's, the refusals, the
architectures' sizes, and the ScatterNet models' scattering: fixed, per example, pixels to logits."""
from __future__ import annotations

import pytest
import torch

from src import cifar10, mnist
from src.config import ModelConfig, build_config
from src.datasets import get_dataset, validate_for_dataset
from src.errors import UserError
from src.models import MODELS, model_names

SPECS = {"mnist": mnist.DATASET, "cifar10": cifar10.DATASET}
# Parameter counts of the published architectures (Tramer & Boneh 2021; the "about 33k", "187k", ...).
PARAMETERS = {("scatternet-cnn", "mnist"): 33066, ("scatternet-cnn", "cifar10"): 187210,
              ("scatternet-linear", "mnist"): 81 * 7 * 7 * 10 + 10, ("scatternet-linear", "cifar10"): 243 * 8 * 8 * 10 + 10,
              ("cnn", "mnist"): 26010, ("cnn", "cifar10"): 550570}


def config_for(dataset: str, **flags):
    config = build_config({"dataset": dataset, **flags}, SPECS[dataset].defaults)
    validate_for_dataset(config, SPECS[dataset])
    return config


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_default_models_and_their_recipes_are_unchanged():
    for dataset, family, cls in (("mnist", "lenet5", "LeNet5"), ("cifar10", "resnet18", "ResNet18")):
        config = config_for(dataset)
        assert config.model.model == family
        assert type(SPECS[dataset].build_model(config.model)).__name__ == cls
        assert type(SPECS[dataset].build_model(ModelConfig())).__name__ == cls  # an old config.json names none
        named = config_for(dataset, model=family)
        assert named == config
    cifar = config_for("cifar10")
    assert (cifar.train.batch_size, cifar.train.lr, cifar.train.augmult, cifar.train.ema, cifar.model.ws) == \
           (4096, 2.0, 4, 0.999, True)


def test_a_models_defaults_replace_the_datasets_and_flags_replace_both():
    linear = config_for("cifar10", model="scatternet-linear")
    assert (linear.train.batch_size, linear.train.lr, linear.train.momentum, linear.privacy.clip,
            linear.train.epochs, linear.privacy.target_epsilon) == (8192, 4.0, 0.9, 0.1, 60, 3.0)
    assert (linear.model.norm, linear.train.augment, linear.train.augmult, linear.train.ema, linear.model.ws) == \
           ("bn-dp", False, 1, None, False)
    given = config_for("cifar10", model="scatternet-linear", lr=1.0, norm="bn-public", noise=2.0)
    assert given.train.lr == 1.0 and given.model.norm == "bn-public"
    assert given.privacy.noise == 2.0 and given.privacy.target_epsilon is None  # noise replaces the target
    cnn = config_for("mnist", model="scatternet-cnn")
    assert (cnn.train.batch_size, cnn.train.lr, cnn.privacy.clip, cnn.privacy.target_epsilon) == (1024, 1.0, 0.1, 3.0)
    cifar_cnn = config_for("cifar10", model="scatternet-cnn")  # tuned: bn-dp at the published batch 8192 and lr 4
    assert (cifar_cnn.model.norm, cifar_cnn.model.norm_clip, cifar_cnn.train.batch_size, cifar_cnn.train.lr,
            cifar_cnn.train.epochs, cifar_cnn.train.ema) == ("bn-dp", 2.0, 8192, 4.0, 60, None)
    assert cnn.model.norm == "group"  # on MNIST GroupNorm won at the tuned lr
    # a family's defaults differ per dataset: on MNIST the tuned linear head normalizes with bn-dp
    mnist_linear = config_for("mnist", model="scatternet-linear")
    assert (mnist_linear.model.norm, mnist_linear.model.norm_clip, mnist_linear.train.lr) == ("bn-dp", 0.5, 4.0)
    # robust accuracy of the ScatterNet models is PGD-20, its step from the 20 steps; the others keep PGD-40
    assert (linear.robust.eval_pgd_steps, linear.robust.eval_pgd_alpha) == (20, pytest.approx(2.5 * (8 / 255) / 20))
    assert config_for("cifar10", model="scatternet-linear", eval_pgd_steps=40).robust.eval_pgd_steps == 40
    assert config_for("cifar10").robust.eval_pgd_steps == config_for("mnist").robust.eval_pgd_steps == 40


@pytest.mark.parametrize("flags,words", [
    ({"model": "lenet5", "dataset": "cifar10"}, "--model lenet5 is not defined for cifar10; choose from resnet18"),
    ({"model": "resnet18", "dataset": "mnist"}, "not defined for mnist"),
    ({"model": "scatternet-linear", "norm": "instance"}, "--norm instance is not available for --model "
                                                         "scatternet-linear; choose from none, group, bn-public"),
    ({"model": "scatternet-cnn", "ws": True}, "--ws is not available"),
    ({"model": "lenet5", "compile_scattering": True}, "--compile-scattering is not available for --model lenet5"),
    ({"model": "scatternet-linear", "mirror_views": True}, "--mirror-views is for the scatternet models on datasets "
                                                           "whose augmentation flips"),
    ({"dataset": "cifar10", "mirror_views": True}, "cannot be combined with --augment"),  # the ResNet recipe's
    ({"dataset": "cifar10", "mirror_views": True, "augment": False, "augmult": 1}, "not --model resnet18 on cifar10"),
    ({"dataset": "cifar10", "model": "scatternet-cnn", "mirror_views": True, "robust": True},
     "cannot be combined with --augment, --augmult or --robust"),
    ({"dataset": "cifar10", "model": "scatternet-cnn", "mirror_views": True, "engine": "ghost"},
     "--engine ghost is stock Opacus"),
    ({"model": "lenet5", "norm": "group", "norm_groups": 2}, "--norm-groups is not available for --model lenet5"),
    ({"model": "scatternet-linear", "norm": "none", "norm_groups": 3}, "it needs --norm group"),
    ({"model": "scatternet-linear", "norm": "group", "norm_groups": 4}, "--norm-groups 4 does not divide the 81"),
])
def test_impossible_combinations_are_refused_in_one_line(flags, words):
    flags = {"dataset": "mnist", **flags}
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace("-", r"\-")):
        config_for(flags.pop("dataset"), **flags)


def test_compile_scattering_without_a_compiler_is_refused_in_one_line(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="--compile-scattering needs a C\\+\\+ compiler"):
        config_for("cifar10", model="scatternet-cnn", compile_scattering=True)


def test_models_choices_come_from_the_registry():
    from src.config import SETTINGS

    assert SETTINGS["model"].choices() == model_names() == tuple(MODELS)
    assert {"lenet5", "resnet18", "scatternet-linear", "scatternet-cnn", "cnn"} <= set(MODELS)


@pytest.mark.parametrize("family,dataset", sorted(PARAMETERS))
def test_architectures_have_the_published_sizes_and_map_pixels_to_logits(family, dataset):
    spec = SPECS[dataset]
    # GroupNorm of the features, whatever the family's default: a bn-dp model has no forward pass before its
    # statistics are estimated from the private set (tests/test_bn_dp.py), and neither has parameters
    norm = {"norm": "group"} if family.startswith("scatternet") else {}
    config = config_for(dataset, model=family, **norm)
    model = spec.build_model(config.model)
    assert trainable(model) == PARAMETERS[(family, dataset)]
    assert model(torch.rand(2, *spec.image_shape)).shape == (2, 10)


@pytest.mark.parametrize("dataset,features", [("mnist", (81, 7, 7)), ("cifar10", (243, 8, 8))])
def test_the_scattering_is_fixed_and_per_example(dataset, features):
    """No parameters (nothing to train, nothing of the private data in it) and no buffer that changes; each
    example's features depend on that example alone."""
    spec = SPECS[dataset]
    model = spec.build_model(config_for(dataset, model="scatternet-linear").model)
    scattering = model.scattering
    assert not list(scattering.parameters())
    before = {k: v.clone() for k, v in scattering.state_dict().items()}
    torch.manual_seed(0)
    images = torch.rand(3, *spec.image_shape)
    out = scattering(images)
    assert out.shape == (3, *features)
    other = images.clone()
    other[1:] = torch.rand(2, *spec.image_shape)
    assert torch.allclose(scattering(other)[0], out[0], atol=1e-6)
    after = scattering.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_model_flag_is_in_help_and_docs():
    from src.cli import build_parser

    help_text = build_parser().format_help()
    assert "--model" in help_text and "scatternet-linear" in help_text
    assert get_dataset("cifar10").defaults["model"] == "resnet18"
