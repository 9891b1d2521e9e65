"""CIFAR-10 with ResNet-18; public data: CIFAR-100 images (the original study's choice) or a hold-out.

``--public-holdout`` takes the last ``--public-size`` CIFAR-10 training images as the public set and
removes them from the private set, so n in the accountant shrinks accordingly: the honest stand-in
when CIFAR-100 is not on disk.
"""
from __future__ import annotations

from src.dataset_spec import Augmentation, DatasetSpec
from src.errors import UserError

# torch, torchvision and the loaders are imported inside the functions below, when first used: declaring the
# dataset (its defaults, for --help and flag errors) must stay instant.

IMAGE_SHAPE = (3, 32, 32)
# Input scaling from public knowledge only (pixels lie in [0, 1]), not from the private training images.
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# The recipe of De et al. 2022 ("Unlocking high-accuracy differentially private image classification through
# scale") for ResNet-18: GroupNorm with weight-standardized convolutions, augmentation with 4 views per example
# (they use 16; the cost is linear in K), an EMA of the weights, logical batches of 4096 and plain SGD at lr 2
# for about 875 updates (72 epochs at q = 4096/50000), as google-deepmind/jax_privacy's CIFAR-10 WRN-16-4
# configuration. Taken from the literature, not tuned here: one epoch of this recipe costs about 1.8 hours on the
# 2-core CPU (docs/results-cifar10.md), so a validation-split tuning needs a GPU.
DEFAULTS = {
    "model": "resnet18",  # src.models; the settings below are its recipe
    "epochs": 72,
    "batch_size": 4096,
    "physical_batch_size": 128,  # examples; with --augmult 4 that is 512 rows in memory
    "optimizer": "sgd",
    "lr": 2.0,
    "momentum": 0.0,
    "clip": 1.0,
    "target_epsilon": 8.0,
    "augment": True,
    "augmult": 4,
    "ema": 0.999,
    "ws": True,
    "norm": "group",
    "act": "relu",
    # Robustness: L-inf 8/255, the radius of the CIFAR-10 robustness literature (RobustBench); the CS523 study's
    # 0.03 is within 0.001 of it.
    "pgd_eps": 8 / 255,
    "pgd_steps": 20,  # the CS523 study's training attack for ResNet-18
    "pgd_radii": {"study": 0.03, "literature": 8 / 255},
}


def build_model(model_config):
    from src.models import build_model

    return build_model(DATASET, model_config)


def load(data_config, with_public: bool):
    from torchvision import datasets

    from src.data import (ImageTensorDataset, LoadedData, PublicData, load_cifar10_split, load_public_file,
                          load_public_torchvision, split_private, subset_first, tensors_from_torchvision)

    notes: list = []
    root, download = data_config.data_root, data_config.download
    train_images, train_labels = tensors_from_torchvision(
        load_cifar10_split(root, train=True, download=download, notes=notes), IMAGE_SHAPE)
    test = ImageTensorDataset(*tensors_from_torchvision(
        load_cifar10_split(root, train=False, download=download, notes=notes), IMAGE_SHAPE))
    public = None
    if data_config.public_holdout:
        k = data_config.public_size
        if k >= len(train_images):
            raise UserError(f"--public-size {k} leaves no private images out of the {len(train_images)} "
                            "CIFAR-10 training images")
        public = PublicData(images=train_images[-k:].clone(),
                            source=f"CIFAR-10 train hold-out (last {k} of {len(train_images)}, "
                                   "removed from the private set)")
        train_images, train_labels = train_images[:-k], train_labels[:-k]
        notes.append(f"public hold-out: {k} CIFAR-10 training images removed from the private set")
    elif with_public:
        public = (load_public_file(data_config.public_data, IMAGE_SHAPE, data_config.public_size)
                  if data_config.public_data else
                  load_public_torchvision(datasets.CIFAR100, data_config, image_shape=IMAGE_SHAPE,
                                          folder="cifar-100-python",
                                          alternative="use --public-holdout (a slice of the CIFAR-10 training "
                                                      "set) or --public-data FILE.npz[:KEY]"))
    train, val = split_private(ImageTensorDataset(train_images, train_labels), data_config)
    test = subset_first(test, data_config.test_subset, "--test-subset")
    return LoadedData(train=train, test=test, public=public, notes=notes, val=val)


DATASET = DatasetSpec(
    name="cifar10",
    image_shape=IMAGE_SHAPE,
    num_classes=10,
    full_train_size=50000,
    defaults=DEFAULTS,
    build_model=build_model,
    mean=MEAN,
    std=STD,
    load=load,
    public_default="the first --public-size CIFAR-100 training images, or with --public-holdout the last "
                   "--public-size CIFAR-10 training images (removed from the private set)",
    supports_public_holdout=True,
    augmentation=Augmentation(padding=4, flip=True),  # the standard CIFAR-10 augmentation (De et al. 2022)
)
