"""The one benchmark setup: a model, synthetic data and an engine, through the same ``src.privacy.attach``
path that ``vision.py`` uses, so every benchmark times what training runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

MODELS = {"lenet5": "mnist", "resnet18": "cifar10"}


@dataclass
class BenchTraining:
    training: object  # src.privacy.Training
    images: torch.Tensor  # one batch, on the device
    labels: torch.Tensor
    refresh_public: Optional[Callable[[], None]]  # bn-public models: recompute the public statistics
    device: torch.device
    views: Optional[Callable] = None  # --augment/--augmult: the rows the model trains on (src.augment)


def bench_training(model_name: str, norm: str, batch: int, engine: str, *, image_size: int = 0,
                   device: Optional[torch.device] = None, momentum: float = 0.9, recipe: Optional[dict] = None
                   ) -> BenchTraining:
    """Random uint8 images (4 batches) and 128 random public images; bn-public statistics already set.
    ``recipe``: more settings (``ws``, ``augment``, ``augmult`` for the De et al. recipe's step; ``bk_keep``,
    ``bk_layer_budget``)."""
    from src.accounting import plan_privacy
    from src.config import build_config
    from src.data import ImageTensorDataset, PublicData
    from src.datasets import get_dataset
    from src.privacy import attach
    from src.loop import public_refresher

    spec = get_dataset(MODELS[model_name])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Pinned rather than left to the dataset (cifar10's defaults switch the recipe on): a plain step unless
    # ``recipe`` asks for its ingredients.
    flags = {"dataset": spec.name, "engine": engine, "norm": norm, "batch_size": batch,
             "physical_batch_size": batch, "lr": 0.01, "momentum": momentum, "clip": 1.0, "epochs": 1,
             "augment": False, "augmult": 1, "ws": False, **(recipe or {})}
    if engine != "non-private":
        flags["noise"] = 1.0
    config = build_config(flags, spec.defaults)
    shape = spec.image_shape if not image_size else (spec.image_shape[0], image_size, image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch * 4, *shape), dtype=torch.uint8, generator=generator)
    data = ImageTensorDataset(images, torch.randint(0, 10, (batch * 4,), generator=generator))
    public = PublicData(images=torch.randint(0, 256, (128, *shape), dtype=torch.uint8, generator=generator),
                        source="random")
    plan = plan_privacy(config, len(data))
    torch.manual_seed(0)
    model = spec.build_model(config.model).to(device)
    noise_generator = torch.Generator(device=device).manual_seed(1) if plan.private else None
    training = attach(model, data, config, plan, sampling_generator=torch.Generator().manual_seed(2),
                      noise_generator=noise_generator)
    refresh = public_refresher(training.base_model, public, device)
    if refresh is not None:
        refresh()
    x, y = (t.to(device) for t in data.__getitems__(range(batch)))
    views = None
    if config.train.augment:
        from src.augment import AugmentedViews

        views = AugmentedViews(spec.augmentation, config.train.augmult, torch.Generator(device=device).manual_seed(3))
    return BenchTraining(training=training, images=x, labels=y, refresh_public=refresh, device=device, views=views)
