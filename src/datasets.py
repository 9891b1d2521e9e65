"""The per-dataset modules ``vision.py`` dispatches to, by ``--dataset`` name."""
from __future__ import annotations

from src import cifar10, mnist
from src.dataset_spec import DatasetSpec
from src.errors import UserError

DATASETS = {spec.name: spec for spec in (mnist.DATASET, cifar10.DATASET)}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown --dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def validate_for_dataset(config, spec: DatasetSpec) -> None:
    """Checks that depend on which dataset was chosen, its model's among them."""
    from src.models import check_model

    check_model(config, spec)
    if config.data.public_holdout and not spec.supports_public_holdout:
        raise UserError(f"--public-holdout is not available for {spec.name}: its public set is a different "
                        "dataset; use --public-data FILE.npz to supply one")


def needs_public_data(config) -> bool:
    """Public data is loaded only when something uses it or the user named it (so the request is checked)."""
    return config.model.norm == "bn-public" or bool(config.data.public_data) or config.data.public_holdout
