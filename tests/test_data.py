"""Data loading through torchvision's on-disk formats, public image files, hold-outs and clear failures."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets

from src import cifar10, mnist
from src.config import build_config
from src.data import ImageTensorDataset, load_public_file, load_torchvision
from src.errors import DataUnavailable, UserError
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN, MNIST_TEST, MNIST_TRAIN


def data_config(dataset, root, **flags):
    spec = {"mnist": mnist.DATASET, "cifar10": cifar10.DATASET}[dataset]
    return build_config({"dataset": dataset, "data_root": str(root), "download": False, **flags}, spec.defaults).data


def test_mnist_loads_through_torchvision_with_exact_pixels(tiny_root):
    loaded = mnist.load(data_config("mnist", tiny_root), with_public=False)
    assert len(loaded.train) == MNIST_TRAIN and len(loaded.test) == MNIST_TEST
    raw = (tiny_root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()[16:]
    expected = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(-1, 1, 28, 28).copy())
    assert torch.equal(loaded.train.images, expected)
    assert loaded.public is None  # nothing uses public data unless asked


def test_partial_cifar10_uses_the_batches_present_and_says_so(tiny_root):
    loaded = cifar10.load(data_config("cifar10", tiny_root), with_public=False)
    assert len(loaded.train) == CIFAR_TRAIN and len(loaded.test) == CIFAR_TEST
    assert any("1 of 5 training batches" in note for note in loaded.notes)
    with open(tiny_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    # Planar RGB rows -> NCHW without mixing channels up.
    assert torch.equal(loaded.train.images, torch.from_numpy(entry["data"].reshape(-1, 3, 32, 32)))
    assert loaded.train.labels.tolist() == entry["labels"]
    with pytest.raises(RuntimeError):  # torchvision's own class refuses the partial folder (md5 list)
        datasets.CIFAR10(str(tiny_root), train=True, download=False)


def test_public_holdout_is_removed_from_the_private_set(tiny_root):
    full = cifar10.load(data_config("cifar10", tiny_root), with_public=False)
    held = cifar10.load(data_config("cifar10", tiny_root, public_holdout=True, public_size=16), with_public=True)
    assert len(held.train) == CIFAR_TRAIN - 16
    assert torch.equal(held.public.images, full.train.images[-16:])
    assert torch.equal(held.train.images, full.train.images[:-16])
    assert "hold-out" in held.public.source


def test_default_public_sets_come_from_torchvision(tiny_root):
    loaded = mnist.load(data_config("mnist", tiny_root, public_size=100), with_public=True)
    assert loaded.public.images.shape == (100, 1, 28, 28) and "KMNIST" in loaded.public.source
    with pytest.raises(UserError, match="more than the 140 KMNIST"):
        mnist.load(data_config("mnist", tiny_root, public_size=141), with_public=True)
    # the error leads with what works, then how to install the missing set
    with pytest.raises(DataUnavailable, match="--public-holdout.*CIFAR100 not found in .*cifar-100-python"):
        cifar10.load(data_config("cifar10", tiny_root), with_public=True)


def test_mnist_public_set_falls_back_to_the_bundled_kmnist_images(tiny_root, tmp_path):
    """Where install_data.py laid out only the bundle's 105 KMNIST images (no torchvision KMNIST), bn-public
    uses them, says so in a note, and still refuses an explicit --public-size above what the file holds."""
    import shutil

    from tests.conftest import write_mnist_like

    write_mnist_like(tmp_path, "MNIST", MNIST_TRAIN, MNIST_TEST, seed=1)
    with pytest.raises(DataUnavailable, match=r"^public data: pass --public-data FILE.npz.*install_data.py"):
        mnist.load(data_config("mnist", tmp_path), with_public=True)
    (tmp_path / "KMNIST").mkdir()
    shutil.copy(tiny_root / "public105.npz", tmp_path / "KMNIST" / "kmnist_partial.npz")
    loaded = mnist.load(data_config("mnist", tmp_path), with_public=True)  # --public-size left at its default
    expected = torch.from_numpy(np.load(tiny_root / "public105.npz")["x_test"]).unsqueeze(1)
    assert torch.equal(loaded.public.images, expected)
    assert any("offline bundle's 105 KMNIST images" in note for note in loaded.notes)
    assert len(mnist.load(data_config("mnist", tmp_path, public_size=64), with_public=True).public.images) == 64
    with pytest.raises(UserError, match="more public images than the 105"):
        mnist.load(data_config("mnist", tmp_path, public_size=200), with_public=True)
    assert not mnist.load(data_config("mnist", tiny_root), with_public=True).notes  # the full KMNIST: no note


def test_public_file_formats_and_keys(tiny_root, tmp_path):
    grey = load_public_file(str(tiny_root / "public105.npz"), (1, 28, 28), 105)
    assert grey.images.shape == (105, 1, 28, 28) and grey.images.dtype == torch.uint8
    assert torch.equal(grey.images, load_public_file(f"{tiny_root / 'public105.npz'}:x_test", (1, 28, 28), 105).images)
    nhwc = load_public_file(f"{tiny_root / 'two_image_arrays.npz'}:x_test", (3, 32, 32), 20)
    original = np.load(tiny_root / "two_image_arrays.npz")["x_test"]
    assert torch.equal(nhwc.images, torch.from_numpy(original.transpose(0, 3, 1, 2).copy()))
    np.save(tmp_path / "nchw.npy", original.transpose(0, 3, 1, 2))
    assert torch.equal(load_public_file(str(tmp_path / "nchw.npy"), (3, 32, 32), 20).images, nhwc.images)
    np.save(tmp_path / "floats.npy", original.astype(np.float32))
    with pytest.raises(DataUnavailable, match="uint8"):
        load_public_file(str(tmp_path / "floats.npy"), (3, 32, 32), 5)
    with pytest.raises(UserError, match="more public images than the 105"):
        load_public_file(str(tiny_root / "public105.npz"), (1, 28, 28), 106)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataUnavailable, match="unreadable"):
        load_public_file(str(tmp_path / "broken.npz"), (1, 28, 28), 1)


def test_missing_data_names_the_folder_and_how_to_get_it(tmp_path):
    with pytest.raises(DataUnavailable) as missing:
        mnist.load(data_config("mnist", tmp_path), with_public=False)
    message = str(missing.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "install_data.py" in message
    assert "\n" not in message


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    def no_network(self):
        (tmp_path / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(datasets.MNIST, "download", no_network)
    with pytest.raises(DataUnavailable, match="the download failed \\(Error downloading"):
        load_torchvision(datasets.MNIST, str(tmp_path), train=True, download=True, folder="MNIST")
    assert not (tmp_path / "MNIST").exists()


def test_subsets_take_the_first_examples_and_refuse_to_grow(tiny_root):
    loaded = mnist.load(data_config("mnist", tiny_root, train_subset=50, test_subset=10), with_public=False)
    full = mnist.load(data_config("mnist", tiny_root), with_public=False)
    assert torch.equal(loaded.train.images, full.train.images[:50]) and len(loaded.test) == 10
    with pytest.raises(UserError, match="larger than the 240"):
        mnist.load(data_config("mnist", tiny_root, train_subset=241), with_public=False)


def test_batched_fetch_matches_single_items():
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    dataset = ImageTensorDataset(images, torch.arange(10))
    batch_images, batch_labels = dataset.__getitems__([3, 1, 7])
    for row, index in enumerate([3, 1, 7]):
        single_image, single_label = dataset[index]
        assert torch.equal(batch_images[row], single_image) and batch_labels[row] == single_label
    assert 0.0 <= batch_images.min() and batch_images.max() <= 1.0
    empty_images, empty_labels = dataset.__getitems__([])
    assert empty_images.shape == (0, 1, 4, 4) and empty_labels.shape == (0,)
    chunks = list(dataset.batches(4))
    assert [len(labels) for _, labels in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([images for images, _ in chunks]), dataset.__getitems__(range(10))[0])
