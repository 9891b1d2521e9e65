"""Tiny data sets written in torchvision's on-disk formats, so the real loading code runs in tests.

Images are synthetic but learnable: each class lights a different block of the image, plus noise.
Nothing here needs the network or ../shared.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Under pytest-xdist (README's test command runs the suite with -n auto) each worker, and every process it starts,
# computes on one thread: workers that each spin two threads on two cores slow each other down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_threads, "1")
# glibc hands every large freed block (ResNet-18's activations and per-sample gradients) back to the system and
# faults its pages in again at the next allocation: most of a tiny CIFAR-10 run's time went to the kernel (sys
# 87 s of 91 s). A high mmap threshold keeps those blocks in the heap for reuse (that run: 91 s -> 40 s). glibc
# reads it when a process starts, so this reaches only the processes the tests start (vision.py runs, torchrun,
# the runners), never a test process itself: there test_benchmark_harness measures memory with glibc's defaults.
# The engine benchmark's memory probe pins its own settings (benchmarks.timing.FIXED_MALLOC_ENV).
SUBPROCESS_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def pytest_configure(config):
    """Not in pytest-xdist's controller (its workers would inherit the allocator settings); in a worker or a
    serial run, whose own allocator has started already, for the processes the tests start."""
    controller = bool(getattr(config.option, "numprocesses", None)) and not os.environ.get("PYTEST_XDIST_WORKER")
    if not controller:
        for variable, value in SUBPROCESS_MALLOC_ENV.items():
            os.environ.setdefault(variable, value)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MNIST_TRAIN, MNIST_TEST = 240, 60
KMNIST_TRAIN = 140
CIFAR_TRAIN, CIFAR_TEST = 96, 32


def class_patterns(labels: np.ndarray, height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """uint8 images (N, H, W, C): class k brightens block k of a 4x3 grid over a noisy background."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), height, width, channels), dtype=np.int64)
    bh, bw = height // 4, width // 3
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 3)
        images[i, r * bh:(r + 1) * bh, c * bw:(c + 1) * bw, :] += 180
    return np.clip(images, 0, 255).astype(np.uint8)


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's idx files (uncompressed), as torchvision.datasets.MNIST reads them from ``raw/``."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, name: str, n_train: int, n_test: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = class_patterns(labels, 28, 28, 1, seed + n)[..., 0]
        write_idx(root / name / "raw", prefix, images, labels)


def write_cifar10_partial(root: Path, n_train: int, n_test: int, seed: int) -> None:
    """The original pickle format (dict with data [N, 3072] planar RGB, labels), one training batch only."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = class_patterns(labels, 32, 32, 3, seed + n)
        entry = {"batch_label": name, "labels": labels.tolist(),
                 "data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
                 "filenames": [f"synthetic_{i:05d}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_train}, f, protocol=2)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A data root with MNIST, KMNIST (complete but tiny), a partial CIFAR-10 and public .npz files."""
    root = tmp_path_factory.mktemp("data")
    write_mnist_like(root, "MNIST", MNIST_TRAIN, MNIST_TEST, seed=1)
    write_mnist_like(root, "KMNIST", KMNIST_TRAIN, 20, seed=2)
    write_cifar10_partial(root, CIFAR_TRAIN, CIFAR_TEST, seed=3)
    rng = np.random.default_rng(4)
    # Shaped like shared/data's kmnist_partial.npz: one uint8 image array and some int64 label arrays.
    np.savez(root / "public105.npz", x_test=rng.integers(0, 256, (105, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 10, 600))
    np.savez(root / "two_image_arrays.npz", x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    return root


def run_cli(*args, cwd: Path, timeout: int = 600, fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """``python vision.py ARGS`` in a process of its own, as a researcher runs it. By default the process is forked
    from one that has imported the training stack already (tests.cli_process says why); ``fresh_interpreter``
    starts a new interpreter, for a test of what happens before or during the imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    argv = [str(arg) for arg in args]
    if not fresh_interpreter:
        from tests.cli_process import run_vision

        return run_vision(argv, cwd, env, timeout)
    return subprocess.run([sys.executable, str(REPO / "vision.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    """The slow tests first (stable order otherwise), so that with -n the long ones start early and the short ones
    fill the gaps, instead of one long test starting last on a worker while the other waits idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
