"""Shared data loading: torchvision datasets on disk, partial CIFAR-10, public image files, subsets.

Images are kept as uint8 NCHW tensors and scaled to [0, 1] per batch; dataset normalization lives
inside the model so that attacks can work in pixel space (conventions.md, MadryLab/robustness).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets

from src.dataset_spec import DatasetSpec  # noqa: F401  (re-exported: the datasets' contract)
from src.errors import DataUnavailable, UserError


INSTALL_HINT = ("get the files with `python <shared>/data/install_data.py {root}` (offline bundle) "
                "or rerun on a machine with network access")


class ImageTensorDataset(Dataset):
    """uint8 images in memory, served as float [0, 1] batches.

    ``__getitems__`` lets the DataLoader fetch a whole Poisson batch with one indexing operation
    instead of one Python call per example.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 NCHW images, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def example_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device) -> "ImageTensorDataset":
        """The same examples on ``device`` (still uint8: a quarter of the float size), so that a batch is one
        indexing operation there, with no copy from the host per step."""
        return ImageTensorDataset(self.images.to(device), self.labels.to(device))

    def __getitem__(self, index: int):
        return self.images[index].float().div_(255), self.labels[index]

    def __getitems__(self, indices: Sequence[int]):
        index = torch.as_tensor(list(indices), dtype=torch.int64, device=self.images.device)
        return self.images[index].float().div_(255), self.labels[index]

    def batches(self, batch_size: int):
        """Consecutive (images, labels) batches in order, for evaluation."""
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size].float().div_(255), self.labels[start:start + batch_size]


class FeatureTensorDataset(Dataset):
    """Fixed float features of a set's images (src.feature_cache), served as ``ImageTensorDataset`` serves the
    images: what clean training of a ScatterNet model draws its Poisson batches from and evaluates on.

    ``views`` > 1 (``--mirror-views``): each row holds that many views of one example, ``features`` shaped
    (N, views, *example_shape``); a batch keeps them together, and ``FeatureViews`` lays them out as rows."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, views: int = 1):
        if not features.is_floating_point() or len(features) != len(labels):
            raise ValueError(f"expected one float feature row per label, got {features.dtype} "
                             f"{tuple(features.shape)} for {len(labels)} labels")
        if views > 1 and (features.dim() < 3 or features.shape[1] != views):
            raise ValueError(f"expected {views} views per example, got features {tuple(features.shape)}")
        self.features, self.labels, self.views = features, labels.to(torch.int64), views

    def __len__(self) -> int:
        return len(self.features)

    @property
    def example_shape(self) -> tuple:
        return tuple(self.features.shape[2 if self.views > 1 else 1:])

    def first_view(self) -> torch.Tensor:
        """Each example's features as computed from its own image (the first view)."""
        return self.features[:, 0] if self.views > 1 else self.features

    def to(self, device: torch.device) -> "FeatureTensorDataset":
        return FeatureTensorDataset(self.features.to(device), self.labels.to(device), self.views)

    def __getitem__(self, index: int):
        return self.features[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]):
        index = torch.as_tensor(list(indices), dtype=torch.int64, device=self.features.device)
        return self.features[index], self.labels[index]

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.features[start:start + batch_size], self.labels[start:start + batch_size]


def collate_batch(batch):
    """``ImageTensorDataset.__getitems__`` already returns the collated (images, labels) pair."""
    images, labels = batch
    return images, labels


@dataclass
class PublicData:
    images: torch.Tensor  # uint8 NCHW, never used for private training or accounting
    source: str


@dataclass
class LoadedData:
    train: ImageTensorDataset  # the private training set: n in the accountant is len(train)
    test: ImageTensorDataset
    public: Optional[PublicData]
    notes: list  # human-readable remarks about what was loaded (partial sets, hold-outs)
    val: Optional[ImageTensorDataset] = None  # --val-size: held out from the private set, never trained on
    # The n the Poisson schedule (sample rate, steps, expected batch) is planned from, when it must be fixed
    # before the data is drawn rather than read off it (the privacy audit inserts a random number of canaries).
    schedule_size: Optional[int] = None

    def to(self, device: torch.device) -> "LoadedData":
        """Every set on the training device (a no-op on the CPU)."""
        return dataclasses.replace(
            self, train=self.train.to(device), test=self.test.to(device),
            val=self.val.to(device) if self.val is not None else None,
            public=dataclasses.replace(self.public, images=self.public.images.to(device)) if self.public else None)


def to_nchw_uint8(array: np.ndarray, image_shape: tuple, what: str) -> torch.Tensor:
    """Accept (N,H,W) grey, (N,H,W,C) or (N,C,H,W) uint8 arrays whose images match ``image_shape``."""
    c, h, w = image_shape
    if array.dtype != np.uint8:
        raise DataUnavailable(f"{what}: expected uint8 images, got dtype {array.dtype}")
    if array.ndim == 3 and c == 1 and array.shape[1:] == (h, w):
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1:] == (h, w, c):
        array = array.transpose(0, 3, 1, 2)
    elif not (array.ndim == 4 and array.shape[1:] == (c, h, w)):
        raise DataUnavailable(f"{what}: images of shape {array.shape[1:]} do not match this dataset's "
                              f"{c}x{h}x{w} images")
    return torch.from_numpy(np.ascontiguousarray(array))


def load_torchvision(dataset_class, root: str, *, train: bool, download: bool, folder: str, **kwargs):
    """Open a torchvision dataset from ``root``, downloading it only if it is absent and allowed.

    Fails with one line naming the folder torchvision expects and how to get the files.
    """
    try:
        return dataset_class(root, train=train, download=False, **kwargs)
    except RuntimeError as error:
        if "not found" not in str(error).lower():  # present but malformed (e.g. a truncated idx file)
            raise DataUnavailable(f"{dataset_class.__name__} files in {Path(root) / folder} are unreadable "
                                  f"({type(error).__name__}: {error})") from None
        # torchvision's "Dataset not found": try a download below
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AssertionError, IndexError, KeyError) as error:
        # torchvision's idx reader asserts on a malformed header
        raise DataUnavailable(f"{dataset_class.__name__} files in {Path(root) / folder} are unreadable "
                              f"({type(error).__name__}: {error or 'malformed header'})") from None
    expected = Path(root) / folder
    if not download:
        raise DataUnavailable(f"{dataset_class.__name__} not found in {expected} and --no-download was given; "
                              + INSTALL_HINT.format(root=root))
    existed = expected.exists()
    try:
        return dataset_class(root, train=train, download=True, **kwargs)
    except Exception as error:  # any download failure: no network, HTTP error, bad archive
        if not existed:
            shutil.rmtree(expected, ignore_errors=True)  # leave nothing half-downloaded behind
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataUnavailable(f"{dataset_class.__name__} not found in {expected} and the download failed "
                              f"({reason}); " + INSTALL_HINT.format(root=root)) from None


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class PartialCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader over whichever training batches are present.

    The stock class checks the md5 of all five training batches and refuses a folder that holds only
    some of them (as ``shared/data`` does); the pickle format is the same, so only the lists change.
    """

    def __init__(self, root, train: bool, train_batches: Sequence[str]):
        self.train_list = [[name, None] for name in train_batches]
        self.test_list = [["test_batch", None]]
        self.meta = {"filename": "batches.meta", "key": "label_names", "md5": None}
        super().__init__(root, train=train, download=False)


def load_cifar10_split(root: str, *, train: bool, download: bool, notes: list):
    """The full md5-checked set when present, else the batches that are there (said in ``notes``)."""
    folder = Path(root) / CIFAR10_FOLDER
    try:
        return datasets.CIFAR10(root, train=train, download=False)
    except RuntimeError:
        pass
    except (OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as error:
        raise DataUnavailable(f"CIFAR-10 files in {folder} are unreadable ({type(error).__name__}: {error})") from None
    present = [b for b in CIFAR10_TRAIN_BATCHES if (folder / b).is_file()]
    if present and (folder / "test_batch").is_file():
        try:
            dataset = PartialCIFAR10(root, train=train, train_batches=present)
        except (OSError, ValueError, EOFError, KeyError, RuntimeError, pickle.UnpicklingError) as error:
            raise DataUnavailable(f"CIFAR-10 files in {folder} are unreadable "
                                  f"({type(error).__name__}: {error})") from None
        split = "training" if train else "test"
        if train and len(present) < len(CIFAR10_TRAIN_BATCHES):
            notes.append(f"partial CIFAR-10: using {len(present)} of 5 training batches "
                         f"({', '.join(present)}; {len(dataset)} images)")
        if not train and len(dataset) < 10000:
            notes.append(f"partial CIFAR-10: the test batch holds {len(dataset)} of 10000 {split} images")
        return dataset
    return load_torchvision(datasets.CIFAR10, root, train=train, download=download, folder=CIFAR10_FOLDER)


def tensors_from_torchvision(dataset, image_shape: tuple) -> tuple:
    """(uint8 NCHW images, int64 labels) from a loaded torchvision dataset, without PIL round trips."""
    data = dataset.data
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    images = to_nchw_uint8(data, image_shape, type(dataset).__name__)
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    return images, labels


def load_public_torchvision(dataset_class, data_config, *, image_shape: tuple, folder: str,
                            alternative: str) -> PublicData:
    """The first ``--public-size`` training images of another torchvision dataset (KMNIST, CIFAR-100);
    when it is missing, the error names ``alternative`` ways to supply a public set."""
    try:
        dataset = load_torchvision(dataset_class, data_config.data_root, train=True,
                                   download=data_config.download, folder=folder)
    except DataUnavailable as missing:
        raise DataUnavailable(f"public data: {alternative}; or install {dataset_class.__name__}: {missing}") from None
    images, _ = tensors_from_torchvision(dataset, image_shape)
    size, name = data_config.public_size, dataset_class.__name__
    if size > len(images):
        raise UserError(f"--public-size {size} asks for more than the {len(images)} {name} training images")
    return PublicData(images=images[:size].clone(), source=f"{name} train (first {size})")


def parse_public_path(spec: str) -> tuple:
    """``FILE.npz`` or ``FILE.npz:KEY`` (or ``FILE.npy``) -> (path, key or None)."""
    path, key = spec, None
    if ":" in spec and not os.path.exists(spec):
        path, key = spec.rsplit(":", 1)
    return path, key


def load_public_file(spec: str, image_shape: tuple, size: int) -> PublicData:
    """The first ``size`` images of a user-supplied uint8 image array (npz or npy).

    An npz with several image arrays needs ``:KEY``. Asking for more images than the file holds is an
    error rather than a silent shrink: the public set size is a reported experimental setting.
    """
    path, key = parse_public_path(spec)
    if not os.path.isfile(path):
        raise DataUnavailable(f"--public-data file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                loaded = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataUnavailable(f"--public-data file {path} is unreadable ({type(error).__name__}: {error})") from None
    if isinstance(loaded, np.ndarray):
        if key is not None:
            raise UserError(f"--public-data {spec}: a .npy file holds one array; drop ':{key}'")
        array, name = loaded, path
    else:
        arrays = loaded
        if key is not None:
            if key not in arrays:
                raise UserError(f"--public-data {path} has no array {key!r}; it holds {', '.join(arrays) or 'nothing'}")
            array = arrays[key]
        else:
            candidates = [k for k, a in arrays.items() if a.dtype == np.uint8 and a.ndim in (3, 4)]
            if len(candidates) != 1:
                found = ", ".join(candidates) if candidates else "none"
                raise UserError(f"--public-data {path}: expected exactly one uint8 image array, found {found}; "
                                f"name one as {path}:KEY")
            key = candidates[0]
            array = arrays[key]
        name = f"{path}:{key}"
    images = to_nchw_uint8(array, image_shape, f"--public-data {name}")
    if size > len(images):
        raise UserError(f"--public-size {size} asks for more public images than the {len(images)} in {name}; "
                        f"lower --public-size")
    return PublicData(images=images[:size].clone(), source=f"{name} (first {size} of {len(images)})")


def split_private(dataset: ImageTensorDataset, data_config) -> tuple:
    """(private training set, validation set or None): the last ``--val-size`` images become the
    validation set, and ``--train-subset`` takes the first images of the rest. The split is fixed (not
    seeded) so every run of a study validates on the same images; they leave n, so training never sees them."""
    val = None
    if data_config.val_size:
        if data_config.val_size >= len(dataset):
            raise UserError(f"--val-size {data_config.val_size} leaves no private training images out of "
                            f"{len(dataset)}")
        cut = len(dataset) - data_config.val_size
        val = ImageTensorDataset(dataset.images[cut:], dataset.labels[cut:])
        dataset = ImageTensorDataset(dataset.images[:cut], dataset.labels[:cut])
    return subset_first(dataset, data_config.train_subset, "--train-subset"), val


def subset_first(dataset: ImageTensorDataset, count: Optional[int], what: str) -> ImageTensorDataset:
    """The first ``count`` examples, so quick runs are reproducible; more than exist is an error."""
    if count is None:
        return dataset
    if count > len(dataset):
        raise UserError(f"{what} {count} is larger than the {len(dataset)} examples available")
    return ImageTensorDataset(dataset.images[:count], dataset.labels[:count])
