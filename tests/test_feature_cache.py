"""src.feature_cache: features computed once and found again, keyed by the data and the transform, rebuilt when a
file is partial or corrupt, written under the data root and never into the checkout."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from src.feature_cache import FOLDER, FeatureKey, cache_path, cached_features, fingerprint
from tests.conftest import REPO


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


class Counting:
    """A fixed transform that counts the images it sees."""

    def __init__(self):
        self.seen = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.seen += len(batch)
        return batch.mean(dim=(2, 3)) * 2


def _key(images, transform="double-mean v1", split="train") -> FeatureKey:
    return FeatureKey(dataset="tiny", split=split, fingerprint=fingerprint(images), transform=transform)


def test_features_are_computed_once_then_read_back(tmp_path):
    images, transform = _images(), Counting()
    first = cached_features(images, transform, _key(images), tmp_path, batch_size=5, progress=False)
    assert transform.seen == 12 and torch.allclose(first, images.float().div(255).mean(dim=(2, 3)) * 2)
    again = cached_features(images, transform, _key(images), tmp_path, batch_size=5, progress=False)
    assert transform.seen == 12 and torch.equal(again, first)
    assert [p.name for p in (tmp_path / FOLDER).iterdir()] == [_key(images).filename()]  # no temporaries left


def test_other_data_another_split_or_another_transform_is_another_file(tmp_path):
    images = _images()
    keys = [_key(images), _key(_images(seed=1)), _key(images[:6]), _key(images, split="test"),
            _key(images, transform="double-mean v2")]
    assert len({k.filename() for k in keys}) == len(keys)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-checksum", "wrong-key"])
def test_a_partial_or_corrupt_file_is_detected_and_rebuilt(damage, tmp_path, caplog):
    images, transform = _images(), Counting()
    expected = cached_features(images, transform, _key(images), tmp_path, progress=False)
    path = cache_path(tmp_path, _key(images))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        saved = torch.load(path, weights_only=True)
        if damage == "wrong-checksum":
            saved["features"][0, 0] += 1  # a flipped value that still loads
        else:
            saved["key"]["transform"] = "something else"
        torch.save(saved, path)
    rebuilt = cached_features(images, transform, _key(images), tmp_path, progress=False)
    assert transform.seen == 24 and torch.equal(rebuilt, expected)
    assert "computing it again" in caplog.text
    assert torch.equal(cached_features(images, transform, _key(images), tmp_path, progress=False), expected)
    assert transform.seen == 24, "the rebuilt file is good"


@pytest.mark.slow
def test_a_scattering_model_leaves_the_checkouts_tracked_tree_unchanged(tiny_root, tmp_path):
    """A tiny ScatterNet run with its data root inside the checkout (./data, the default) and its run folder under
    ./runs: git status --porcelain is the same before and after."""
    from tests.conftest import run_cli

    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout

    if subprocess.run(["git", "rev-parse"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    before = status()
    data_root_existed = (REPO / "data").exists()
    data = REPO / "data" / f"test-{tmp_path.name}"
    try:
        shutil.copytree(tiny_root, data)
        result = run_cli("--dataset", "mnist", "--model", "scatternet-linear", "--data-root", data,
                         "--train-subset", 40, "--batch-size", 20, "--epochs", 1, "--eval-robust-size", 0,
                         "--out", REPO / "runs" / f"test-{tmp_path.name}", "--wandb", "offline", cwd=REPO)
        assert result.returncode == 0, result.stderr
        assert status() == before
    finally:
        shutil.rmtree(data if data_root_existed else REPO / "data", ignore_errors=True)
        shutil.rmtree(REPO / "runs" / f"test-{tmp_path.name}", ignore_errors=True)


@pytest.mark.slow
def test_clean_scatternet_training_reads_cached_features_and_augmented_training_does_not(tiny_root, tmp_path):
    """The first clean run computes each split's features under <data-root>/features; a second one (same seed)
    reads them and ends with the same numbers; --augment computes them on the fly and caches nothing new."""
    from tests.conftest import run_cli

    root = tmp_path / "data"
    shutil.copytree(tiny_root / "MNIST", root / "MNIST")
    common = ["--dataset", "mnist", "--model", "scatternet-linear", "--data-root", root, "--train-subset", 80,
              "--batch-size", 20, "--epochs", 1, "--val-size", 20, "--eval-robust-size", 4, "--eval-pgd-steps", 2,
              "--seed", 0, "--out", tmp_path / "runs", "--wandb", "disabled"]
    first = run_cli(*common, "--run-id", "first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    files = {p.name: p.stat().st_mtime_ns for p in (root / FOLDER).iterdir()}
    assert sorted(name.split("-")[1] for name in files) == ["test", "train", "val"]
    second = run_cli(*common, "--run-id", "second", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (root / FOLDER).iterdir()} == files
    summaries = [json.loads((tmp_path / "runs" / r / "summary.json").read_text()) for r in ("first", "second")]
    assert summaries[0]["test_acc"] == summaries[1]["test_acc"] and summaries[0]["val_acc"] == summaries[1]["val_acc"]
    augmented = run_cli(*common, "--run-id", "augmented", "--augment", cwd=tmp_path)
    assert augmented.returncode == 0, augmented.stderr
    assert {p.name for p in (root / FOLDER).iterdir()} == set(files)


@pytest.mark.slow
def test_mirror_views_train_on_each_image_and_its_mirror_from_the_cache(tiny_root, tmp_path):
    """--mirror-views: the training features hold, per example, the scattering of its image and of the image
    flipped left to right (computed from the flipped pixels, cached in a file of its own); batches lay them out
    as example-major rows; the held-out splits stay one view; a run with them trains and finishes."""
    from src import cifar10
    from src.augment import FeatureViews
    from src.config import build_config
    from src.datasets import validate_for_dataset
    from src.feature_cache import training_inputs
    from tests.conftest import run_cli

    root = tmp_path / "data"
    shutil.copytree(tiny_root / "cifar-10-batches-py", root / "cifar-10-batches-py")
    spec = cifar10.DATASET
    config = build_config({"dataset": "cifar10", "model": "scatternet-linear", "norm": "group", "mirror_views": True,
                           "data_root": str(root), "train_subset": 16, "val_size": 4}, spec.defaults)
    validate_for_dataset(config, spec)
    assert config.train.views == 2
    data = spec.load(config.data, False)
    model = spec.build_model(config.model)
    inputs = training_inputs(model, data, config, "cifar10", torch.device("cpu"))
    assert inputs.train.views == 2 and inputs.train.example_shape == (243, 8, 8) and inputs.val.views == 1
    pixels = data.train.images[:3].float().div(255)
    with torch.no_grad():
        assert torch.allclose(inputs.train.features[:3, 0], model.scattering(pixels), atol=1e-6)
        assert torch.allclose(inputs.train.features[:3, 1], model.scattering(pixels.flip(-1)), atol=1e-6)
    assert torch.equal(inputs.train.first_view(), inputs.train.features[:, 0])
    assert not torch.allclose(inputs.train.features[:, 0], inputs.train.features[:, 1])
    assert len(list((root / FOLDER).iterdir())) == 4  # train, its mirror, val, test
    batch, labels = inputs.train.__getitems__([5, 2])
    rows, row_labels = FeatureViews(2)(batch, labels)
    assert torch.equal(rows[1], inputs.train.features[5, 1]) and torch.equal(rows[2], inputs.train.features[2, 0])
    assert row_labels.tolist() == [labels[0]] * 2 + [labels[1]] * 2
    run = run_cli("--dataset", "cifar10", "--model", "scatternet-linear", "--mirror-views", "--data-root", root,
                  "--train-subset", 16, "--val-size", 4, "--batch-size", 8, "--physical-batch-size", 4, "--epochs", 1,
                  "--eval-robust-size", 0, "--seed", 0, "--out", tmp_path / "runs", "--run-id", "m",
                  "--wandb", "disabled", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "runs" / "m" / "summary.json").read_text())["status"] == "finished"
