"""``--model``: the model families, one file each in this package, and the registry that names them.

Like the engines (``src.engines``) and the normalizations (``dp_layers.norms``), the registry is torch-free:
``--model``'s choices, ``--help``, README's flag table and the sweep files read it without importing torch. A
family's file is imported when a model is built.

Each family says which datasets it is defined for, which ``--norm`` values it accepts, and the training settings
that differ, for it, from the dataset's defaults (a dataset's own ``DEFAULTS`` are the recipe of its default
model). Settings resolve as: the flags given, then the model's defaults, then the dataset's, then the global ones
(``src.config.resolve_settings``).
"""
from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass, field
from typing import Any, Mapping

from dp_layers.norms import FEATURE_ONLY_NORMS, NORM_KINDS
from src.errors import UserError


@dataclass(frozen=True)
class ModelFamily:
    """One ``--model`` choice."""

    name: str
    summary: str  # one line for --help and the docs
    module: str  # the file that builds it: ``build(spec, model_config) -> nn.Module``
    datasets: tuple  # the datasets it is defined for
    norms: tuple = tuple(k for k in NORM_KINDS if k not in FEATURE_ONLY_NORMS)  # the --norm values it accepts
    weight_standardization: bool = True  # whether --ws means anything for it
    norm_groups: bool = False  # whether --norm-groups sets its GroupNorm's groups
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per dataset, over its DEFAULTS

    def build(self, spec, model_config):
        return importlib.import_module(self.module).build(spec, model_config)


SCATTERING_CHANNELS = 81  # per input channel: src.models.scatternet.COEFFICIENTS (J=2, L=8, order 2)
# The normalizations the scattering features have a place for (src.models.scatternet.feature_norm).
SCATTERING_NORMS = ("none", "group", "bn-public", "bn-dp")
# The shared starting point, Tramer & Boneh's published settings (SGD with momentum 0.9, clipping bound 0.1,
# epsilon 3, no augmentation, no weight average); each family replaces, per dataset, what tuning on a validation
# split changed (docs/models.md, "How the defaults were chosen"). The scattering models also drop the
# dataset recipe's augmentation, views and weight standardization, which only end-to-end models use.
# Robust accuracy is PGD-20, the evaluation of the ScatterNet results (the robust table and the CIFAR-10 study),
# because every attack step runs the scattering forward and backward on the pixels: PGD-40 on 1000 CIFAR-10
# images took 6.4 of a default run's 15 minutes on the 2-core CPU (docs/models.md).
SCATTERING_RECIPE = {"optimizer": "sgd", "lr": 4.0, "momentum": 0.9, "clip": 0.1, "target_epsilon": 3.0,
                     "norm": "group", "act": "tanh", "augment": False, "augmult": 1, "ema": None, "ws": False,
                     "physical_batch_size": 1024, "eval_pgd_steps": 20}
# --norm bn-dp's clipping bound of each example's per-channel feature means and means of squares (dp_layers.dp_bn),
# per dataset: fixed in advance, chosen on a validation split (docs/models.md).
BN_DP_CLIP = {"mnist": 0.5, "cifar10": 2.0}


def scattering_recipe(dataset: str, **settings) -> dict:
    """A ScatterNet family's defaults for ``dataset``: the shared recipe, bn-dp's bound, then its own ``settings``."""
    return {**SCATTERING_RECIPE, "norm_clip": BN_DP_CLIP[dataset], **settings}


END_TO_END_RECIPE = {"optimizer": "sgd", "momentum": 0.9, "clip": 0.1, "target_epsilon": 3.0, "norm": "none",
                     "act": "tanh", "augment": False, "augmult": 1, "ema": None, "ws": False,
                     "physical_batch_size": 256}

MODELS: Mapping[str, ModelFamily] = {family.name: family for family in (
    ModelFamily("lenet5", "LeNet-5: two 5x5 convolutions with pooling, then 120-84-10 (28x28 grey images)",
                "src.models.lenet", datasets=("mnist",)),
    ModelFamily("resnet18", "ResNet-18: 3x3 stem without max-pool, four stages of two basic blocks (32x32 colour "
                "images)", "src.models.resnet", datasets=("cifar10",)),
    ModelFamily("scatternet-linear", "ScatterNet + linear: fixed wavelet scattering features (kymatio, J=2, L=8), "
                "their normalization, a linear classifier (Tramer & Boneh 2021)", "src.models.scatternet",
                datasets=("mnist", "cifar10"), norms=SCATTERING_NORMS, weight_standardization=False, norm_groups=True,
                defaults={"mnist": scattering_recipe("mnist", batch_size=4096, epochs=40, norm="bn-dp"),
                          "cifar10": scattering_recipe("cifar10", batch_size=8192, epochs=60, norm="bn-dp")}),
    ModelFamily("scatternet-cnn", "ScatterNet + CNN: the same features with Tramer & Boneh's small tanh CNN head",
                "src.models.scatternet", datasets=("mnist", "cifar10"), norms=SCATTERING_NORMS,
                weight_standardization=False, norm_groups=True,
                defaults={"mnist": scattering_recipe("mnist", batch_size=1024, lr=1.0, epochs=40),
                          "cifar10": scattering_recipe("cifar10", batch_size=8192, epochs=60, norm="bn-dp")}),
    ModelFamily("cnn", "end-to-end tanh CNN of Tramer & Boneh 2021 (Papernot et al. 2021): 26k parameters for "
                "mnist, 550k for cifar10", "src.models.cnn", datasets=("mnist", "cifar10"),
                defaults={"mnist": {**END_TO_END_RECIPE, "batch_size": 512, "lr": 0.5, "epochs": 40},
                          "cifar10": {**END_TO_END_RECIPE, "batch_size": 1024, "lr": 1.0, "epochs": 30}}),
)}


def model_names() -> tuple:
    return tuple(MODELS)


def get_model(name: str, dataset: str) -> ModelFamily:
    """The family, refused in one line when it is unknown or not defined for ``dataset``."""
    if name not in MODELS:
        raise UserError(f"unknown --model {name!r}; choose from {', '.join(MODELS)}")
    family = MODELS[name]
    if dataset not in family.datasets:
        offered = [n for n, f in MODELS.items() if dataset in f.datasets]
        raise UserError(f"--model {name} is not defined for {dataset}; choose from {', '.join(offered)}")
    return family


def model_defaults(dataset: str, name: str) -> Mapping[str, Any]:
    """What ``name`` changes in ``dataset``'s defaults (nothing for an unknown pair: validation refuses it)."""
    family = MODELS.get(name)
    return family.defaults.get(dataset, {}) if family else {}


def has_cpp_compiler() -> bool:
    """Whether torch.compile's CPU backend (inductor), which builds C++ kernels, can run here."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def check_model(config, spec) -> None:
    """The model's own limits on the other flags: the normalizations it has a place for, their groups, --ws."""
    family = get_model(config.model.model or spec.defaults["model"], spec.name)
    if config.model.norm not in family.norms:
        raise UserError(f"--norm {config.model.norm} is not available for --model {family.name}; choose from "
                        f"{', '.join(family.norms)}")
    if config.model.norm_groups is not None:
        if not family.norm_groups:
            raise UserError(f"--norm-groups is not available for --model {family.name}: its GroupNorm takes at most "
                            "32 groups of at least two channels")
        if config.model.norm != "group":
            raise UserError(f"--norm-groups sets GroupNorm's groups: it needs --norm group, not {config.model.norm}")
        channels = spec.image_shape[0] * SCATTERING_CHANNELS
        if config.model.norm_groups < 1 or channels % config.model.norm_groups:
            raise UserError(f"--norm-groups {config.model.norm_groups} does not divide the {channels} scattering "
                            f"channels of {spec.name}")
    if config.model.compile_scattering and family.module != "src.models.scatternet":
        raise UserError(f"--compile-scattering is not available for --model {family.name}: it has no scattering")
    if config.model.compile_scattering and not has_cpp_compiler():
        raise UserError("--compile-scattering needs a C++ compiler (torch.compile builds C++ kernels for the CPU), "
                        "and none is on PATH; install g++ or drop the flag")
    if config.train.mirror_views and (family.module != "src.models.scatternet" or not spec.augmentation.flip):
        raise UserError(f"--mirror-views is for the scatternet models on datasets whose augmentation flips "
                        f"(cifar10), not --model {family.name} on {spec.name}")
    if config.model.ws and not family.weight_standardization:
        raise UserError(f"--ws is not available for --model {family.name}: it has no trained convolution to "
                        "standardize")


def build_model(spec, model_config):
    """The ``nn.Module`` of ``model_config`` for dataset ``spec`` (its default model when none is named)."""
    return get_model(model_config.model or spec.defaults["model"], spec.name).build(spec, model_config)
