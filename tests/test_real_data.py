"""The real files in ../shared/data, laid out by its install_data.py: skipped where they are absent."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from src import cifar10, mnist
from src.config import build_config
from src.data import load_public_file
from src.errors import UserError
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.skipif(not (SHARED_DATA / "install_data.py").is_file(),
                                 reason="../shared/data is not present on this machine"),
              pytest.mark.slow]  # install_data.py lays out the real data sets first


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    subprocess.run([sys.executable, str(SHARED_DATA / "install_data.py"), str(root), "--datasets",
                    "mnist,kmnist,cifar10"], check=True, capture_output=True)
    return root


def config(dataset, root, **flags):
    spec = {"mnist": mnist.DATASET, "cifar10": cifar10.DATASET}[dataset]
    return build_config({"dataset": dataset, "data_root": str(root), "download": False, **flags}, spec.defaults).data


@pytest.mark.slow
def test_real_mnist(real_root):
    loaded = mnist.load(config("mnist", real_root), with_public=False)
    assert len(loaded.train) == 60000 and len(loaded.test) == 10000
    assert torch.bincount(loaded.train.labels).tolist()[:3] == [5923, 6742, 5958]  # counts in shared/data/README
    mean = loaded.train.images.float().div(255).mean().item()
    assert abs(mean - 0.1307) < 1e-3


def test_real_cifar10_complete(real_root):
    """The bundle holds the complete CIFAR-10: all five training batches and all 10000 test images."""
    loaded = cifar10.load(config("cifar10", real_root), with_public=False)
    assert len(loaded.train) == 50000 and len(loaded.test) == 10000
    assert torch.bincount(loaded.train.labels).tolist() == [5000] * 10
    assert torch.bincount(loaded.test.labels).tolist() == [1000] * 10
    assert loaded.train.labels[:5].tolist() == [6, 9, 9, 4, 1] and loaded.test.labels[:5].tolist() == [3, 8, 8, 0, 6]
    assert not any("partial CIFAR-10" in n for n in loaded.notes)


def test_real_kmnist_partial_file_as_public_data(real_root):
    path = str(real_root / "KMNIST" / "kmnist_partial.npz")
    public = load_public_file(path, (1, 28, 28), 105)
    assert public.images.shape == (105, 1, 28, 28) and "x_test" in public.source
    with pytest.raises(UserError, match="more public images than the 105"):
        load_public_file(path, (1, 28, 28), 128)
