"""src/augment.py: augmentation on batched tensors moves pixels and never mixes examples, draws only from
the run's generator, and makes example-major augmult views."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.augment import AugmentedViews, augment
from src.cifar10 import DATASET as CIFAR10
from src.dataset_spec import Augmentation
from src.mnist import DATASET as MNIST


def _images(n=8, c=3, size=10):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("augmentation", [MNIST.augmentation, CIFAR10.augmentation, Augmentation(3, True)])
def test_every_row_is_a_shifted_crop_of_its_own_padded_image(augmentation):
    images = _images()
    out = augment(images, augmentation, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    p = augmentation.padding
    padded = F.pad(images, (p, p, p, p), mode="reflect")
    for i in range(len(images)):
        candidates = [padded[i, :, dy:dy + 10, dx:dx + 10] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        if augmentation.flip:
            candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates), f"row {i} is not a crop of its own image"


def test_draws_come_only_from_the_generator():
    images, augmentation = _images(), CIFAR10.augmentation
    first = augment(images, augmentation, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global stream plays no part
    assert torch.equal(first, augment(images, augmentation, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(images, augmentation, torch.Generator().manual_seed(8)))


def test_flips_and_shifts_both_happen_and_no_padding_no_flip_is_the_identity():
    images = _images(n=64)
    flipped = augment(images, Augmentation(0, True), torch.Generator().manual_seed(0))
    same = [torch.equal(flipped[i], images[i]) for i in range(64)]
    mirrored = [torch.equal(flipped[i], images[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    assert torch.equal(augment(images, Augmentation(0, False), torch.Generator()), images)
    shifted = augment(images, Augmentation(2, False), torch.Generator().manual_seed(0))
    assert sum(torch.equal(shifted[i], images[i]) for i in range(64)) < 16  # most rows moved


def test_augmult_views_are_example_major_and_each_drawn_anew():
    images, labels = _images(n=3), torch.tensor([4, 5, 6])
    views, view_labels = AugmentedViews(CIFAR10.augmentation, 4, torch.Generator().manual_seed(0))(images, labels)
    assert views.shape == (12, 3, 10, 10) and view_labels.tolist() == [4] * 4 + [5] * 4 + [6] * 4
    assert len({views[k].numpy().tobytes() for k in range(4)}) > 1  # example 0's views differ
    p = CIFAR10.augmentation.padding
    padded = F.pad(images, (p, p, p, p), mode="reflect")
    for row in range(12):  # each view is of its own example
        own = row // 4
        crops = [padded[own, :, dy:dy + 10, dx:dx + 10] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(views[row], c) or torch.equal(views[row], c.flip(-1)) for c in crops)
