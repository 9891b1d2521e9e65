"""What a per-dataset module declares (``DatasetSpec``). Torch-free, like the dataset modules' top level, so
``vision.py --help`` and a bad flag answer without importing torch: models and loaders are imported when
they are first built or called."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from src.errors import UserError


@dataclass(frozen=True)
class Augmentation:
    """How ``--augment`` transforms a training image of this dataset (``src.augment``)."""

    padding: int  # random crop of the image padded by this many pixels: shifts of up to ``padding``
    flip: bool  # random horizontal flip (not for digits)

    def describe(self) -> str:
        return f"random crop with {self.padding}-pixel reflect padding" + (", horizontal flip" if self.flip else "")


@dataclass(frozen=True)
class DatasetSpec:
    """What a per-dataset module in ``src/`` declares: its model, data, public data and defaults."""

    name: str
    image_shape: tuple  # (C, H, W)
    num_classes: int
    full_train_size: int  # size of the complete training set, used when no data is loaded (dry-run)
    defaults: dict
    build_model: Callable  # (ModelConfig) -> nn.Module: src.models.build_model with this spec
    load: Callable  # (DataConfig, with_public: bool) -> LoadedData
    public_default: str  # one line saying where public data comes from by default
    augmentation: Augmentation  # what --augment does to its training images
    supports_public_holdout: bool = False
    # Per-channel input scaling inside the model, from public knowledge only (pixels lie in [0, 1]), never from
    # the private training images; a model family may use its own (src.models).
    mean: tuple = (0.5,)
    std: tuple = (0.5,)

    def planned_train_size(self, data_config) -> int:
        """n for accounting without loading anything: the complete set, less any public hold-out and
        validation set, or the subset. An assumption about the files (``--dry-run`` labels it so)."""
        n = (self.full_train_size - (data_config.public_size if data_config.public_holdout else 0)
             - data_config.val_size)
        if n < 1:
            raise UserError(f"--val-size {data_config.val_size} leaves no private {self.name} training images")
        if data_config.train_subset is not None:
            if data_config.train_subset > n:
                raise UserError(f"--train-subset {data_config.train_subset} is larger than the {n} private "
                                f"{self.name} training images")
            n = data_config.train_subset
        return n
