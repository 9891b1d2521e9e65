"""src/checkpoint.py: what a checkpoint keeps beyond the model (seeds, the data's identity) and the resume
refusal when the data changed. End-to-end resumes are in test_resume.py and test_released_outputs.py."""
from __future__ import annotations

import pytest
import torch

from src import checkpoint
from src.checkpoint import Position, data_identity, fingerprint, require_same_data
from src.data import ImageTensorDataset, LoadedData, PublicData
from src.errors import UserError


def _data(images, public=None):
    train = ImageTensorDataset(images, torch.arange(len(images)) % 10)
    return LoadedData(train=train, test=train, public=PublicData(public, "p") if public is not None else None,
                      notes=[])


def test_fingerprint_changes_with_one_pixel_one_label_or_the_order():
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 10
    reference = fingerprint(images, labels)
    assert fingerprint(images.clone(), labels.clone()) == reference
    changed = images.clone()
    changed[3, 0, 5, 5] ^= 1
    assert fingerprint(changed, labels) != reference
    assert fingerprint(images, labels.roll(1)) != reference
    assert fingerprint(images.flip(0), labels.flip(0)) != reference


def test_resume_identity_is_checked_for_n_and_every_set():
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    public = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    saved = {"data_identity": data_identity(_data(images, public))}
    require_same_data(saved, data_identity(_data(images.clone(), public.clone())), "run")  # same data: fine
    with pytest.raises(UserError, match="now has 19 examples"):
        require_same_data(saved, data_identity(_data(images[:19], public)), "run")
    with pytest.raises(UserError, match="public set differs"):
        require_same_data(saved, data_identity(_data(images, public + 1)), "run")


def test_a_checkpoint_carries_seeds_and_data_identity_and_loads_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    identity = {"n_train": 5, "train_sha256": "a", "val_sha256": None, "public_sha256": None}
    state = checkpoint.capture(model=model, optimizer=optimizer, history=[(1.0, 0.1, 3)], generators={},
                               position=Position(epoch=1, step=3), metrics=[], summary={"status": "running"},
                               seeds={"noise": 7, "sampling": 8}, data_identity=identity)
    checkpoint.save(tmp_path, state)
    loaded = checkpoint.load(tmp_path)  # torch.load(weights_only=True) inside
    assert loaded["seeds"] == {"noise": 7, "sampling": 8} and loaded["data_identity"] == identity
    assert loaded["accountant_history"] == [(1.0, 0.1, 3)] and checkpoint.position_of(loaded).step == 3
