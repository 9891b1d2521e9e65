"""Fixed features (the ScatterNet models' scattering) computed once per split and kept under the data root.

Clean training without augmentation sees the same images every epoch, so a fixed transform of them can be
computed once: an epoch then costs only the trained head. CIFAR-10's training features are 50000 x 243 x 8 x 8
float32, about 3.1 GB, and take about 4.4 minutes on 2 cores (docs/models.md), so they are cached.

- Where: ``<data-root>/features/``, next to the data they are computed from and never in the checkout (the
  data root is ignored by git, as is any ``features/`` folder).
- Keyed by what determines them: the dataset and split, a fingerprint of the images (their bytes and shape, so
  a subset or another copy of the data is another file) and a description of the transform (its parameters,
  input scaling, kymatio's version, the dtype).
- Written atomically (a temporary sibling, fsync, rename), streamed to disk rather than serialized in memory. A
  file that does not load, or whose key, shape or checksum does not match, is rebuilt with a warning.
- Computing shows a progress bar with images per second and the time left.

The features are a deterministic function of each image alone, so caching them releases nothing: they are
the same numbers the model computes from that image on every forward pass.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from src.atomic_files import atomic_torch_save
from src.progress import is_terminal

log = logging.getLogger(__name__)

FOLDER = "features"
FORMAT = 1  # the file layout below; a new one rebuilds every file
LOG_EVERY_SECONDS = 60.0  # the bar's refresh when stderr is a file or a pipe, as for training (src.progress)


@dataclass(frozen=True)
class FeatureKey:
    """What a cached file holds: ``transform`` of ``dataset``'s ``split``, whose images have ``fingerprint``."""

    dataset: str
    split: str
    fingerprint: str
    transform: str

    def filename(self) -> str:
        transform = hashlib.sha256(self.transform.encode()).hexdigest()[:12]
        return f"{self.dataset}-{self.split}-{self.fingerprint[:16]}-{transform}.pt"


def fingerprint(images: torch.Tensor) -> str:
    """sha256 of the images' shape, dtype and bytes: the same data set, or not."""
    digest = hashlib.sha256(f"{tuple(images.shape)} {images.dtype}".encode())
    digest.update(memoryview(images.contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def checksum(features: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(features.contiguous().numpy()).cast("B")).hexdigest()


def cache_path(root: Path, key: FeatureKey) -> Path:
    return Path(root) / FOLDER / key.filename()


def cached_features(images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor], key: FeatureKey,
                    root: Path, *, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """``transform`` of every image (uint8 NCHW, scaled to [0, 1] here), from the cache when it holds them,
    otherwise computed in batches without gradients, saved, and returned."""
    path = cache_path(root, key)
    if path.exists():
        features = _load(path, key, len(images))
        if features is not None:
            return features
    features = _compute(images, transform, key, batch_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"format": FORMAT, "key": asdict(key), "checksum": checksum(features),
                             "features": features}, in_memory=False)
    return features


def _compute(images, transform, key: FeatureKey, batch_size: int, progress: bool) -> torch.Tensor:
    features = None  # one tensor filled in place: a list of batches and their concatenation would hold both
    with torch.no_grad(), tqdm(total=len(images), unit="img", desc=f"features {key.dataset} {key.split}",
                               disable=not progress, dynamic_ncols=True,
                               mininterval=0.1 if is_terminal(sys.stderr) else LOG_EVERY_SECONDS) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].float().div_(255)
            part = transform(batch).float()
            if features is None:
                features = torch.empty((len(images), *part.shape[1:]), dtype=part.dtype)
            features[start:start + len(batch)] = part
            bar.update(len(batch))
    return features


def _load(path: Path, key: FeatureKey, count: int):
    """The cached features, or None (with a warning saying why) when the file cannot be trusted."""
    try:
        saved = torch.load(path, weights_only=True)
        problem = ("another file layout" if saved.get("format") != FORMAT else
                   "another key" if saved.get("key") != asdict(key) else
                   f"{len(saved['features'])} rows for {count} images" if len(saved["features"]) != count else
                   "a checksum mismatch" if checksum(saved["features"]) != saved.get("checksum") else None)
    except Exception as error:  # truncated, corrupt or foreign: any failure to read means rebuild
        problem = f"unreadable ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    if problem is None:
        return saved["features"]
    log.warning("feature cache %s: %s; computing it again", path, problem)
    return None


@dataclass(frozen=True)
class TrainingInputs:
    """What training draws its batches from and clean evaluation reads: the loaded sets themselves, or their
    cached features. Robust evaluation always attacks the pixels (``LoadedData.test``)."""

    train: object
    val: object
    test: object
    cached: bool = False


def uses_cached_features(model, config) -> bool:
    """Clean training without augmentation of a model with a fixed feature stage sees the same features every
    epoch; augmentation and robust training change the pixels, so they compute features on the fly."""
    return (hasattr(model, "scattering") and not config.train.augment and not config.robust.robust
            and config.train.augmult == 1)


def split_features(model, images_set, split: str, dataset: str, root: Path, device: torch.device,
                   mirrored: bool = False) -> torch.Tensor:
    """The model's fixed features of one split's images (on the CPU), from the cache under ``root`` or computed by
    the model's own scattering on ``device`` and cached. ``mirrored``: of each image flipped left to right,
    computed from the flipped pixels (not by permuting the features' orientations and flipping their maps, which
    is exact only up to where the scattering's 4-pixel grid falls on the flipped image), and cached apart."""
    scattering = model.scattering
    images = images_set.images.cpu()
    transform = scattering.description() + ("; each image mirrored left to right first" if mirrored else "")
    key = FeatureKey(dataset=dataset, split=split, fingerprint=fingerprint(images), transform=transform)

    def compute(batch: torch.Tensor) -> torch.Tensor:
        return scattering((batch.flip(-1) if mirrored else batch).to(device)).cpu()

    return cached_features(images, compute, key, root)


def training_inputs(model, data, config, dataset: str, device: torch.device) -> TrainingInputs:
    """The cached features of every split, on ``device`` (computed there by the model's own scattering the first
    time) when ``uses_cached_features``, else the loaded sets."""
    from src.data import FeatureTensorDataset

    if not uses_cached_features(model, config):
        return TrainingInputs(data.train, data.val, data.test)

    root = Path(config.data.data_root)

    def features(split: str, images_set, mirror: bool = False):
        if images_set is None:
            return None
        computed = split_features(model, images_set, split, dataset, root, device)
        if mirror:  # the image and its mirror, side by side: (N, 2, C, H, W)
            mirrored = split_features(model, images_set, split, dataset, root, device, mirrored=True)
            computed = torch.stack([computed, mirrored], 1)
        return FeatureTensorDataset(computed, images_set.labels.cpu(), views=2 if mirror else 1).to(device)

    return TrainingInputs(features("train", data.train, mirror=config.train.mirror_views),
                          features("val", data.val), features("test", data.test), cached=True)
